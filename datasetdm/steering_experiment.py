"""The steering experiment: steered rounds against uniform rounds of the same size, over seeds.

For each seed k, two arms each make ``steer.experiment_rounds`` rounds of
``steer.budget`` samples on top of the same round 0 (the factory's generation), with
the same sample seeds; only how the samples are allotted to prompts differs. After each
last round the (c) model (K real + every kept synthetic sample so far) is scored on the
held-out set (``rounds_heldout``), as is round 0. The weakest class is the one with the
lowest held-out IoU after round 0, before either arm has made anything, so the choice
favours neither arm. Results per (arm, seed, round) are kept in
``<experiment_out>/results.json`` as they come, so a killed run resumes where it stopped.

The scoring model trains ``downstream.uplift_steps.semantic`` steps, the recipe of the
3-seed uplift table: at ``downstream.steps`` (300, make run's quick audit) one training's
spread (8 to 19 points between seeds) hid any 5-point effect. Only round 0 and the last
round are scored, since the gains compare those; each scoring is a 1,200-step model, and
the validation models that steer the rounds (``steer.validation``) keep the quick recipe.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from datasetdm.backbones.base import Backbone
from datasetdm.config import Params
from datasetdm.decoder.model import PDecoder
from datasetdm.io import write_json
from datasetdm.rounds import make_rounds, rounds_digest, shape_checked
from datasetdm.rounds_heldout import heldout_iou

logger = logging.getLogger(__name__)
ARMS = ("uniform", "steered")


def arm_params(params: Params, mode: str, k: int) -> Params:
    """Seed k's settings for one arm: its own rounds folder, round seeds and downstream seed."""
    steer = params.steer
    return dataclasses.replace(
        params,
        steer=dataclasses.replace(
            steer,
            out=str(Path(steer.experiment_out) / f"{mode}-seed{k}"),
            mode=mode,
            seed=steer.seed + k,
            round=steer.experiment_rounds,
        ),
        downstream=dataclasses.replace(params.downstream, seed=params.downstream.seed + k),
    )


def run_experiment(params: Params, backbone: Backbone, decoder: PDecoder) -> dict:
    """Make both arms' rounds for every seed and score each round; return metrics and plot rows."""
    steer = params.steer
    results_file = Path(steer.experiment_out) / "results.json"
    results: dict = json.loads(results_file.read_text()) if results_file.is_file() else {}
    base = rounds_digest(params, [])
    if results.get("base") != base and Path(steer.experiment_out).exists():
        # the arms' rounds were planned on top of another round 0: start over
        logger.info("round 0 changed since %s was made: the experiment starts over", steer.experiment_out)
        shutil.rmtree(steer.experiment_out)
        results = {}
    results["base"] = base

    steps = params.downstream.uplift_steps.semantic

    def scored(key: str, digest: str, p: Params, r: int, **made: int) -> dict:
        if {k: results.get(key, {}).get(k) for k in ("digest", "steps")} != {"digest": digest, "steps": steps}:
            figures = heldout_iou(p, r, seed=p.downstream.seed, steps=steps)
            results[key] = {"digest": digest, "steps": steps, **made, **figures}
            write_json(results_file, results)
        return results[key]

    for k in range(steer.experiment_seeds):
        scored(f"base/seed{k}", base, arm_params(params, "uniform", k), 0)
        for mode in ARMS:
            p = arm_params(params, mode, k)
            seals = make_rounds(p, backbone, decoder, provenance={"experiment": f"{mode}, seed {k}"})
            last = len(seals)
            made = {"generated": sum(x["generated"] for x in seals), "kept": sum(x["kept"] for x in seals)}
            scored(f"{mode}/seed{k}/round{last}", rounds_digest(p, seals), p, last, **made)
            logger.info("%s seed %d round %d: %s", mode, k, last, results[f"{mode}/seed{k}/round{last}"])
    return summarize(results, params)


def summarize(results: dict, params: Params) -> dict:
    """Gains steered minus uniform after the last round, per seed then mean and std; plot rows for round 0
    and the last round (the rounds scored).

    A class absent from both the held-out truth and a model's prediction has no IoU
    (None): it is left out of means, and a figure with nothing to average is None.
    """
    steer, classes = params.steer, params.world.classes
    seeds, last = range(steer.experiment_seeds), steer.experiment_rounds

    def final(mode: str, k: int) -> dict:
        return results[f"{mode}/seed{k}/round{last}"]

    def iou(x: dict, c: str) -> float:
        return np.nan if x["iou"][c] is None else float(x["iou"][c])

    def gains(pick) -> np.ndarray:
        return np.array([pick(final("steered", k)) - pick(final("uniform", k)) for k in seeds])

    base = {c: _mean([iou(results[f"base/seed{k}"], c) for k in seeds]) for c in classes}
    weakest = min(classes, key=lambda c: np.inf if base[c] is None else base[c])
    weakest_gain = gains(lambda x: iou(x, weakest))
    miou_gain = gains(lambda x: x["mIoU"])
    metrics = {
        "seeds": len(seeds),
        "rounds": last,
        "budget_per_round": steer.budget,
        "floor": steer.floor,
        "candidates": steer.candidates,
        "shape_check": shape_checked(params),
        "model_steps": params.downstream.uplift_steps.semantic,
        "weakest_class": weakest,
        "weakest_class_round0_iou": base[weakest],
        "weakest_class_gain_mean": _mean(weakest_gain),
        "weakest_class_gain_std": _std(weakest_gain),
        "mean_miou_gain_mean": _mean(miou_gain),
        "mean_miou_gain_std": _std(miou_gain),
    }
    for c in classes:
        g = gains(lambda x, c=c: iou(x, c))
        metrics[f"gain_{c}_mean"], metrics[f"gain_{c}_std"] = _mean(g), _std(g)
    for mode in ARMS:
        metrics[f"mIoU_{mode}_mean"] = _mean([final(mode, k)["mIoU"] for k in seeds])
        # what the arm's rounds cost and bought: images generated (candidates included) and kept
        for what in ("generated", "kept"):
            metrics[f"{what}_{mode}_mean"] = _mean([final(mode, k).get(what, np.nan) for k in seeds])
    plot = []
    for mode in ARMS:
        for r in (0, last):
            rows = [results[f"base/seed{k}"] if r == 0 else results[f"{mode}/seed{k}/round{r}"] for k in seeds]
            for c in classes:
                value = _mean([iou(x, c) for x in rows])
                plot.append({"round": r, "arm": mode, "class": c, "run": f"{mode} | {c}", "iou": value})
    return {"metrics": metrics, "plot": plot}


def _mean(values) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    return None if np.isnan(values).all() else round(float(np.nanmean(values)), 4)


def _std(values) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    return None if np.isnan(values).all() else round(float(np.nanstd(values)), 4)


def write_experiment(params: Params, result: dict) -> None:
    write_json(params.steer.experiment_metrics, result["metrics"])
    write_json(params.steer.experiment_plot, result["plot"])
