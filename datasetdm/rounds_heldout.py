"""Round-over-round quality on the held-out real set: what the rounds gave, never what steers them.

After round r the downstream semantic model is trained on the K real images and the
kept synthetic samples of rounds 0..r (the (c) arm of the uplift table, same recipe)
and scored on the held-out real images: mIoU and IoU per class. ``datasetdm.rounds``,
which plans the rounds, never reads these figures.
"""

from __future__ import annotations

import logging

import numpy as np

from datasetdm.config import Params
from datasetdm.downstream.data import from_labelled
from datasetdm.realset import load_real_set, real_set_split_dirs
from datasetdm.rounds import rounds_digest, semantic_scores, synthetic_union

logger = logging.getLogger(__name__)


def heldout_iou(params: Params, upto: int, seed: int, steps: int | None = None) -> dict:
    """mIoU and IoU per class on the held-out set of the (c) model trained on K real + rounds 0..upto
    (``downstream.steps`` steps, or ``steps``)."""
    classes = params.world.classes
    train_dir, test_dir = real_set_split_dirs(params.real.dir)
    sources = [from_labelled(load_real_set(train_dir, classes)), synthetic_union(params, upto)]
    desc = f"held-out model (K real + rounds 0-{upto})"
    return semantic_scores(params, sources, load_real_set(test_dir, classes), seed=seed, desc=desc, steps=steps)


def evaluate_rounds(params: Params, seals: list[dict], previous: dict | None = None) -> dict:
    """Metrics per round 0..len(seals) (``round_<r>``) and the last round's (``last``); rows for the DVC plot.

    A round whose seals (its own and every earlier one) match ``previous`` keeps its
    figures, so a nightly round trains one model, not one per round so far.
    """
    before = {k: v for k, v in (previous or {}).items() if k.startswith("round_")}
    metrics: dict = {"rounds": len(seals), "mode": params.steer.mode}
    plot = []
    kept = 0
    for r in range(len(seals) + 1):
        digest = rounds_digest(params, seals[:r])
        entry = before.get(f"round_{r}")
        if entry is None or entry.get("digest") != digest:
            scores = heldout_iou(params, r, seed=params.downstream.seed)
            entry = {
                "digest": digest,
                "mIoU": scores["mIoU"],
                **{f"iou_{c}": v for c, v in scores["iou"].items()},
            }
            if r:
                entry["kept"] = seals[r - 1]["kept"]
                entry.update({f"share_{c}": v for c, v in seals[r - 1]["class_shares"].items()})
            logger.info("round %d: held-out mIoU %.4f", r, entry["mIoU"])
        else:
            logger.info("round %d: held-out figures reused (same rounds)", r)
        kept += entry.get("kept", 0)
        metrics[f"round_{r}"] = entry
        for c in params.world.classes:
            plot.append({"round": r, "class": c, "run": c, "iou": entry[f"iou_{c}"]})
    metrics["last"] = {k: v for k, v in metrics[f"round_{len(seals)}"].items() if k != "digest"}
    metrics["synthetic_added"] = kept
    metrics["weakest_class_last"] = min(
        params.world.classes,
        key=lambda c: np.inf if metrics["last"][f"iou_{c}"] is None else metrics["last"][f"iou_{c}"],
    )
    return {"metrics": metrics, "plot": plot}
