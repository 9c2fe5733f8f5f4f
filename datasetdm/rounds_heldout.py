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
from datasetdm.downstream.evaluate import evaluate_model
from datasetdm.downstream.models import train_model
from datasetdm.realset import load_real_set, real_set_split_dirs
from datasetdm.rounds import rounds_digest, synthetic_union

logger = logging.getLogger(__name__)


def heldout_iou(params: Params, upto: int, seed: int) -> dict:
    """mIoU and IoU per class on the held-out set of the (c) model trained on K real + rounds 0..upto."""
    cfg, classes = params.downstream, params.world.classes
    train_dir, test_dir = real_set_split_dirs(params.real.dir)
    real = from_labelled(load_real_set(train_dir, classes))
    model = train_model(
        "semantic",
        [real, synthetic_union(params, upto)],
        num_labels=1 + len(classes),
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=seed,
        width=cfg.width,
        desc=f"held-out model (K real + rounds 0-{upto})",
        jitter=cfg.colour_jitter,
    )
    result = evaluate_model("semantic", model, load_real_set(test_dir, classes), classes)
    iou = result["per_label_iou"]
    per_class = {c: None if v is None else round(float(v), 4) for c, v in zip(classes, iou[1:])}
    return {"mIoU": round(float(result["mIoU"]), 4), "iou": per_class}


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
