"""Downstream models scored on held-out real images with the P-Decoder's own metrics.

semantic: mIoU; instances: COCO mask AP of the semantic model's connected components;
depth: AbsRel / RMSE / delta < 1.25; keypoints: symmetric COCO keypoint AP of the
keypoint model's heatmaps grouped over its own instances.
"""

from __future__ import annotations

import numpy as np
import torch

from datasetdm.downstream.models import SmallUNet, to_input
from datasetdm.evaluate.depth import DepthMetrics
from datasetdm.evaluate.instances import InstanceAP, instances_from_semantic
from datasetdm.evaluate.keypoints import KeypointAP
from datasetdm.evaluate.semantic import confusion_matrix, iou_from_confusion
from datasetdm.keypoints import gt_keypoints, predict_keypoints
from datasetdm.realset import LabelledImage


@torch.no_grad()
def evaluate_model(
    task: str, model: SmallUNet, test: list[LabelledImage], classes: tuple[str, ...], *, batch_size: int = 64
) -> dict:
    """Metrics of one trained downstream model on ``test``."""
    n = 1 + len(classes)
    conf = np.zeros((n, n), dtype=np.int64)
    instances, keypoints, depth = InstanceAP(classes), KeypointAP(classes), DepthMetrics()
    for start in range(0, len(test), batch_size):
        chunk = test[start : start + batch_size]
        out = model(to_input(np.stack([x.image for x in chunk])))
        if task == "depth":
            for p, x in zip(out[:, 0].exp().numpy(), chunk):
                depth.update(p, x.depth)
            continue
        probs = out[:, :n].softmax(1).numpy()
        heat = out[:, n:].sigmoid().numpy() if task == "keypoints" else [None] * len(chunk)
        for p, h, x in zip(probs, heat, chunk):
            labels = p.argmax(0)
            found = instances_from_semantic(labels, p)
            if task == "semantic":
                conf += confusion_matrix(labels, x.semantic, n)
                instances.update(x.id, x.instance_masks, x.instance_classes, found)
            else:
                keypoints.update(
                    x.id,
                    labels.shape,
                    gt_keypoints(x.instance_masks, x.instance_classes, x.keypoints),
                    predict_keypoints(found, h, classes),
                )
    if task == "depth":
        return depth.result()
    if task == "keypoints":
        return keypoints.result()
    iou = iou_from_confusion(conf)
    return {
        "mIoU": float(np.nanmean(iou)),
        "per_label_iou": [None if np.isnan(v) else float(v) for v in iou],
        "instances": instances.result(),
    }
