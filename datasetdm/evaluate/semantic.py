"""Semantic-segmentation quality of the P-Decoder on held-out real images.

The held-out set is never used for training, tuning or checkpoint choice: it is
read only here. Features come from noised real images exactly as in decoder
training (encode, noise to the feature timestep, one UNet pass with the caption).
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from datasetdm.backbones.base import Backbone
from datasetdm.config import BackboneConfig
from datasetdm.decoder.model import PDecoder
from datasetdm.decoder.train import images_tensor, predict_semantic
from datasetdm.realset import LabelledImage


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_labels: int) -> np.ndarray:
    """(num_labels, num_labels) counts, rows = truth, columns = prediction."""
    idx = target.astype(np.int64) * num_labels + pred.astype(np.int64)
    return np.bincount(idx.ravel(), minlength=num_labels**2).reshape(num_labels, num_labels)


def iou_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Per-label IoU; NaN for a label absent from both truth and prediction."""
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def evaluate_semantic(backbone: Backbone, decoder: PDecoder, test: list[LabelledImage], bb: BackboneConfig, batch_size: int = 16) -> dict:
    """mIoU over background + classes (VOC convention), pixel accuracy and per-class IoU."""
    classes = tuple(decoder.config["classes"])
    n = 1 + len(classes)
    conf = np.zeros((n, n), dtype=np.int64)
    for start in tqdm(range(0, len(test), batch_size), desc="evaluate", unit="batch", mininterval=2):
        chunk = test[start:start + batch_size]
        images = images_tensor([x.image for x in chunk])
        feats = backbone.extract_features(images, [x.caption for x in chunk], bb.feature_timestep, [10**9 + x.id for x in chunk])
        pred = predict_semantic(decoder, backbone, feats, images, classes).argmax(1).cpu().numpy()
        for p, x in zip(pred, chunk):
            conf += confusion_matrix(p, x.semantic, n)
    iou = iou_from_confusion(conf)
    names = ["background", *classes]
    return {
        "mIoU": float(np.nanmean(iou)),
        "mIoU_classes": float(np.nanmean(iou[1:])),
        "pixel_accuracy": float(np.diag(conf).sum() / conf.sum()),
        "per_class_iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(names, iou)},
        "num_images": len(test),
    }
