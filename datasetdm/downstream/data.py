"""Training sets for downstream models: the K real images, the synthetic export, or both.

Every set carries what the downstream tasks train on: images, semantic labels, depth
(metres, 0 = unknown; None if the set has none) and keypoint heatmaps rendered from
COCO keypoints. The synthetic set is read from the export the way a user would read
it: the COCO file through pycocotools, masks and depth from their PNGs.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from datasetdm.errors import DatasetDMError
from datasetdm.export.verify import CARD, verify_export
from datasetdm.keypoints import render_heatmaps
from datasetdm.realset import DEPTH_SCALE, LabelledImage


@dataclass
class ArraySet:
    """Images (N, H, W, 3) uint8, semantic labels (N, H, W) uint8 (0 = background),
    depth (N, H, W) float32 metres or None, keypoint heatmaps (N, 2, H, W) float32 or None."""

    images: np.ndarray
    semantic: np.ndarray
    depth: np.ndarray | None = None
    heatmaps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)


def from_labelled(items: list[LabelledImage]) -> ArraySet:
    depth = None
    if all(x.depth is not None for x in items):
        depth = np.stack([x.depth for x in items]).astype(np.float32)
    heat = np.stack([render_heatmaps(x.keypoints, x.semantic.shape) for x in items])
    return ArraySet(
        np.stack([x.image for x in items]), np.stack([x.semantic for x in items]).astype(np.uint8), depth, heat
    )


def from_export(export_dir: str | Path, limit: int | None = None) -> ArraySet:
    """The kept synthetic samples of an export (images/, VOC masks/, depth/, COCO keypoints), in card order.

    The export is first checked against the hashes its card records (``verify_export``),
    so an edited mask or image stops here, never reaching a model or a metric.
    """
    export_dir = Path(export_dir)
    card_file = export_dir / CARD
    card = verify_export(export_dir)
    try:
        kept = [s["id"] for s in card["samples"] if s["kept"]]
        scale = float(card.get("depth_scale", DEPTH_SCALE))
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetDMError(card_file, "samples", f"not a dataset card ({e})") from None
    kept = kept[:limit] if limit is not None else kept
    if not kept:
        raise DatasetDMError(card_file, "samples", "the export holds no kept samples")
    images = [_read(export_dir / "images" / f"{sid}.png", "RGB") for sid in kept]
    masks = [_read(export_dir / "masks" / f"{sid}.png", None) for sid in kept]
    depth = None
    if all((export_dir / "depth" / f"{sid}.png").is_file() for sid in kept):
        depth = np.stack([_read(export_dir / "depth" / f"{sid}.png", None).astype(np.float32) / scale for sid in kept])
    heat = _heatmaps(export_dir / "annotations.json", kept, masks[0].shape)
    return ArraySet(np.stack(images), np.stack(masks).astype(np.uint8), depth, heat)


def _heatmaps(coco_file: Path, kept: list[str], size: tuple[int, ...]) -> np.ndarray | None:
    """Heatmaps from the export's COCO keypoints, or None if its annotations carry none."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress chatter
            coco = COCO(str(coco_file))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetDMError(coco_file, None, f"not a readable COCO file ({e})") from None
    anns = coco.dataset.get("annotations", [])
    if not anns or not all("keypoints" in a for a in anns):
        return None
    by_image: dict[str, list[np.ndarray]] = defaultdict(list)
    for a in anns:
        name = Path(coco.imgs[a["image_id"]]["file_name"]).stem
        by_image[name].append(np.asarray(a["keypoints"], dtype=np.float32).reshape(-1, 3))
    return np.stack([render_heatmaps(by_image.get(sid, []), size[:2]) for sid in kept])


def _read(file: Path, mode: str | None) -> np.ndarray:
    try:
        with Image.open(file) as im:
            return np.asarray(im.convert(mode) if mode else im)
    except (OSError, ValueError) as e:
        raise DatasetDMError(file, None, f"unreadable image ({e})") from None
