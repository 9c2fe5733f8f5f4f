"""How good is the generator? Three audits by the inspector, written to ``metrics/backbone.json``.

* **prompt fidelity**: the fraction of generated images in which the inspector reads
  exactly the prompt's objects (shapes, colours and count), for single-object and
  two-object prompts separately;
* **label agreement**: mIoU between the exported masks and the inspector's masks on the
  exported images (do the factory's labels say what the pixels show?);
* a **Fréchet distance** between the inspector's features of exported and real images;
* the **codec**: PSNR of the VAE's reconstructions of rendered scenes, and the
  inspector's mIoU on them beside its mIoU on the scenes themselves (every generated
  image leaves through that decoder, so it bounds how sharp a drawn edge can be).

These are evaluation only: nothing in training, filtering or prompt choice reads them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import linalg
from tqdm import tqdm

from datasetdm.backbones.base import Backbone
from datasetdm.config import Params
from datasetdm.decoder.train import images_tensor
from datasetdm.downstream.data import from_export
from datasetdm.evaluate.inspector import Inspector, render_set
from datasetdm.evaluate.semantic import confusion_matrix, semantic_metrics
from datasetdm.export.grid import sample_grid
from datasetdm.worlds.shapes import caption_for, render_scene

logger = logging.getLogger(__name__)
Layout = list[tuple[str, str]]


def fidelity_layouts(
    classes: tuple[str, ...], colours: tuple[str, ...], *, num: int, num_objects: int, seed: int
) -> list[Layout]:
    """``num`` prompt layouts: single objects cycle through every (shape, colour); pairs are drawn at random."""
    if num_objects == 1:
        pairs = list(itertools.product(classes, colours))
        return [[pairs[i % len(pairs)]] for i in range(num)]
    rng = np.random.default_rng([seed, num_objects])
    return [[(str(rng.choice(classes)), str(rng.choice(colours))) for _ in range(num_objects)] for _ in range(num)]


def to_uint8(images, size: int) -> np.ndarray:
    """Backbone images (B, 3, H, W) float in [0, 1] -> uint8 (B, size, size, 3), resized if the model draws another
    size."""
    out = []
    for img in images:
        pixels = (img.detach().cpu().permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        if pixels.shape[0] != size:
            pixels = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))
        out.append(pixels)
    return np.stack(out)


def generate_layouts(
    backbone: Backbone, layouts: list[Layout], *, seed: int, params: Params, batch_size: int = 16
) -> np.ndarray:
    """One image per layout from its canonical caption, seeds ``seed + i``."""
    prompts = [caption_for(layout) for layout in layouts]
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="fidelity samples", unit="batch", mininterval=5):
        images, _ = backbone.sample(
            prompts[i : i + batch_size],
            [seed + i + j for j in range(len(prompts[i : i + batch_size]))],
            steps=params.backbone.steps,
            guidance_scale=params.backbone.guidance_scale,
        )
        out.append(to_uint8(images, params.world.image_size))
    return np.concatenate(out)


def prompt_fidelity(
    inspector: Inspector, images: np.ndarray, layouts: list[Layout]
) -> tuple[float, list[bool], list[Counter]]:
    """Fraction of images whose inspector reading equals the layout; per-image verdicts and readings."""
    labels = inspector.segment(images)
    readings = [inspector.read_objects(img, lab) for img, lab in zip(images, labels)]
    ok = [reading == Counter(layout) for reading, layout in zip(readings, layouts)]
    return float(np.mean(ok)), ok, readings


def label_agreement(inspector: Inspector, export_dir: str | Path, classes: tuple[str, ...]) -> dict:
    """mIoU of the exported masks against the inspector's reading of the exported images."""
    data = from_export(export_dir)
    pred = inspector.segment(data.images, classes)
    metrics = semantic_metrics(confusion_matrix(pred, data.semantic, 1 + len(classes)), classes)
    return {"mIoU": metrics["mIoU"], "per_class_iou": metrics["per_class_iou"], "num_images": len(data)}


def codec_quality(backbone: Backbone, inspector: Inspector, params: Params, batch_size: int = 50) -> dict:
    """The VAE round trip on ``inspect.num_codec`` rendered scenes of its own seeds (``inspect.codec_seed``).

    PSNR (dB, pixels in [0, 1]) and the inspector's mIoU on the reconstructions and on the
    originals: the gap is what the codec alone takes from every label-relevant edge.
    """
    cfg = params.inspect
    world = dataclasses.replace(params.world, classes=inspector.classes, colours=inspector.colours)
    scenes, _ = render_set(world, cfg.num_codec, cfg.codec_seed, "render codec scenes")
    originals, truth = scenes.images, scenes.semantic
    rebuilt = []
    for i in tqdm(range(0, len(originals), batch_size), desc="VAE round trip", unit="batch", mininterval=5):
        batch = images_tensor(originals[i : i + batch_size])
        rebuilt.append(to_uint8(backbone.autoencode(batch), params.world.image_size))
    reconstructed = np.concatenate(rebuilt)
    mse = float(np.mean((reconstructed.astype(np.float64) - originals) ** 2)) / 255**2
    num_classes = 1 + len(inspector.classes)

    def miou(images: np.ndarray) -> float:
        conf = confusion_matrix(inspector.segment(images), truth, num_classes)
        return semantic_metrics(conf, inspector.classes)["mIoU"]

    result = {
        "psnr": round(10 * math.log10(1 / mse), 3) if mse else None,
        "inspector_mIoU_reconstructed": miou(reconstructed),
        "inspector_mIoU_original": miou(originals),
        "num": cfg.num_codec,
    }
    logger.info(
        "VAE round trip: PSNR %.2f dB, inspector mIoU %.3f (%.3f on the originals)",
        result["psnr"] or float("inf"),
        result["inspector_mIoU_reconstructed"],
        result["inspector_mIoU_original"],
    )
    return result


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D), as FID computes it."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # near-singular product: nudge both, as the reference FID code does
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(covmean)))


