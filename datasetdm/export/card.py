"""The dataset card: what is in an exported dataset and how to make it again.

A card is a plain dict written as ``dataset.json`` beside the data. It holds nothing
time- or machine-dependent, so the same inputs give a byte-identical card and DVC
sees an unchanged output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from datasetdm.realset import DEPTH_SCALE

FORMATS = {
    "images": "images/<id>.png, RGB uint8",
    "masks": "masks/<id>.png, PASCAL VOC palette PNG; pixel value = category id (0 = background)",
    "annotations": "annotations.json, COCO; one RLE annotation per object instance (connected piece of a class); "
    "keypoints per instance (COCO order, corners clockwise from 12 o'clock) when the decoder has a keypoint head",
    "depth": "depth/<id>.png, 16-bit greyscale PNG, metres = value / depth_scale (when the decoder has a depth head)",
    "embeddings": "embeddings.npy, (N, D) float16, row i = annotations.json images[i]: the backbone's pooled "
    "features (unit length); images[i].class_probs: the decoder's class distribution over its object pixels",
}


def class_histogram(label_counts: Sequence[np.ndarray], classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per class: how many images contain it, and its share of all pixels.

    label_counts: one array per image, ``np.bincount(semantic.ravel(), minlength=1 + C)``.
    """
    if label_counts:
        counts = np.stack([np.asarray(c[: 1 + len(classes)], dtype=np.int64) for c in label_counts])
    else:
        counts = np.zeros((0, 1 + len(classes)), dtype=np.int64)
    total = int(counts.sum())
    return {
        name: {
            "images": int((counts[:, k] > 0).sum()),
            "pixel_fraction": round(float(counts[:, k].sum()) / total, 6) if total else 0.0,
        }
        for k, name in enumerate(classes, start=1)
    }


def build_card(
    *,
    classes: Sequence[str],
    image_size: int,
    generated: Sequence[dict],
    kept: Sequence[dict],
    label_counts: Sequence[np.ndarray],
    min_score: float | None,
    params: dict[str, Any],
    backbone: str,
    decoder: str,
    files: dict[str, str],
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the card.

    generated: every generation record (``id``, ``prompt``, ``seed``, ``scheduler``,
    ``steps``, ``guidance_scale``, ``feature_timestep``, ``label_cleaning``), kept or not -- reproducing
    the dataset means regenerating all of them and filtering again. kept: the
    exported samples' ``{"id", "score"}``, with ``label_counts`` in the same order.
    files: relative name -> sha256 of each exported file or folder.

    ``samples`` lists every generated sample's prompt and seed, so one sample can be
    made again from the card alone: the models named by their hashes, sampled with
    ``reproduce``'s scheduler settings, give the same pixels and the same mask.
    """
    seeds = [int(r["seed"]) for r in generated]
    first = generated[0] if generated else {}
    scores = [float(s["score"]) for s in kept]
    kept_ids = {s["id"] for s in kept}
    return {
        "classes": list(classes),
        "image_size": image_size,
        "depth_scale": DEPTH_SCALE,
        "counts": {"generated": len(generated), "kept": len(kept), "dropped": len(generated) - len(kept)},
        "scores": {
            "min_score": min_score,
            "kept_min": round(min(scores), 6) if scores else None,
            "kept_mean": round(float(np.mean(scores)), 6) if scores else None,
        },
        "class_histogram": class_histogram(label_counts, classes),
        "models": {"backbone": backbone, "decoder": decoder},
        "formats": FORMATS,
        "files": dict(sorted(files.items())),
        "reproduce": {
            "scheduler": first.get("scheduler"),
            "steps": first.get("steps"),
            "guidance_scale": first.get("guidance_scale"),
            "feature_timestep": first.get("feature_timestep"),
            "label_cleaning": first.get("label_cleaning"),
            "seeds": {"min": min(seeds), "max": max(seeds)} if seeds else None,
            "prompts": len({r["prompt"] for r in generated}),
        },
        "samples": [
            {"id": r["id"], "prompt": r["prompt"], "seed": int(r["seed"]), "kept": r["id"] in kept_ids}
            for r in generated
        ],
        "params": params,
        # git revision and DVC remote/hashes of the inputs (datasetdm.provenance), if known
        **({"provenance": provenance} if provenance is not None else {}),
    }
