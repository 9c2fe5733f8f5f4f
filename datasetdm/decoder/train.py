"""Few-shot training of the P-Decoder on K labelled real images.

The backbone stays frozen: each real image is encoded, noised to the feature
timestep and passed once through the UNet with its caption (as DatasetDM does), and
the decoder learns to map those features to labels. Features are computed once up
front for several noise draws and both horizontal flips, so the loop itself is a
few hundred cheap decoder steps.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from datasetdm.backbones.base import Backbone, Features
from datasetdm.config import BackboneConfig, DecoderConfig
from datasetdm.decoder.inputs import class_attention
from datasetdm.decoder.model import PDecoder
from datasetdm.realset import LabelledImage

NOISE_DRAWS = 3  # feature samples per image and flip


def images_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) arrays -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255



def build_decoder(backbone_features: Features, classes: tuple[str, ...], cfg: DecoderConfig, image_size: int) -> PDecoder:
    return PDecoder({
        "map_channels": [m.shape[1] for m in backbone_features.maps],
        "classes": list(classes),
        "channels": cfg.channels,
        "image_skip": cfg.image_skip,
        "heads": list(cfg.heads),
        "image_size": image_size,
    })


def feature_bank(backbone: Backbone, labelled: list[LabelledImage], bb: BackboneConfig, classes: tuple[str, ...], batch_size: int = 16):
    """Precompute (maps, class attention, image, semantic target) for every image x flip x noise draw."""
    maps_all, att_all, img_all, tgt_all = [], [], [], []
    items = [(x, flip, draw) for x in labelled for flip in (False, True) for draw in range(NOISE_DRAWS)]
    for start in tqdm(range(0, len(items), batch_size), desc="decoder features", unit="batch", mininterval=2):
        chunk = items[start:start + batch_size]
        imgs = images_tensor([x.image[:, ::-1] if flip else x.image for x, flip, _ in chunk])
        seeds = [x.id * 1000 + draw * 2 + int(flip) for x, flip, draw in chunk]
        feats = backbone.extract_features(imgs, [x.caption for x, _, _ in chunk], bb.feature_timestep, seeds)
        maps_all.append([m.cpu() for m in feats.maps])
        att_all.append(class_attention(feats, backbone, classes).cpu())
        img_all.append(imgs)
        tgt_all.append(torch.from_numpy(np.stack([x.semantic[:, ::-1] if flip else x.semantic for x, flip, _ in chunk]).copy()))
    maps = [torch.cat([m[i] for m in maps_all]) for i in range(len(maps_all[0]))]
    return maps, torch.cat(att_all), torch.cat(img_all), torch.cat(tgt_all)


def train_decoder(backbone: Backbone, labelled: list[LabelledImage], classes: tuple[str, ...], cfg: DecoderConfig, bb: BackboneConfig) -> tuple[PDecoder, dict[str, float]]:
    """Train a P-Decoder from scratch; returns the model (eval mode) and loss figures."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    maps, att, imgs, target = feature_bank(backbone, labelled, bb, classes)
    probe = Features([m[:1] for m in maps], att[:1], [""])
    decoder = build_decoder(probe, classes, cfg, imgs.shape[-1]).train()
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=1e-4)
    losses = []
    for step in tqdm(range(cfg.steps), desc="train P-Decoder", unit="step", mininterval=2):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        idx = torch.from_numpy(rng.integers(0, len(imgs), size=cfg.batch_size))
        out = decoder([m[idx] for m in maps], att[idx], imgs[idx])
        loss = sum(decoder.heads[name].loss(out[name], target[idx]) for name in out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return decoder.eval(), {"first_loss": float(np.mean(losses[:10])), "final_loss": float(np.mean(losses[-20:]))}


@torch.no_grad()
def predict_semantic(decoder: PDecoder, backbone: Backbone, features: Features, images: torch.Tensor, classes: tuple[str, ...]) -> torch.Tensor:
    """Class probabilities (B, 1 + C, H, W) for images whose features were captured."""
    out = decoder(features.maps, class_attention(features, backbone, classes), images)
    return out["semantic"].softmax(1)
