"""Depth metrics as the depth-estimation literature reports them (NYU/KITTI convention)."""

from __future__ import annotations

import numpy as np


class DepthMetrics:
    """Accumulates AbsRel, RMSE and the delta < 1.25 accuracy over valid pixels."""

    def __init__(self) -> None:
        self.abs_rel = self.sq = self.delta1 = 0.0
        self.count = 0

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        valid = target > 0
        p, t = np.maximum(pred[valid].astype(np.float64), 1e-6), target[valid].astype(np.float64)
        self.abs_rel += float((np.abs(p - t) / t).sum())
        self.sq += float(((p - t) ** 2).sum())
        self.delta1 += float((np.maximum(p / t, t / p) < 1.25).sum())
        self.count += int(valid.sum())

    def result(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {"abs_rel": self.abs_rel / n, "rmse": (self.sq / n) ** 0.5, "delta1": self.delta1 / n}
