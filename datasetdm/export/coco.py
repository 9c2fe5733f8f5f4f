"""COCO annotations, encoded and decoded by pycocotools: one per object instance.

The decoder labels pixels with classes; each connected piece (8-connected) of a
class becomes one instance annotation with its own RLE mask, box and area, so the
file serves instance segmentation as it is and the union of a class's instances
is still exactly that class's pixels. ``iscrowd`` is 0 and ``category_id`` is
``1 + classes.index(name)`` -- the same number as the pixel value in the semantic
masks, so a mask can be rebuilt by painting each annotation with its category id.
Objects of one class that touch form one instance: that is the grouping's limit.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage

from datasetdm.io import write_json
from datasetdm.keypoints import group_keypoints
from datasetdm.worlds.shapes import KEYPOINT_NAMES

SUPERCATEGORY = "shape"


def semantic_to_coco_annotations(
    semantic: np.ndarray,
    *,
    image_id: int,
    classes: Sequence[str],
    start_ann_id: int,
    peaks: list[np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """One COCO annotation per connected piece of each class in ``semantic``.

    With ``peaks`` (the keypoint heatmap peaks of the image, ``datasetdm.keypoints``)
    each annotation also gets COCO ``keypoints`` / ``num_keypoints`` in its category's
    order.

    semantic: HxW integer class ids, 0 = background, k = 1 + index into ``classes``.
    Annotation ids run from ``start_ann_id`` upwards, in class order, then in raster
    order of each piece's first pixel. A value above
    ``len(classes)`` is a caller bug (the export stage validates masks first), so it
    raises ``ValueError``.
    """
    if semantic.ndim != 2:
        raise ValueError(f"semantic mask must be 2-D, got shape {semantic.shape}")
    top = int(semantic.max()) if semantic.size else 0
    if top > len(classes):
        raise ValueError(f"class index {top} but only {len(classes)} classes")
    annotations = []
    pieces = [(k, binary) for k in range(1, len(classes) + 1) for binary in _pieces(semantic == k)]
    grouped = group_keypoints([(classes[k - 1], binary) for k, binary in pieces], peaks) if peaks is not None else None
    for j, (k, binary) in enumerate(pieces):
        rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
        area = float(mask_utils.area(rle))
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        rle["counts"] = rle["counts"].decode("ascii")  # bytes are not JSON
        ann = {
            "id": start_ann_id + len(annotations),
            "image_id": int(image_id),
            "category_id": k,
            "segmentation": rle,
            "area": area,
            "bbox": bbox,
            "iscrowd": 0,
        }
        if grouped is not None:
            kps = grouped[j][0]
            ann["keypoints"] = [round(float(v), 3) for v in kps.reshape(-1)]
            ann["num_keypoints"] = int((kps[:, 2] > 0).sum())
        annotations.append(ann)
    return annotations


def _pieces(mask: np.ndarray) -> list[np.ndarray]:
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    return [labels == j for j in range(1, n + 1)]


def coco_categories(classes: Sequence[str], keypoints: bool = False) -> list[dict[str, Any]]:
    """Categories; with ``keypoints`` each lists its keypoint names and a skeleton (every point to the centre)."""
    cats: list[dict[str, Any]] = [
        {"id": i + 1, "name": name, "supercategory": SUPERCATEGORY} for i, name in enumerate(classes)
    ]
    if keypoints:
        for cat in cats:
            names = KEYPOINT_NAMES[cat["name"]]
            cat["keypoints"] = list(names)
            cat["skeleton"] = [[1, j] for j in range(2, len(names) + 1)]
    return cats


def write_coco(
    path: str | Path,
    images: list[dict],
    annotations: list[dict],
    classes: Sequence[str],
    *,
    info: dict[str, Any],
    keypoints: bool = False,
) -> None:
    """Write a complete COCO JSON file atomically."""
    write_json(
        path,
        {
            "info": info,
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": coco_categories(classes, keypoints),
        },
    )


def load_coco_masks(path: str | Path) -> dict[str, np.ndarray]:
    """Rebuild each image's semantic mask (HxW uint8) from a COCO file, keyed by file_name.

    Goes through ``pycocotools.coco.COCO`` and ``annToMask`` so it reads the file the
    way downstream users will. Assumes category ids are the mask's class ids, as
    written by ``write_coco``.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress chatter
        coco = COCO(str(path))
    masks = {}
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        semantic = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            semantic[coco.annToMask(ann) > 0] = ann["category_id"]
        masks[info["file_name"]] = semantic
    return masks
