"""Where the synthetic data is weak: per-class and per-pair signals a next round may steer by.

Computed from what the factory itself produced (each sample's prompt layout, the filter's
score and decision, the decoder's confidence at generation), never from the held-out
real set, so a plan built on them cannot leak the test set into training. The filter
stage writes them into its decisions (``filtered.json: signals``).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import numpy as np


def prompt_shapes(prompt_records: list[dict]) -> dict[str, tuple[str, ...]]:
    """Prompt -> the distinct shapes its layout names, sorted (``prompts.json`` records)."""
    return {r["prompt"]: tuple(sorted({shape for shape, _colour in r["layout"]})) for r in prompt_records}


def weakness_signals(
    records: list[dict], decisions: list[dict], shapes_of: dict[str, tuple[str, ...]]
) -> dict[str, Any]:
    """Per class and per pair of classes: samples, rejection rate, filter score and decoder confidence.

    ``records``: generation records (``id``, ``shard``, ``prompt``, ``quality``);
    ``decisions``: the filter's ``samples`` (``id``, ``shard``, ``score``, ``kept``), same
    samples; ``shapes_of``: ``prompt_shapes``. A sample counts for every class its prompt
    names, and for the pair when it names two. Prompts unknown to ``shapes_of`` (records
    edited by hand) are left out and counted.
    """
    decided = {(d["shard"], d["id"]): d for d in decisions}
    groups: dict[str, list[tuple[float, bool, float]]] = defaultdict(list)
    pairs: dict[str, list[tuple[float, bool, float]]] = defaultdict(list)
    unknown = 0
    for r in records:
        shapes = shapes_of.get(r["prompt"])
        d = decided.get((r["shard"], r["id"]))
        if shapes is None or d is None:
            unknown += 1
            continue
        row = (float(d["score"]), bool(d["kept"]), float(r["quality"]["confidence"]))
        for shape in shapes:
            groups[shape].append(row)
        for a, b in itertools.combinations(shapes, 2):
            pairs[f"{a}+{b}"].append(row)
    return {
        "per_class": {k: _summary(v) for k, v in sorted(groups.items())},
        "per_pair": {k: _summary(v) for k, v in sorted(pairs.items())},
        "unattributed_samples": unknown,
    }


def _summary(rows: list[tuple[float, bool, float]]) -> dict[str, float | int]:
    scores = np.array([s for s, _, _ in rows])
    return {
        "samples": len(rows),
        "rejection_rate": round(1 - float(np.mean([k for _, k, _ in rows])), 4),
        "score_mean": round(float(scores.mean()), 4),
        "score_p10": round(float(np.percentile(scores, 10)), 4),
        "confidence_mean": round(float(np.mean([c for _, _, c in rows])), 4),
    }
