"""One way to run pycocotools' COCOeval on in-memory ground truth and detections."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def coco_stats(
    dataset: dict[str, Any], detections: list[dict], iou_type: str, evaluator: type[COCOeval] = COCOeval, **params: Any
) -> np.ndarray:
    """``COCOeval.stats`` for ``detections`` (non-empty) against the ground-truth COCO ``dataset``.

    ``params`` are set on ``COCOeval.params`` before evaluating (e.g. ``catIds``,
    ``kpt_oks_sigmas``). COCOeval prints its table; the caller keeps the numbers.
    """
    gt = COCO()
    gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = evaluator(gt, gt.loadRes(detections), iouType=iou_type)
        for key, value in params.items():
            setattr(ev.params, key, value)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats
