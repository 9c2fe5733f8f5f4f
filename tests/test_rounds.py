"""Regeneration rounds: planned without the held-out set, appended beside the last, never rewritten."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from datasetdm import rounds, stages
from datasetdm.config import Params, params_from_dict
from datasetdm.errors import DatasetDMError
from datasetdm.realset import real_set_split_dirs
from datasetdm.steering_experiment import run_experiment
from tests.conftest import tiny_raw


def _params(root: Path, **steer) -> Params:
    raw = tiny_raw(root, root / "sd")
    raw["steer"].update(steer)
    return params_from_dict(raw, source=str(root / "params.yaml"))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("validation", ["synthetic", "kfold"])
def test_steering_never_reads_the_held_out_set(finished, validation):
    params = _params(finished, round=1, validation=validation, folds=2)
    plan = rounds.plan_round(params, 1)
    assert plan["mode"] == "steered" and plan["validation"] == validation
    assert len(plan["samples"]) == params.steer.budget
    assert set(plan["validation_iou"]) == set(params.world.classes)
    assert plan["signals"]["per_class"] and plan["signals"]["per_colour"]
    # the held-out set moved away: steering still runs and plans the same round
    _, test_dir = real_set_split_dirs(params.real.dir)
    moved = test_dir.with_name("moved-away")
    test_dir.rename(moved)
    try:
        assert rounds.plan_round(params, 1) == plan
    finally:
        moved.rename(test_dir)


def test_kfold_validation_is_its_own_model_and_checks_its_folds(finished):
    kfold = rounds.plan_round(_params(finished, round=1, validation="kfold", folds=2), 1)
    assert kfold["validation_iou"] != rounds.plan_round(_params(finished, round=1), 1)["validation_iou"]
    with pytest.raises(DatasetDMError, match=r"params.yaml: steer.folds: must be between 2 and K"):
        rounds.plan_round(_params(finished, round=1, validation="kfold", folds=999), 1)
    uniform = rounds.plan_round(_params(finished, round=1, mode="uniform"), 1)
    assert uniform["signals"] is None and uniform["validation_iou"] is None and uniform["validation"] is None


def test_rounds_append_beside_the_last_and_are_never_rewritten(finished):
    one = _params(finished, round=1)
    stages.rounds_stage(one)
    first = rounds.round_dir(one, 1)
    made_first = _files(first)
    seal = rounds.read_seal(one, 1)
    assert seal["generated"] == 4 and seal["kept"] == 4  # tiny params keep every sample (min_score 0)
    card = json.loads((first / "export/dataset.json").read_text())
    steering = card["provenance"]["steering"]
    assert (
        steering["round"] == 1
        and steering["signals"]["per_class"]
        and sum(p["samples"] for p in steering["plan"]) == 4
    )
    metrics = json.loads(Path(one.steer.metrics).read_text())
    assert set(metrics) >= {"round_0", "round_1", "last", "fiftyone_datasets"}
    assert metrics["round_1"]["kept"] == 4 and 0 <= metrics["last"]["mIoU"] <= 1

    two = _params(finished, round=2)
    stages.rounds_stage(two)
    assert _files(first) == made_first  # round 1 untouched: rounds append, never rewrite
    plan1 = json.loads((first / "plan.json").read_text())
    plan2 = json.loads((rounds.round_dir(two, 2) / "plan.json").read_text())
    # round 2 is steered by rounds 0 and 1: its signals count round 1's samples too
    assert sum(s["samples"] for s in plan2["signals"]["per_colour"].values()) > sum(
        s["samples"] for s in plan1["signals"]["per_colour"].values()
    )
    metrics2 = json.loads(Path(two.steer.metrics).read_text())
    assert metrics2["round_1"] == metrics["round_1"]  # unchanged rounds keep their figures (no retraining)
    versions = metrics2["fiftyone_datasets"]
    assert set(versions) == {"round_1", "round_2"} and len(set(versions.values())) == 2  # one FiftyOne dataset each
    rows = json.loads(Path(two.steer.plot).read_text())
    assert {(r["round"], r["class"]) for r in rows} == {(r, c) for r in range(3) for c in two.world.classes}

    # making the same rounds again makes nothing; another mode cannot rewrite them
    stages.rounds_stage(two)
    assert _files(first) == made_first
    with pytest.raises(DatasetDMError, match="never rewritten") as e:
        stages.rounds_stage(_params(finished, round=2, mode="uniform"))
    assert "round.json" in str(e.value) and "mode" in str(e.value)
    assert rounds.next_round(two) == 3


def test_steering_experiment_scores_both_arms_and_resumes(finished):
    params = _params(finished, experiment_rounds=1, experiment_seeds=1)
    result = run_experiment(
        params, stages.load_backbone(params), stages.load_decoder(params, stages.load_backbone(params))
    )
    m = result["metrics"]
    assert m["weakest_class"] in params.world.classes and m["seeds"] == 1 and m["rounds"] == 1
    for key in ("weakest_class_gain_mean", "weakest_class_gain_std", "mean_miou_gain_mean", "mean_miou_gain_std"):
        assert isinstance(m[key], float)
    assert {(r["arm"], r["round"]) for r in result["plot"]} == {(a, r) for a in ("uniform", "steered") for r in (0, 1)}
    # the two arms share their sample seeds and differ in how samples are allotted to prompts
    arms = {mode: rounds.read_seal(dataclass_arm, 1) for mode, dataclass_arm in _arms(params).items()}
    assert arms["uniform"]["generated"] == arms["steered"]["generated"] == params.steer.budget
    results = Path(params.steer.experiment_out) / "results.json"
    stamp = results.stat().st_mtime_ns
    assert run_experiment(params, None, None) == result  # everything made and scored: nothing is redone
    assert results.stat().st_mtime_ns == stamp
    # scored with the 3-seed uplift recipe, not make run's quick audit; a recipe change rescores
    steps = params.downstream.uplift_steps.semantic
    assert steps != params.downstream.steps and m["model_steps"] == steps
    assert {v["steps"] for k, v in json.loads(results.read_text()).items() if k != "base"} == {steps}
    longer = dataclasses.replace(
        params,
        downstream=dataclasses.replace(
            params.downstream, uplift_steps=dataclasses.replace(params.downstream.uplift_steps, semantic=steps + 1)
        ),
    )
    assert run_experiment(longer, None, None)["metrics"]["model_steps"] == steps + 1
    assert {v["steps"] for k, v in json.loads(results.read_text()).items() if k != "base"} == {steps + 1}


def _arms(params: Params) -> dict[str, Params]:
    from datasetdm.steering_experiment import arm_params

    return {mode: arm_params(params, mode, 0) for mode in ("uniform", "steered")}


def test_a_round_with_candidates_keeps_the_best_of_each_slot(finished):
    own = {  # rounds of their own: the other tests' rounds were made with one draw per slot
        "out": str(finished / "data/rounds-candidates"),
        "metrics": str(finished / "metrics/rounds-candidates.json"),
        "plot": str(finished / "metrics/rounds-candidates_plot.json"),
        "budget": 4,
    }
    params = _params(finished, round=1, candidates=2, shape_check=True, **own)
    stages.rounds_stage(params)
    plan = json.loads((rounds.round_dir(params, 1) / "plan.json").read_text())
    seal = rounds.read_seal(params, 1)
    assert plan["candidates"] == 2 and max(p["candidates"] for p in plan["prompts"]) == 2
    assert seal["generated"] == len(plan["samples"]) > 4 and len(set(plan["slots"])) == 4
    decisions = json.loads(rounds.made(params, 1).filtered.read_text())
    kept_slots = [s for s, d in zip(plan["slots"], sorted(decisions["samples"], key=lambda d: d["id"])) if d["kept"]]
    assert sorted(kept_slots) == [0, 1, 2, 3]  # tiny params pass every sample (min_score 0): one per slot
    assert decisions["superseded"] == seal["generated"] - 4 and seal["kept"] == 4
    # every candidate of a slot drawn more than once was judged by its shape, and the rank used it
    drawn = {s: plan["slots"].count(s) for s in plan["slots"]}
    ordered = sorted(decisions["samples"], key=lambda d: d["id"])
    assert seal["shape_check"] is True
    assert all(("shape" in d) == (drawn[s] > 1) for s, d in zip(plan["slots"], ordered))
    for slot in range(4):
        ranks = [d["score"] * d.get("shape", 1.0) for s, d in zip(plan["slots"], ordered) if s == slot]
        kept = [d for s, d in zip(plan["slots"], ordered) if s == slot and d["kept"]]
        assert kept[0]["score"] * kept[0].get("shape", 1.0) == max(ranks)
    # a round made with other candidates, or ranked otherwise, is never rewritten
    with pytest.raises(DatasetDMError, match="candidates 2 but steer.candidates is 1"):
        stages.rounds_stage(_params(finished, round=1, **own))
    with pytest.raises(DatasetDMError, match="shape_check True but steer.shape_check is False"):
        stages.rounds_stage(_params(finished, round=1, candidates=2, shape_check=False, **own))
