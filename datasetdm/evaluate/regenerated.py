"""The quality filter measured on generated images whose truth is known.

Generated samples have no ground truth, so the filter cannot be scored on them
directly. Here the backbone *regenerates* shapes-world scenes of known layout: each
scene is rendered, noised to ``strength`` of the sampling schedule and denoised with
its caption (SDEdit / img2img), which keeps the layout and redraws the pixels in the
backbone's own style. Each regenerated image is annotated exactly as generation
annotates (``annotate_batch``), scored exactly as the filter scores, and its labels
are compared with the known layout. If the filter works, the images it keeps agree
with their layouts better than the ones it drops.

The layouts come from their own seed range (``evaluate.regenerated_seed``), never the
held-out test images. Where the backbone drifts from the layout (it may move or
reshape an object at high strength), the disagreement counts against the sample:
that is a generation error the filter should catch too.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm import tqdm

from datasetdm.backbones.base import Backbone
from datasetdm.config import BackboneConfig, WorldConfig
from datasetdm.decoder.model import PDecoder
from datasetdm.decoder.train import images_tensor
from datasetdm.evaluate.semantic import confusion_matrix, iou_from_confusion
from datasetdm.filtering import quality_score
from datasetdm.generate import annotate_batch
from datasetdm.worlds.shapes import render_scene

logger = logging.getLogger(__name__)


def filter_on_regenerated(
    backbone: Backbone,
    decoder: PDecoder,
    world: WorldConfig,
    bb: BackboneConfig,
    *,
    min_score: float,
    num: int,
    seed: int,
    strength: float,
    batch_size: int = 16,
) -> dict:
    """Per-image mIoU (decoder labels vs known layout) of regenerated scenes the filter keeps, drops, and all."""
    classes = tuple(decoder.config["classes"])
    n = 1 + len(classes)
    scores: list[float] = []
    miou: list[float] = []
    for start in tqdm(range(0, num, batch_size), desc="filter on regenerated layouts", unit="batch", mininterval=2):
        scenes = [render_scene(world, seed + i) for i in range(start, min(start + batch_size, num))]
        images = images_tensor([s.image for s in scenes])
        made = annotate_batch(
            backbone,
            decoder,
            [s.caption for s in scenes],
            [seed + start + j for j in range(len(scenes))],
            classes=classes,
            bb=bb,
            init_images=images,
            strength=strength,
        )
        for scene, labels, q in zip(scenes, made.labels, made.quality):
            scores.append(quality_score(q))
            miou.append(float(np.nanmean(iou_from_confusion(confusion_matrix(labels, scene.semantic, n)))))
    kept = np.array(scores) >= min_score
    per_image = np.array(miou)
    logger.info(
        "filter at min_score %.2f keeps %d of %d regenerated scenes (strength %.2f)",
        min_score,
        int(kept.sum()),
        num,
        strength,
    )
    return {
        "num_images": num,
        "strength": strength,
        "min_score": min_score,
        "kept_fraction": float(kept.mean()),
        "image_mIoU_all": float(per_image.mean()),
        "image_mIoU_kept": float(per_image[kept].mean()) if kept.any() else None,
        "image_mIoU_dropped": float(per_image[~kept].mean()) if (~kept).any() else None,
        # Does the score rank images the way their agreement with the truth does?
        "score_mIoU_correlation": float(np.corrcoef(scores, miou)[0, 1]) if num > 2 and np.std(scores) > 0 else None,
    }
