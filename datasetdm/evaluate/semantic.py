"""Semantic-segmentation quality of the P-Decoder on held-out real images.

The held-out set is never used for training, tuning or checkpoint choice: it is
read only here. Features come from noised real images exactly as in decoder
training (encode, noise to the feature timestep, one UNet pass with the caption).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasetdm.backbones.base import Backbone
from datasetdm.config import BackboneConfig
from datasetdm.decoder.inputs import (
    class_attention,
    named_class_mask,
    prompt_classes,
    restrict_logits,
    semantic_labels,
)
from datasetdm.decoder.model import PDecoder
from datasetdm.decoder.train import images_tensor
from datasetdm.evaluate.depth import DepthMetrics
from datasetdm.evaluate.instances import InstanceAP, instances_from_semantic
from datasetdm.evaluate.keypoints import KeypointAP
from datasetdm.filtering import quality_components, quality_score
from datasetdm.keypoints import gt_keypoints, predict_keypoints
from datasetdm.realset import LabelledImage

logger = logging.getLogger(__name__)


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


def semantic_metrics(conf: np.ndarray, classes: tuple[str, ...]) -> dict:
    """mIoU over background + classes (VOC convention), pixel accuracy and per-class IoU."""
    iou = iou_from_confusion(conf)
    names = ["background", *classes]
    return {
        "mIoU": float(np.nanmean(iou)),
        "mIoU_classes": float(np.nanmean(iou[1:])),
        "pixel_accuracy": float(np.diag(conf).sum() / conf.sum()),
        "per_class_iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(names, iou)},
    }


def fit_attention_threshold(
    backbone: Backbone,
    labelled: list[LabelledImage],
    bb: BackboneConfig,
    classes: tuple[str, ...],
    *,
    grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
) -> float:
    """The attention-only baseline's one knob, chosen on the K *labelled training* images
    (never the held-out set), so the baseline gets the same labels the decoder got."""
    n = 1 + len(classes)
    conf = {t: np.zeros((n, n), dtype=np.int64) for t in grid}
    images = images_tensor([x.image for x in labelled])
    feats = backbone.extract_features(
        images, [x.caption for x in labelled], bb.feature_timestep, [x.id for x in labelled]
    )
    attention = class_attention(feats, backbone, classes).cpu()
    named = named_class_mask(feats.prompts, backbone, classes)
    for t in grid:
        for p, x in zip(attention_masks(attention, named, images.shape[-2:], t).numpy(), labelled):
            conf[t] += confusion_matrix(p, x.semantic, n)
    miou = {t: float(np.nanmean(iou_from_confusion(conf[t]))) for t in grid}
    best = max(grid, key=lambda t: miou[t])
    logger.info("attention-only baseline: threshold %.2f chosen on the labelled set (mIoU %.4f)", best, miou[best])
    return best


def evaluate_decoder(
    backbone: Backbone,
    decoder: PDecoder,
    test: list[LabelledImage],
    bb: BackboneConfig,
    *,
    min_score: float = 0.5,
    attention_threshold: float = 0.5,
    batch_size: int = 16,
) -> dict:
    """Every head of the decoder on held-out real images, plus two references.

    ``semantic`` is the decoder as generation uses it (choosing among the classes the
    caption names, by its ``class_source``: ``decoder.inputs.semantic_labels``);
    ``semantic_decoder_classes`` takes the named class from the decoder's own argmax
    whatever the source; ``semantic_unrestricted`` lets every class compete, and
    ``attention_only`` is the training-free DiffuMask-style baseline (each named
    class's cross-attention map thresholded at half its peak; the highest wins).
    ``instances`` is COCO mask AP of connected components of the semantic labels;
    ``keypoints`` is keypoint AP (``evaluate/keypoints.py``) of the keypoints those
    instances take from the keypoint heatmaps; ``depth`` is AbsRel, RMSE and delta < 1.25.

    ``filter`` measures the quality filter where truth exists: the same score the
    filter gives generated samples is computed for each real test image, and the
    per-image mIoU of images it would keep (score >= ``min_score``, the threshold
    from params, never tuned here) is compared with that of all images.
    """
    classes = tuple(decoder.config["classes"])
    n = 1 + len(classes)
    kinds = ("semantic", "semantic_decoder_classes", "semantic_unrestricted", "attention_only")
    conf = {k: np.zeros((n, n), dtype=np.int64) for k in kinds}
    depth = DepthMetrics() if "depth" in decoder.config["heads"] else None
    instances = InstanceAP(classes)
    keypoints = KeypointAP(classes) if "keypoints" in decoder.config["heads"] else None
    scores: list[float] = []
    image_miou: list[float] = []
    for start in tqdm(range(0, len(test), batch_size), desc="evaluate", unit="batch", mininterval=2):
        chunk = test[start : start + batch_size]
        device = next(decoder.parameters()).device
        images = images_tensor([x.image for x in chunk]).to(device)
        feats = backbone.extract_features(
            images, [x.caption for x in chunk], bb.feature_timestep, [10**9 + x.id for x in chunk]
        ).to(device)
        attention = class_attention(feats, backbone, classes)
        with torch.no_grad():
            out = decoder(feats.maps, attention, images)
        named = named_class_mask(feats.prompts, backbone, classes)
        restricted = restrict_logits(out["semantic"], named)
        preds = {
            "semantic": semantic_labels(restricted.softmax(1), attention, named, decoder.class_source),
            "semantic_decoder_classes": restricted.argmax(1),
            "semantic_unrestricted": out["semantic"].argmax(1),
            "attention_only": attention_masks(attention, named, images.shape[-2:], attention_threshold),
        }
        for k, pred in preds.items():
            for p, x in zip(pred.cpu().numpy(), chunk):
                conf[k] += confusion_matrix(p, x.semantic, n)
        probs = restricted.softmax(1).cpu().numpy()
        heat = out["keypoints"].sigmoid().cpu().numpy() if keypoints is not None else [None] * len(chunk)
        for p, labels, h, x in zip(probs, preds["semantic"].cpu().numpy(), heat, chunk):
            found = instances_from_semantic(labels, p)
            instances.update(x.id, x.instance_masks, x.instance_classes, found)
            if keypoints is not None:
                keypoints.update(
                    x.id,
                    labels.shape,
                    gt_keypoints(x.instance_masks, x.instance_classes, x.keypoints),
                    predict_keypoints(found, h, classes),
                )
            image_miou.append(float(np.nanmean(iou_from_confusion(confusion_matrix(labels, x.semantic, n)))))
        wanted = [[classes.index(c) for c in prompt_classes(prompt, backbone, classes)] for prompt in feats.prompts]
        scores += [quality_score(q) for q in quality_components(torch.from_numpy(probs), attention.cpu(), wanted)]
        if depth is not None:
            metres = decoder.depth_labels(out["depth"].exp(), preds["semantic"])  # as generation stores them
            for p, x in zip(metres.cpu().numpy(), chunk):
                if x.depth is not None:
                    depth.update(p, x.depth)
    metrics: dict = {k: semantic_metrics(c, classes) for k, c in conf.items()}
    metrics["attention_only"]["threshold"] = attention_threshold
    metrics["num_images"] = len(test)
    metrics["instances"] = instances.result()
    kept = np.array(scores) >= min_score
    per_image = np.array(image_miou)
    metrics["filter"] = {
        "min_score": min_score,
        "kept_fraction": float(kept.mean()),
        "image_mIoU_all": float(per_image.mean()),
        "image_mIoU_kept": float(per_image[kept].mean()) if kept.any() else None,
        "image_mIoU_dropped": float(per_image[~kept].mean()) if (~kept).any() else None,
    }
    logger.info("filter at min_score %.2f keeps %d of %d held-out images", min_score, int(kept.sum()), len(kept))
    if depth is not None:
        metrics["depth"] = depth.result()
    if keypoints is not None:
        metrics["keypoints"] = keypoints.result()
    return metrics


def attention_masks(
    attention: torch.Tensor, named: torch.Tensor, size: tuple[int, int], threshold: float = 0.5
) -> torch.Tensor:
    """Training-free labels from cross-attention alone: (B, H, W) class ids."""
    att = F.interpolate(attention, size=size, mode="bilinear", align_corners=False)
    att = att.masked_fill(~named.to(att.device)[:, 1:, None, None], 0)
    best, cls = att.max(1)
    return torch.where(best >= threshold, cls + 1, torch.zeros_like(cls))
