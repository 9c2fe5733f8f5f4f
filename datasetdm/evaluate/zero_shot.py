"""Open-vocabulary masks: a class with no labelled real image, named in the prompt.

The P-Decoder only knows the classes it was trained on, but the backbone knows every
word of its vocabulary. For an unseen class the decoder still says *where objects
are* (one minus background probability), and cross-attention says *which named
word* each object pixel belongs to: a foreground pixel whose strongest named
attention map is an unseen class's gets that class. With ``decoder.class_source:
attention`` (how generation labels) every foreground pixel takes its strongest named
class, seen or unseen. Reported as the seed paper's
table does: mIoU over seen classes, over unseen classes, and their harmonic mean.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from datasetdm.backbones.base import Backbone
from datasetdm.config import BackboneConfig
from datasetdm.decoder.inputs import (
    class_attention,
    named_class_mask,
    restrict_logits,
    semantic_labels,
    strongest_named,
)
from datasetdm.decoder.model import PDecoder
from datasetdm.decoder.train import images_tensor
from datasetdm.evaluate.semantic import confusion_matrix, iou_from_confusion
from datasetdm.realset import LabelledImage


@torch.no_grad()
def zero_shot_labels(
    decoder: PDecoder,
    backbone: Backbone,
    images: torch.Tensor,
    prompts: list[str],
    *,
    seen: tuple[str, ...],
    unseen: tuple[str, ...],
    timestep: int,
    seeds: list[int],
) -> torch.Tensor:
    """(B, H, W) labels over seen + unseen classes (0 background, 1 + index into seen + unseen)."""
    feats = backbone.extract_features(images, prompts, timestep, seeds)
    every = seen + unseen
    logits = decoder(feats.maps, class_attention(feats, backbone, seen), images)["semantic"]
    probs = restrict_logits(logits, named_class_mask(prompts, backbone, seen)).softmax(1)
    named = named_class_mask(prompts, backbone, every)
    attention = class_attention(feats, backbone, every)
    if decoder.class_source == "attention":
        # as generation labels: every object pixel takes its strongest named class, seen or not
        return semantic_labels(probs, attention, named, "attention")
    best = strongest_named(attention, named[:, 1:], images.shape[-2:])  # index into ``every``
    foreground = probs[:, 0] < 0.5
    to_unseen = foreground & (best >= len(seen))
    return torch.where(to_unseen, best + 1, probs.argmax(1))


def evaluate_zero_shot(
    backbone: Backbone,
    decoder: PDecoder,
    test: list[LabelledImage],
    bb: BackboneConfig,
    *,
    unseen: tuple[str, ...],
    batch_size: int = 16,
) -> dict:
    """Seen, unseen and harmonic mIoU of ``zero_shot_labels`` on held-out images showing ``unseen`` classes."""
    seen = tuple(decoder.config["classes"])
    n = 1 + len(seen) + len(unseen)
    conf = np.zeros((n, n), dtype=np.int64)
    for start in tqdm(range(0, len(test), batch_size), desc="zero-shot", unit="batch", mininterval=2):
        chunk = test[start : start + batch_size]
        images = images_tensor([x.image for x in chunk])
        labels = zero_shot_labels(
            decoder,
            backbone,
            images,
            [x.caption for x in chunk],
            seen=seen,
            unseen=unseen,
            timestep=bb.feature_timestep,
            seeds=[2 * 10**9 + x.id for x in chunk],
        )
        for p, x in zip(labels.numpy(), chunk):
            conf += confusion_matrix(p, x.semantic, n)
    iou = iou_from_confusion(conf)
    seen_miou, unseen_miou = float(np.nanmean(iou[1 : 1 + len(seen)])), float(np.nanmean(iou[1 + len(seen) :]))
    harmonic = 2 * seen_miou * unseen_miou / (seen_miou + unseen_miou) if seen_miou + unseen_miou > 0 else 0.0
    return {
        "unseen_classes": list(unseen),
        "mIoU_seen": seen_miou,
        "mIoU_unseen": unseen_miou,
        "harmonic": harmonic,
        "per_class_iou": {
            name: (None if np.isnan(v) else float(v)) for name, v in zip(["background", *seen, *unseen], iou)
        },
        "num_images": len(test),
    }
