"""Few-shot training of the P-Decoder on K labelled real images.

The backbone stays frozen: each real image is encoded, noised to the feature
timestep and passed once through the UNet with its caption (as DatasetDM does), and
the decoder learns to map those features to labels. Features are computed once up
front for several noise draws and both horizontal flips, so the loop itself is a
few hundred cheap decoder steps.

Augmentation uses the symmetries of the labels: shape classes do not change under
flips and 90-degree rotations, so ``decoder.views`` = 8 gives eight views of each
labelled image (the dihedral group), each with its own backbone features.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from tqdm import tqdm

from datasetdm.backbones.base import Backbone, Features
from datasetdm.config import BackboneConfig, DecoderConfig
from datasetdm.decoder.inputs import class_attention, named_class_mask, restrict_logits, semantic_labels
from datasetdm.decoder.model import PDecoder
from datasetdm.keypoints import render_heatmaps
from datasetdm.realset import LabelledImage

logger = logging.getLogger(__name__)
NOISE_DRAWS = 3  # feature samples per image and view


def view(array: np.ndarray, v: int) -> np.ndarray:
    """The v-th of the 8 dihedral views (rotate by 90 * (v // 2) degrees, then flip if v is odd) of an (H, W, ...)
    array."""
    out = np.rot90(array, k=v // 2, axes=(0, 1))
    return np.ascontiguousarray(out[:, ::-1] if v % 2 else out)


def images_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) arrays -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def build_decoder(
    backbone_features: Features, classes: tuple[str, ...], cfg: DecoderConfig, image_size: int
) -> PDecoder:
    return PDecoder(
        {
            "map_channels": [m.shape[1] for m in backbone_features.maps],
            "classes": list(classes),
            "channels": cfg.channels,
            "image_skip": cfg.image_skip,
            "heads": list(cfg.heads),
            "image_size": image_size,
            "class_source": cfg.class_source,
            "depth_coords": cfg.depth_coords,
            "depth_background_prior": cfg.depth_background_prior,
        }
    )


def feature_bank(
    backbone: Backbone,
    labelled: list[LabelledImage],
    bb: BackboneConfig,
    classes: tuple[str, ...],
    *,
    views: int = 2,
    rotated_objects: bool = False,
    batch_size: int = 16,
):
    """Precompute (maps, class attention, named-class mask, image, targets) for every image x view x noise draw.

    ``targets`` maps a head name to its labels: ``semantic`` (N, H, W) class ids and
    ``depth`` (N, H, W) metres, 0 where unknown, and ``keypoints`` (N, 2, H, W) centre
    and corner heatmaps (``datasetdm.keypoints``). Rotated views get no depth target on
    the background: the ground plane recedes *upwards* in every real image, and a rotated
    copy would teach the decoder otherwise. Their objects keep theirs where
    ``rotated_objects`` (``decoder.rotated_object_depth``): a rolled camera sees each
    surface at the same distance, and the few labelled objects are the depth head's
    scarcest examples.
    """
    maps_all, att_all, mask_all, img_all, sem_all, depth_all, heat_all = [], [], [], [], [], [], []
    items = [(x, v, draw) for x in labelled for v in range(views) for draw in range(NOISE_DRAWS)]
    for start in tqdm(range(0, len(items), batch_size), desc="decoder features", unit="batch", mininterval=2):
        chunk = items[start : start + batch_size]
        imgs = images_tensor([view(x.image, v) for x, v, _ in chunk])
        prompts = [x.caption for x, _, _ in chunk]
        seeds = [x.id * 1000 + draw * 8 + v for x, v, draw in chunk]
        feats = backbone.extract_features(imgs, prompts, bb.feature_timestep, seeds)
        maps_all.append([m.cpu() for m in feats.maps])
        att_all.append(class_attention(feats, backbone, classes).cpu())
        mask_all.append(named_class_mask(prompts, backbone, classes))
        img_all.append(imgs)
        sem_all.append(torch.from_numpy(np.stack([view(x.semantic, v) for x, v, _ in chunk])))
        depth_all.append(torch.from_numpy(np.stack([_depth_target(x, v, rotated_objects) for x, v, _ in chunk])))
        heat_all.append(
            torch.from_numpy(
                np.stack(
                    [
                        view(render_heatmaps(x.keypoints, x.semantic.shape).transpose(1, 2, 0), v).transpose(2, 0, 1)
                        for x, v, _ in chunk
                    ]
                )
            )
        )
    maps = [torch.cat([m[i] for m in maps_all]) for i in range(len(maps_all[0]))]
    targets = {"semantic": torch.cat(sem_all), "depth": torch.cat(depth_all), "keypoints": torch.cat(heat_all)}
    return maps, torch.cat(att_all), torch.cat(mask_all), torch.cat(img_all), targets


def _depth_target(x: LabelledImage, v: int, rotated_objects: bool) -> np.ndarray:
    """View ``v``'s depth target in metres, 0 where unknown (``feature_bank``)."""
    if x.depth is None or (v >= 2 and not rotated_objects):
        return np.zeros(x.semantic.shape, np.float32)
    depth = view(x.depth, v).astype(np.float32)
    return depth if v < 2 else np.where(view(x.semantic, v) > 0, depth, np.float32(0))


def bank_of_images(bank, images: list[int], *, views: int):
    """The part of a ``feature_bank`` that belongs to ``images`` (indices into its labelled list): the bank
    holds each image's views x noise draws together, in image order."""
    per_image = views * NOISE_DRAWS
    rows = torch.tensor([i * per_image + j for i in images for j in range(per_image)])
    maps, att, named, imgs, targets = bank
    return [m[rows] for m in maps], att[rows], named[rows], imgs[rows], {k: v[rows] for k, v in targets.items()}


def train_decoder(
    backbone: Backbone,
    labelled: list[LabelledImage],
    classes: tuple[str, ...],
    *,
    cfg: DecoderConfig,
    bb: BackboneConfig,
) -> tuple[PDecoder, dict[str, float]]:
    """Train a P-Decoder from scratch; returns the model (eval mode) and loss figures."""
    bank = feature_bank(backbone, labelled, bb, classes, views=cfg.views, rotated_objects=cfg.rotated_object_depth)
    return fit_decoder(bank, classes, cfg=cfg, num_images=len(labelled))


def fit_decoder(bank, classes: tuple[str, ...], *, cfg: DecoderConfig, num_images: int):
    """The training loop over a precomputed ``feature_bank`` (the k-fold study reuses one bank for every fold).

    The bank draws its noise from per-image generators, never torch's global one, so seeding
    here gives the same weights as seeding before the bank (checked: same decoder bytes).
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    maps, att, named, imgs, targets = bank
    # The feature bank is on the CPU (it is built once and small); the decoder trains beside it.
    logger.info(
        "training the P-Decoder on the CPU: %d labelled images x %d views x %d noise draws, heads %s",
        num_images,
        cfg.views,
        NOISE_DRAWS,
        ", ".join(cfg.heads),
    )
    probe = Features([m[:1] for m in maps], att[:1], [""])
    decoder = build_decoder(probe, classes, cfg, imgs.shape[-1]).train()
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=1e-4)
    losses = []
    for step in tqdm(range(cfg.steps), desc="train P-Decoder", unit="step", mininterval=2):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        idx = torch.from_numpy(rng.integers(0, len(imgs), size=cfg.batch_size))
        out = decoder(
            [m[idx] for m in maps], att[idx], _permute_colours(imgs[idx], rng) if cfg.colour_jitter else imgs[idx]
        )
        out["semantic"] = restrict_logits(out["semantic"], named[idx])
        wanted = {name: targets[name][idx] for name in out}
        if "depth" in wanted and not cfg.depth_head_background:
            wanted["depth"] = torch.where(targets["semantic"][idx] > 0, wanted["depth"], 0)
        per_head = {name: decoder.heads[name].loss(out[name], wanted[name]) for name in out}
        loss = sum(per_head.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append([loss.item(), *(v.item() for v in per_head.values())])
    if cfg.depth_background_prior and "depth" in decoder.heads:
        decoder.heads["depth"].fit_background(targets["depth"], targets["semantic"])
        logger.info("depth background prior: %s", decoder.heads["depth"].surface.numpy().round(3).tolist())
    curve = np.array(losses)
    stats = {"first_loss": float(curve[:10, 0].mean()), "final_loss": float(curve[-20:, 0].mean())}
    for j, name in enumerate(decoder.heads, start=1):  # ModuleDict order = the order of ``out``
        stats[f"{name}_first_loss"], stats[f"{name}_final_loss"] = (
            float(curve[:10, j].mean()),
            float(curve[-20:, j].mean()),
        )
    logger.info("P-Decoder loss %.4f -> %.4f over %d steps", stats["first_loss"], stats["final_loss"], cfg.steps)
    return decoder.eval(), stats


def _permute_colours(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Shuffle RGB channels per image (only the decoder's image skip sees this; the
    backbone features stay those of the true image). Every shape comes in every
    colour, so with 20 images the skip path would otherwise learn colour -> class."""
    perms = [torch.from_numpy(rng.permutation(3)) for _ in range(len(images))]
    return torch.stack([img[p] for img, p in zip(images, perms)])


@torch.no_grad()
def predict(
    decoder: PDecoder,
    backbone: Backbone,
    features: Features,
    images: torch.Tensor,
    *,
    classes: tuple[str, ...],
    restrict: bool = True,
    attention: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every head's output in user units: ``semantic`` class probabilities (B, 1 + C, H, W),
    ``labels`` the class ids (B, H, W) generation stores (``semantic_labels``) and, if the
    decoder has those heads, ``depth`` in metres and ``keypoints`` heatmap probabilities
    (B, 2, H, W).

    With ``restrict`` (the default, as in training) only background and the classes
    the prompt names can win, and the decoder's ``class_source`` picks among them; without
    it ``labels`` is the plain argmax. ``attention`` is ``class_attention(features, ...)`` when
    the caller already has it.
    """
    if attention is None:
        attention = class_attention(features, backbone, classes)
    out = decoder(features.maps, attention, images)
    logits = out["semantic"]
    if restrict:
        named = named_class_mask(features.prompts, backbone, classes)
        probs = restrict_logits(logits, named).softmax(1)
        labels = semantic_labels(probs, attention, named, decoder.class_source)
    else:
        probs = logits.softmax(1)
        labels = probs.argmax(1)
    result = {"semantic": probs, "labels": labels}
    if "depth" in out:
        result["depth"] = out["depth"].exp()
    if "keypoints" in out:
        result["keypoints"] = out["keypoints"].sigmoid()
    return result


def predict_semantic(
    decoder: PDecoder,
    backbone: Backbone,
    features: Features,
    images: torch.Tensor,
    *,
    classes: tuple[str, ...],
    restrict: bool = True,
) -> torch.Tensor:
    """Class probabilities (B, 1 + C, H, W) for images whose features were captured."""
    return predict(decoder, backbone, features, images, classes=classes, restrict=restrict)["semantic"]
