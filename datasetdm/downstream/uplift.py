"""The uplift table, DatasetDM's headline re-done on our world: (a) K real, (b) synthetic, (c) both.

One small model per task (``models.py``) is trained on each training set with the
same recipe (architecture, steps, dihedral views + colour jitter, seeds), and scored on
the held-out real images (``evaluate.py``). Each arm is trained with ``seeds`` seeds;
the table gives the mean (under today's field names) with ``_mean`` / ``_std`` beside
it, since about two points move with the seed alone. An optional **ceiling** arm trains
the same model on many labelled real images, so the table shows how much of the fully
supervised result K real + synthetic recovers. Written as DVC metrics and plot rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from datasetdm.config import DownstreamConfig
from datasetdm.downstream.data import ArraySet
from datasetdm.downstream.evaluate import evaluate_model
from datasetdm.downstream.models import TASKS, train_audit_model, usable
from datasetdm.realset import LabelledImage

logger = logging.getLogger(__name__)
# (task in the metrics file, model, metric key inside its result, name in the plot)
TABLE = (
    ("semantic", "semantic", ("mIoU",), "semantic mIoU"),
    ("instances", "semantic", ("instances", "AP"), "instance mask AP"),
    ("depth", "depth", ("delta1",), "depth delta<1.25"),
    ("keypoints", "keypoints", ("AP",), "keypoint AP"),
)


def _arms(
    real: ArraySet, synthetic: ArraySet, ceiling: ArraySet | None, synthetic_arm: bool = True
) -> dict[str, list[ArraySet]]:
    arms = {"real": [real], "synthetic": [synthetic], "real+synthetic": [real, synthetic]}
    if not synthetic_arm:
        del arms["synthetic"]
    if ceiling is not None:
        arms["ceiling"] = [ceiling]
    return arms


def score_arms(
    arms: dict[str, list[ArraySet]],
    test: list[LabelledImage],
    classes: tuple[str, ...],
    *,
    cfg: DownstreamConfig,
    seeds: int,
    steps: Mapping[str, int] | None = None,
    tasks: Sequence[str] = TASKS,
) -> dict[str, dict[str, list[dict]]]:
    """task -> arm -> one held-out result per seed (a task an arm has no labels for is left out).

    ``steps``: training steps per task where they differ from ``cfg.steps`` (``make uplift``'s
    ``downstream.uplift_steps``). ``tasks``: the models to train (``make uplift`` trains each
    in its own DVC stage, so changing one task's recipe retrains only that task)."""
    scores: dict[str, dict[str, list[dict]]] = {}
    for task in tasks:
        scores[task] = {}
        for name, sources in arms.items():
            if not all(usable(task, src) for src in sources):
                logger.info("downstream %s: the %s arm is left out (a source has no %s labels)", task, name, task)
                continue
            scores[task][name] = []
            for k in range(seeds):
                model = train_audit_model(
                    task,
                    sources,
                    cfg,
                    num_labels=1 + len(classes),
                    seed=cfg.seed + k,
                    desc=f"downstream {task} ({name}, seed {cfg.seed + k})",
                    steps=(steps or {}).get(task),
                )
                scores[task][name].append(evaluate_model(task, model, test, classes))
    return scores


def _pick(result: dict, key: tuple[str, ...]) -> float:
    for k in key:
        result = result[k]
    return float(result)


def _entry(runs: dict[str, list[dict]], key: tuple[str, ...], task: str, counts: dict) -> dict:
    """One task's metrics: per arm the mean (today's name), ``_mean`` and ``_std``; the change (c) vs (a) per seed."""
    entry = dict(counts)
    per_seed: dict[str, np.ndarray] = {}
    for name, results in runs.items():
        values = np.array([_pick(r, key) for r in results])
        per_seed[name] = values
        metric = f"{key[-1]}_{name}"
        entry[metric], entry[f"{metric}_mean"], entry[f"{metric}_std"] = (
            float(values.mean()),
            float(values.mean()),
            float(values.std()),
        )
        if task == "depth":
            abs_rel = np.array([r["abs_rel"] for r in results])
            per_seed[f"abs_rel_{name}"] = abs_rel
            entry[f"abs_rel_{name}"], entry[f"abs_rel_{name}_mean"], entry[f"abs_rel_{name}_std"] = (
                float(abs_rel.mean()),
                float(abs_rel.mean()),
                float(abs_rel.std()),
            )
    if "real+synthetic" in runs and "real" in runs:
        if task == "depth":  # the target is relative: (c) has >= 30% lower AbsRel than (a)
            change = 1 - per_seed["abs_rel_real+synthetic"] / per_seed["abs_rel_real"]
            entry["abs_rel_reduction"], entry["abs_rel_reduction_mean"], entry["abs_rel_reduction_std"] = (
                float(1 - entry["abs_rel_real+synthetic"] / entry["abs_rel_real"]),
                float(change.mean()),
                float(change.std()),
            )
        else:
            change = per_seed["real+synthetic"] - per_seed["real"]
            entry["uplift"], entry["uplift_mean"], entry["uplift_std"] = (
                float(change.mean()),
                float(change.mean()),
                float(change.std()),
            )
    if "ceiling" in runs and "real+synthetic" in runs and task != "depth":
        # how much of the gap from K real to the fully supervised ceiling K real + synthetic closes
        gap = entry[f"{key[-1]}_ceiling"] - entry[f"{key[-1]}_real"]
        entry["gap_recovered"] = (
            float((entry[f"{key[-1]}_real+synthetic"] - entry[f"{key[-1]}_real"]) / gap) if gap else None
        )
    return entry


def uplift_table(
    real: ArraySet,
    synthetic: ArraySet,
    test: list[LabelledImage],
    classes: tuple[str, ...],
    *,
    cfg: DownstreamConfig,
    seeds: int | None = None,
    ceiling: ArraySet | None = None,
    known: Mapping[str, Mapping[str, list[dict]]] | None = None,
    num_ceiling: int | None = None,
    steps: Mapping[str, int] | None = None,
    tasks: Sequence[str] = TASKS,
    synthetic_arm: bool = True,
) -> dict:
    """The uplift table: per task and training set, the held-out metric over ``seeds`` seeds; plus rows for the DVC
    plot.

    ``known`` (arm -> task -> results per seed, ``datasetdm.downstream.baseline``) stands
    in for training the arms that never read the export, (a) ``real`` and ``ceiling``, when
    the caller has checked they were made from the same real sets, recipe and seeds; a
    known ceiling has ``num_ceiling`` images. A task the synthetic set has no labels for
    (a decoder without that head) gets the real-only row and no others. ``steps`` and
    ``tasks``: as ``score_arms`` takes them (the rows of the models not in ``tasks`` are left out).
    ``synthetic_arm``: whether (b), the synthetic set alone, is trained (make run's quick audit
    leaves it out unless ``downstream.synthetic_arm``; its rows then have no ``*_synthetic`` fields).
    """
    seeds = seeds or cfg.seeds
    known = known or {}
    counts = {"num_real": len(real), "num_synthetic": len(synthetic), "num_test": len(test), "seeds": seeds}
    if steps is not None:
        counts["steps"] = {task: steps.get(task, cfg.steps) for task in tasks}
    if ceiling is not None or "ceiling" in known:
        counts["num_ceiling"] = len(ceiling) if ceiling is not None else num_ceiling
    arms = _arms(real, synthetic, ceiling, synthetic_arm)
    trained = score_arms(
        {name: sources for name, sources in arms.items() if name not in known},
        test,
        classes,
        cfg=cfg,
        seeds=seeds,
        steps=steps,
        tasks=tasks,
    )
    order = [*arms, *(name for name in known if name not in arms)]  # (a), (b), (c), ceiling: as they are trained
    scores = {
        task: {
            name: known[name][task] if task in known.get(name, {}) else trained[task][name]
            for name in order
            if task in known.get(name, {}) or name in trained[task]
        }
        for task in trained
    }
    metrics: dict = {}
    plot = []
    for task, model_task, key, label in TABLE:
        if model_task not in tasks:
            continue
        metrics[task] = _entry(scores[model_task], key, task, counts)
        for name in scores[model_task]:
            value = metrics[task][f"{key[-1]}_{name}"]
            plot.append({"run": f"{label} | {name}", "task": task, "training data": name, "value": round(value, 4)})
        logger.info("%s: %s", task, {k: round(v, 4) for k, v in metrics[task].items() if isinstance(v, float)})
    return {"metrics": metrics, "plot": plot}
