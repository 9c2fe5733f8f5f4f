"""Keypoint AP with pycocotools' COCOeval, made fair to symmetric shapes.

Two departures from person keypoints, both forced by the shapes world:

* Categories have different keypoint counts (a triangle 4, a hexagon 7), and
  COCOeval takes one ``kpt_oks_sigmas`` array for all of them, so it runs once per
  category and the reported AP is the mean over categories (as COCO's own AP is).
* A square's corners have no identity: its "corner1" is wherever the shape's
  rotation put it. OKS is computed for every cyclic shift of the ground truth's
  corners (the centre stays first) and the best shift counts, so a prediction that
  lists the right corners in the right clockwise order is not penalised for
  starting one corner later. Direction still matters (clockwise, like the world).

Every keypoint gets the same OKS sigma, ``OKS_SIGMA`` (0.1; COCO's person sigmas run
0.025..0.107): on a 16-pixel shape an error of ~2 px is then OKS ~0.9, ~5 px ~0.5.
"""

from __future__ import annotations

import numpy as np
from pycocotools.cocoeval import COCOeval

from datasetdm.evaluate.coco_eval import coco_stats
from datasetdm.worlds.shapes import KEYPOINT_NAMES

OKS_SIGMA = 0.1


class SymmetricKeypointEval(COCOeval):
    """COCOeval (iouType "keypoints") whose OKS is the best over cyclic shifts of the corners."""

    def computeOks(self, imgId, catId):  # noqa: N802 -- COCOeval's name
        p = self.params
        gts, dts = self._gts[imgId, catId], self._dts[imgId, catId]
        dts = [dts[i] for i in np.argsort([-d["score"] for d in dts], kind="mergesort")][: p.maxDets[-1]]
        if not gts or not dts:
            return []
        var = (np.asarray(p.kpt_oks_sigmas) * 2) ** 2
        ious = np.zeros((len(dts), len(gts)))
        for j, gt in enumerate(gts):
            g = np.asarray(gt["keypoints"], dtype=np.float64).reshape(-1, 3)
            shifts = [np.concatenate([g[:1], np.roll(g[1:], -s, axis=0)]) for s in range(max(len(g) - 1, 1))]
            for i, dt in enumerate(dts):
                d = np.asarray(dt["keypoints"], dtype=np.float64).reshape(-1, 3)
                ious[i, j] = max(_oks(d, gs, gt, var) for gs in shifts)
        return ious


def _oks(d: np.ndarray, g: np.ndarray, gt: dict, var: np.ndarray) -> float:
    """COCOeval's OKS for one pair (same formula, including its no-visible-keypoints case)."""
    visible = g[:, 2] > 0
    if visible.any():
        dx, dy = d[:, 0] - g[:, 0], d[:, 1] - g[:, 1]
    else:
        x, y, w, h = gt["bbox"]
        dx = np.maximum(0, x - w - d[:, 0]) + np.maximum(0, d[:, 0] - (x + 2 * w))
        dy = np.maximum(0, y - h - d[:, 1]) + np.maximum(0, d[:, 1] - (y + 2 * h))
    e = (dx**2 + dy**2) / var / (gt["area"] + np.spacing(1)) / 2
    if visible.any():
        e = e[visible]
    return float(np.exp(-e).sum() / len(e))


class KeypointAP:
    """Collects ground-truth and predicted keypoints image by image, then scores them per category."""

    def __init__(self, classes: tuple[str, ...]) -> None:
        self.classes = classes
        self.images: list[dict] = []
        self.gt: list[dict] = []
        self.dt: list[dict] = []

    def update(
        self,
        image_id: int,
        size: tuple[int, int],
        gt: list[tuple[str, np.ndarray, float, list[float]]],
        predicted: list[tuple[int, np.ndarray, float]],
    ) -> None:
        """gt: (class name, (K, 3) keypoints, area, bbox) per instance; predicted: (category id, (K, 3), score)."""
        self.images.append({"id": image_id, "height": int(size[0]), "width": int(size[1])})
        for name, kps, area, bbox in gt:
            if name not in self.classes:
                continue
            kps = np.asarray(kps, dtype=np.float64).reshape(-1, 3)
            self.gt.append(
                {
                    "id": len(self.gt) + 1,
                    "image_id": image_id,
                    "category_id": 1 + self.classes.index(name),
                    "keypoints": kps.reshape(-1).tolist(),
                    "num_keypoints": int((kps[:, 2] > 0).sum()),
                    "area": float(area),
                    "bbox": [float(v) for v in bbox],
                    "iscrowd": 0,
                }
            )
        for k, kps, score in predicted:
            self.dt.append(
                {
                    "image_id": image_id,
                    "category_id": int(k),
                    "keypoints": np.asarray(kps, dtype=np.float64).reshape(-1).tolist(),
                    "score": float(score),
                }
            )

    def result(self) -> dict:
        """AP, AP50 (means over categories with labelled keypoints) and per-category AP."""
        per_class: dict[str, float] = {}
        ap50: list[float] = []
        for k, name in enumerate(self.classes, start=1):
            gts = [g for g in self.gt if g["category_id"] == k and g["num_keypoints"] > 0]
            if not gts:
                continue
            dts = [d for d in self.dt if d["category_id"] == k]
            if not dts:
                per_class[name] = 0.0
                ap50.append(0.0)
                continue
            dataset = {
                "images": self.images,
                "annotations": [g for g in self.gt if g["category_id"] == k],
                "categories": [{"id": k, "name": name, "keypoints": list(KEYPOINT_NAMES[name])}],
            }
            stats = coco_stats(
                dataset,
                dts,
                "keypoints",
                SymmetricKeypointEval,
                catIds=[k],
                kpt_oks_sigmas=np.full(len(KEYPOINT_NAMES[name]), OKS_SIGMA),
            )
            per_class[name] = max(float(stats[0]), 0.0)  # -1 means "no ground truth"; excluded above
            ap50.append(max(float(stats[1]), 0.0))
        if not per_class:
            return {"AP": float("nan"), "AP50": float("nan"), "num_instances": 0, "per_class_AP": {}}
        return {
            "AP": float(np.mean(list(per_class.values()))),
            "AP50": float(np.mean(ap50)),
            "num_instances": sum(g["num_keypoints"] > 0 for g in self.gt),
            "per_class_AP": per_class,
            "oks_sigma": OKS_SIGMA,
        }
