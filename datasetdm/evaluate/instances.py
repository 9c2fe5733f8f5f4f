"""Instance masks by grouping, scored with COCO mask AP (pycocotools COCOeval).

The decoder's semantic labels are split into connected components, one instance
each, scored by the mean class probability inside. Objects of one class that touch
merge into one instance: that is this grouping's known limit, and the AP says how
much it costs on held-out real images (whose instances are exact).
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

from datasetdm.evaluate.coco_eval import coco_stats

MIN_PIXELS = 8  # smaller components are speckle, not objects


def instances_from_semantic(labels: np.ndarray, probs: np.ndarray) -> list[tuple[int, np.ndarray, float]]:
    """(category_id, bool mask, score) per connected component of each class in ``labels`` (H, W).

    ``probs`` is (1 + C, H, W).
    """
    out = []
    for k in range(1, probs.shape[0]):
        components, n = ndimage.label(labels == k)
        for j in range(1, n + 1):
            mask = components == j
            if mask.sum() >= MIN_PIXELS:
                out.append((k, mask, float(probs[k][mask].mean())))
    return out


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


class InstanceAP:
    """Collects ground-truth and predicted instances image by image, then runs COCOeval."""

    def __init__(self, classes: tuple[str, ...]) -> None:
        self.classes = classes
        self.images: list[dict] = []
        self.gt: list[dict] = []
        self.dt: list[dict] = []

    def update(
        self,
        image_id: int,
        gt_masks: np.ndarray,
        gt_classes: list[str],
        predicted: list[tuple[int, np.ndarray, float]],
    ) -> None:
        h, w = gt_masks.shape[-2:] if len(gt_masks) else predicted[0][1].shape if predicted else (0, 0)
        self.images.append({"id": image_id, "width": int(w), "height": int(h)})
        for mask, name in zip(gt_masks, gt_classes):
            if name in self.classes and mask.any():
                rle = _rle(mask)
                self.gt.append(
                    {
                        "id": len(self.gt) + 1,
                        "image_id": image_id,
                        "category_id": 1 + self.classes.index(name),
                        "segmentation": rle,
                        "area": float(mask_utils.area(rle)),
                        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                        "iscrowd": 0,
                    }
                )
        for k, mask, score in predicted:
            self.dt.append({"image_id": image_id, "category_id": k, "segmentation": _rle(mask), "score": score})

    def result(self) -> dict[str, float]:
        if not self.gt:
            return {"AP": float("nan"), "AP50": float("nan"), "num_instances": 0}
        if not self.dt:
            return {"AP": 0.0, "AP50": 0.0, "num_instances": len(self.gt)}
        dataset = {
            "images": self.images,
            "annotations": self.gt,
            "categories": [{"id": 1 + i, "name": c} for i, c in enumerate(self.classes)],
        }
        stats = coco_stats(dataset, self.dt, "segm")
        return {"AP": float(stats[0]), "AP50": float(stats[1]), "num_instances": len(self.gt)}