def fidelity_grid(
    images: np.ndarray, layouts: list[Layout], readings: list[Counter], ok: list[bool], *, path: str | Path
) -> None:
    """Generated images captioned with prompt, verdict and what the inspector read: look at these before trusting the
    number."""
    items = []
    for img, layout, reading, good in zip(images, layouts, readings, ok):
        read = ", ".join(f"{n} {colour} {shape}" for (shape, colour), n in sorted(reading.items())) or "nothing"
        items.append((img, None, f"{caption_for(layout)} | {'OK' if good else 'read: ' + read}", None))
    sample_grid(items, path, columns=6, scale=2)


def measure_backbone(
    backbone: Backbone,
    inspector: Inspector,
    params: Params,
    *,
    real_images: np.ndarray | None = None,
    export_dir: str | Path | None = None,
    grid: str | Path | None = None,
) -> dict:
    """Prompt fidelity always; label agreement and Fréchet distance when an export is given."""
    cfg = params.inspect
    result: dict = {"prompt_fidelity": {}}
    shown = []
    for key, n in (("single_object", 1), ("two_objects", 2)):
        layouts = fidelity_layouts(
            inspector.classes, params.world.colours, num=cfg.num_fidelity, num_objects=n, seed=cfg.fidelity_seed
        )
        images = generate_layouts(backbone, layouts, seed=cfg.fidelity_seed + 10_000 * n, params=params)
        score, ok, readings = prompt_fidelity(inspector, images, layouts)
        result["prompt_fidelity"][key] = score
        # The same layouts rendered by the world itself: the inspector's ceiling for this group.
        world = dataclasses.replace(params.world, classes=inspector.classes)
        rendered = np.stack(
            [render_scene(world, cfg.fidelity_seed + i, layout=lay).image for i, lay in enumerate(layouts)]
        )
        result["prompt_fidelity"][f"{key}_rendered"] = prompt_fidelity(inspector, rendered, layouts)[0]
        # ... and through the VAE and back: the most any sample can score with this codec.
        round_trip = to_uint8(backbone.autoencode(images_tensor(rendered)), params.world.image_size)
        result["prompt_fidelity"][f"{key}_codec"] = prompt_fidelity(inspector, round_trip, layouts)[0]
        if n == 1:
            verdicts = {
                shape: [good for good, lay in zip(ok, layouts) if lay[0][0] == shape] for shape in inspector.classes
            }
            result["prompt_fidelity"]["single_object_by_shape"] = {
                s: float(np.mean(v)) if v else None for s, v in verdicts.items()
            }
        shown += list(zip(images, layouts, readings, ok))[:12]
        logger.info("prompt fidelity %s: %.3f", key, score)
    if grid is not None:
        fidelity_grid(*map(list, zip(*shown)), path=grid)
    result["codec"] = codec_quality(backbone, inspector, params)
    if export_dir is not None:
        result["label_agreement"] = label_agreement(inspector, export_dir, params.world.classes)
        if real_images is not None:
            generated = from_export(export_dir, limit=cfg.num_frechet).images
            result["frechet"] = frechet_distance(inspector.features(generated), inspector.features(real_images))
    return result


def fidelity_curve(params: Params, inspector: Inspector, num: int = 48) -> list[dict]:
    """Prompt fidelity of every pretraining snapshot (``num`` images per group): is more compute the lever?"""
    from datasetdm.backbones.pretrain_sd import snapshot_components, snapshots
    from datasetdm.backbones.sd import StableDiffusionBackbone

    small = dataclasses.replace(params, inspect=dataclasses.replace(params.inspect, num_fidelity=num))
    rows = []
    for step, folder in snapshots(params):
        backbone = StableDiffusionBackbone(snapshot_components(params, folder))
        fidelity = measure_backbone(backbone, inspector, small)["prompt_fidelity"]
        meta = json.loads((folder / "meta.json").read_text())
        rows.append(
            {
                "step": step,
                "minutes": round(meta["minutes"], 2),
                "loss": meta["loss"],
                "single_object": fidelity["single_object"],
                "two_objects": fidelity["two_objects"],
            }
        )
        logger.info("snapshot %d: fidelity %.3f / %.3f", step, fidelity["single_object"], fidelity["two_objects"])
    return rows
