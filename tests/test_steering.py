"""Weakness signals: what the factory may steer by, computed from its own outputs only."""

from __future__ import annotations

import inspect

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
