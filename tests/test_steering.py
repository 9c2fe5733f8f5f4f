"""Weakness signals: what the factory may steer by, computed from its own outputs only."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from datasetdm import steering
from datasetdm.report import _weakness_section
from datasetdm.steering import prompt_shapes, weakness_signals

PROMPTS = [
    {"prompt": "a red star", "layout": [["star", "red"]]},
    {"prompt": "two red stars", "layout": [["star", "red"], ["star", "red"]]},
    {"prompt": "a blue circle and a red star", "layout": [["circle", "blue"], ["star", "red"]]},
]


def _sample(i: int, prompt: str, score: float, kept: bool, confidence: float) -> tuple[dict, dict]:
    record = {"id": f"{i:06d}", "shard": "shard-00000", "prompt": prompt, "quality": {"confidence": confidence}}
    return record, {"id": record["id"], "shard": "shard-00000", "score": score, "kept": kept}


def test_signals_per_class_and_pair():
    pairs = [
        _sample(0, "a red star", 0.4, False, 0.6),
        _sample(1, "two red stars", 0.8, True, 0.9),
        _sample(2, "a blue circle and a red star", 0.7, True, 0.7),
        _sample(3, "an edited prompt", 0.9, True, 0.9),
    ]
    records, decisions = [r for r, _ in pairs], [d for _, d in pairs]
    shapes_of = prompt_shapes(PROMPTS)
    assert shapes_of["two red stars"] == ("star",) and shapes_of["a blue circle and a red star"] == ("circle", "star")
    signals = weakness_signals(records, decisions, shapes_of)
    star, circle = signals["per_class"]["star"], signals["per_class"]["circle"]
    assert star["samples"] == 3 and star["rejection_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert star["score_mean"] == pytest.approx(0.6333, abs=1e-4) and star["confidence_mean"] == pytest.approx(
        0.7333, abs=1e-4
    )
    assert circle == {
        "samples": 1,
        "rejection_rate": 0.0,
        "score_mean": 0.7,
        "score_p10": 0.7,
        "confidence_mean": 0.7,
    }
    assert set(signals["per_pair"]) == {"circle+star"} and signals["unattributed_samples"] == 1

    text = "\n".join(_weakness_section(signals))
    rows = [line for line in text.splitlines() if line.startswith("| ") and "samples" not in line]
    assert rows[0].startswith("| star | 3 | 33.3% | 0.633 |")  # weakest (lowest mean score) first


def test_signals_read_nothing_but_their_arguments():
    """No file, no params: the held-out set cannot reach a plan built on these signals."""
    source = inspect.getsource(steering)
    assert "open(" not in source and "Path" not in source and "params" not in source.replace("``", "")


def _signals(star_rejected: float, circle_rejected: float, pair_rejected: float) -> dict:
    def row(rate: float) -> dict:
        return {"samples": 10, "rejection_rate": rate, "score_mean": 0.5, "score_p10": 0.1, "confidence_mean": 0.9}

    return {
        "per_class": {"circle": row(circle_rejected), "star": row(star_rejected)},
        "per_pair": {"circle+star": row(pair_rejected)},
        "per_colour": {"blue": row(0.2), "red": row(0.2)},
        "unattributed_samples": 0,
    }


def test_allot_is_exact_and_deterministic():
    shares = np.array([0.5, 0.25, 0.25, 1e-9])
    counts = steering.allot(shares, 7)
    assert counts.sum() == 7 and list(counts) == list(steering.allot(shares, 7))
    assert list(steering.allot(np.ones(3), 4)) == [2, 1, 1]  # ties go to the earlier prompt


def test_a_steered_plan_spends_the_budget_where_the_data_is_weak():
    uniform = steering.steered_plan(PROMPTS, None, budget=300, floor=0.3, seed=0)
    assert uniform["counts"] == [100, 100, 100] and len(uniform["samples"]) == 300
    signals = _signals(star_rejected=0.6, circle_rejected=0.0, pair_rejected=0.1)
    plan = steering.steered_plan(PROMPTS, signals, budget=300, floor=0.3, seed=0)
    # star-only prompts carry weakness 0.6, the circle+star prompt mean(0, 0.6, 0.1) = 0.233
    assert plan["counts"][0] == plan["counts"][1] > plan["counts"][2] and sum(plan["counts"]) == 300
    assert sorted(plan["samples"]) == sorted(p["prompt"] for p, c in zip(PROMPTS, plan["counts"]) for _ in range(c))
    assert plan["class_shares"]["circle"] < uniform["class_shares"]["circle"]
    # the validation IoU moves the plan too: a circle the synthetic data teaches badly gets more
    taught_badly = steering.steered_plan(
        PROMPTS, signals, budget=300, floor=0.3, seed=0, validation_iou={"circle": 0.0, "star": 0.9}
    )
    assert taught_badly["counts"][2] > plan["counts"][2]
    # the floor: every prompt keeps at least floor / P of the round, however strong it is
    strong = steering.steered_plan(PROMPTS, _signals(0.9, 0.0, 0.0), budget=300, floor=0.3, seed=0)
    assert min(strong["counts"]) >= int(0.3 / 3 * 300)
    # deterministic from signals and seed; the seed changes only the order
    assert steering.steered_plan(PROMPTS, signals, budget=300, floor=0.3, seed=0) == plan
    other = steering.steered_plan(PROMPTS, signals, budget=300, floor=0.3, seed=1)
    assert other["counts"] == plan["counts"] and other["samples"] != plan["samples"]


def test_colour_signals():
    pairs = [_sample(0, "a red star", 0.4, False, 0.6), _sample(1, "a blue circle and a red star", 0.7, True, 0.7)]
    signals = weakness_signals(
        [r for r, _ in pairs], [d for _, d in pairs], prompt_shapes(PROMPTS), steering.prompt_colours(PROMPTS)
    )
    assert signals["per_colour"]["red"]["samples"] == 2 and signals["per_colour"]["blue"]["rejection_rate"] == 0.0
    assert signals["per_colour"]["red"]["rejection_rate"] == pytest.approx(0.5)


def test_weak_prompts_draw_more_candidates_and_each_slot_keeps_its_best():
    signals = _signals(star_rejected=0.6, circle_rejected=0.0, pair_rejected=0.1)
    w = steering.prompt_weights(PROMPTS, signals)
    assert list(steering.candidate_counts(w, 3)) == [3, 3, 2]  # star-only prompts are the weakest
    assert list(steering.candidate_counts(w, 1)) == [1, 1, 1]  # off
    assert list(steering.candidate_counts(w * 0, 3)) == [1, 1, 1]  # no prompt weaker than another

    plan = steering.steered_plan(PROMPTS, signals, budget=30, floor=0.3, seed=0, candidates=3)
    single = steering.steered_plan(PROMPTS, signals, budget=30, floor=0.3, seed=0)
    assert plan["counts"] == single["counts"] and plan["class_shares"] == single["class_shares"]  # same slots
    assert plan["candidates"] == [3, 3, 2] and single["candidates"] == [1, 1, 1] and single["slots"] == list(range(30))
    assert len(plan["samples"]) == sum(c * k for c, k in zip(plan["counts"], plan["candidates"]))
    assert sorted(set(plan["slots"])) == list(range(30)) and plan["slots"] == sorted(plan["slots"])
    for slot in range(30):  # a slot's candidates share one prompt
        assert len({p for p, s in zip(plan["samples"], plan["slots"]) if s == slot}) == 1
    # the uniform arm never draws candidates
    assert steering.steered_plan(PROMPTS, None, budget=30, floor=0.3, seed=0, candidates=3)["candidates"] == [1, 1, 1]

    decisions = [
        {"id": "000000", "score": 0.6, "kept": True},
        {"id": "000001", "score": 0.9, "kept": True},
        {"id": "000002", "score": 0.3, "kept": False},
        {"id": "000003", "score": 0.4, "kept": False},
        {"id": "000004", "score": 0.7, "kept": True},
        {"id": "000005", "score": 0.7, "kept": True},
    ]
    chosen = steering.best_per_slot(decisions, [0, 0, 1, 1, 2, 2])
    assert [d["kept"] for d in chosen] == [False, True, False, False, True, False]  # ties: the earlier
    assert [bool(d.get("superseded")) for d in chosen] == [True, False, False, False, False, True]
    with pytest.raises(ValueError, match="6 decisions for 2 planned samples"):
        steering.best_per_slot(decisions, [0, 1])
    # a superseded candidate passed the filter: it does not count as a rejection
    records = [{"id": d["id"], "shard": "s", "prompt": "a red star", "quality": {"confidence": 0.9}} for d in chosen]
    signals = weakness_signals(records, [{**d, "shard": "s"} for d in chosen], prompt_shapes(PROMPTS))
    assert signals["per_class"]["star"]["rejection_rate"] == pytest.approx(2 / 6, abs=1e-4)
