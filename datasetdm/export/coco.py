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
from scipy import ndimage
from pycocotools.coco import COCO

from datasetdm.io import write_json

SUPERCATEGORY = "shape"


def semantic_to_coco_annotations(semantic: np.ndarray, image_id: int, classes: Sequence[str],
                                 start_ann_id: int) -> list[dict[str, Any]]:
    """One COCO annotation per connected piece of each class in ``semantic``.

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
    for k, binary in pieces:
        rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
        area = float(mask_utils.area(rle))
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        rle["counts"] = rle["counts"].decode("ascii")  # bytes are not JSON
        annotations.append({"id": start_ann_id + len(annotations), "image_id": int(image_id), "category_id": k,
                            "segmentation": rle, "area": area, "bbox": bbox, "iscrowd": 0})
    return annotations


def _pieces(mask: np.ndarray) -> list[np.ndarray]:
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    return [labels == j for j in range(1, n + 1)]


def coco_categories(classes: Sequence[str]) -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": name, "supercategory": SUPERCATEGORY} for i, name in enumerate(classes)]


def write_coco(path: str | Path, images: list[dict], annotations: list[dict], classes: Sequence[str],
               info: dict[str, Any]) -> None:
    """Write a complete COCO JSON file atomically."""
    write_json(path, {"info": info, "licenses": [], "images": images, "annotations": annotations,
                      "categories": coco_categories(classes)})


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
