"""Where the synthetic data is weak, and the next round's prompt plan that follows from it.

The signals come from what the factory itself produced (each sample's prompt layout,
the filter's score and decision, the decoder's confidence at generation) and from a
validation model trained on the synthetic set alone and scored on the K labelled real
images (``datasetdm.rounds``), never from the held-out real set, so a plan built on them
cannot leak the test set into training. ``steered_plan`` turns them into sample counts
per prompt: in proportion to weakness, with a floor spread evenly.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import numpy as np


def prompt_shapes(prompt_records: list[dict]) -> dict[str, tuple[str, ...]]:
    """Prompt -> the distinct shapes its layout names, sorted (``prompts.json`` records)."""
    return {r["prompt"]: tuple(sorted({shape for shape, _colour in r["layout"]})) for r in prompt_records}


def prompt_colours(prompt_records: list[dict]) -> dict[str, tuple[str, ...]]:
    """Prompt -> the distinct colours its layout names, sorted."""
    return {r["prompt"]: tuple(sorted({colour for _shape, colour in r["layout"]})) for r in prompt_records}


def weakness_signals(
    records: list[dict],
    decisions: list[dict],
    shapes_of: dict[str, tuple[str, ...]],
    colours_of: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    """Per class and per pair of classes: samples, rejection rate, filter score and decoder confidence.

    ``records``: generation records (``id``, ``shard``, ``prompt``, ``quality``);
    ``decisions``: the filter's ``samples`` (``id``, ``shard``, ``score``, ``kept``), same
    samples; ``shapes_of``: ``prompt_shapes``. A sample counts for every class its prompt
    names, and for the pair when it names two; with ``colours_of``, for every colour it
    names too (``per_colour``). Prompts unknown to ``shapes_of`` (records edited by hand)
    are left out and counted.
    """
    decided = {(d["shard"], d["id"]): d for d in decisions}
    groups: dict[str, list[tuple[float, bool, float]]] = defaultdict(list)
    pairs: dict[str, list[tuple[float, bool, float]]] = defaultdict(list)
    colours: dict[str, list[tuple[float, bool, float]]] = defaultdict(list)
    unknown = 0
    for r in records:
        shapes = shapes_of.get(r["prompt"])
        d = decided.get((r["shard"], r["id"]))
        if shapes is None or d is None:
            unknown += 1
            continue
        # a candidate superseded by a better one of its slot passed the filter: not a failure
        row = (float(d["score"]), bool(d["kept"] or d.get("superseded")), float(r["quality"]["confidence"]))
        for shape in shapes:
            groups[shape].append(row)
        for a, b in itertools.combinations(shapes, 2):
            pairs[f"{a}+{b}"].append(row)
        for colour in (colours_of or {}).get(r["prompt"], ()):
            colours[colour].append(row)
    signals = {
        "per_class": {k: _summary(v) for k, v in sorted(groups.items())},
        "per_pair": {k: _summary(v) for k, v in sorted(pairs.items())},
    }
    if colours_of is not None:
        signals["per_colour"] = {k: _summary(v) for k, v in sorted(colours.items())}
    return {**signals, "unattributed_samples": unknown}


def _summary(rows: list[tuple[float, bool, float]]) -> dict[str, float | int]:
    scores = np.array([s for s, _, _ in rows])
    return {
        "samples": len(rows),
        "rejection_rate": round(1 - float(np.mean([k for _, k, _ in rows])), 4),
        "score_mean": round(float(scores.mean()), 4),
        "score_p10": round(float(np.percentile(scores, 10)), 4),
        "confidence_mean": round(float(np.mean([c for _, _, c in rows])), 4),
    }


def class_weakness(signals: dict[str, Any], validation_iou: dict[str, float | None] | None = None) -> dict[str, float]:
    """Weakness in [0, 1] per class and per pair: the filter's rejection rate, averaged with
    1 - the validation IoU for a class that has one.

    The rejection rate says how often the generator fails at a class; the validation IoU
    says how well the kept samples teach it; either alone misses one of the two failures.
    """
    weakness = {}
    for name, s in signals["per_class"].items():
        terms = [s["rejection_rate"]]
        if validation_iou and validation_iou.get(name) is not None:
            terms.append(1 - float(validation_iou[name]))
        weakness[name] = float(np.mean(terms))
    for name, s in signals["per_pair"].items():
        weakness[name] = float(s["rejection_rate"])
    return weakness


def prompt_weights(
    prompt_records: list[dict], signals: dict[str, Any], validation_iou: dict[str, float | None] | None = None
) -> np.ndarray:
    """One weight per prompt: the mean weakness of the classes (and the pair) it names, scaled by
    how weak its colours are relative to the average colour.

    A class or pair with no signal yet (never sampled) counts as the mean weakness, so an
    unexplored pairing is neither starved nor favoured.
    """
    weakness = class_weakness(signals, validation_iou)
    neutral = float(np.mean(list(weakness.values()))) if weakness else 1.0
    colour_rate = {k: s["rejection_rate"] for k, s in signals.get("per_colour", {}).items()}
    colour_mean = float(np.mean(list(colour_rate.values()))) if colour_rate else 0.0
    weights = []
    for r in prompt_records:
        shapes = sorted({shape for shape, _ in r["layout"]})
        keys = shapes + [f"{a}+{b}" for a, b in itertools.combinations(shapes, 2)]
        w = float(np.mean([weakness.get(k, neutral) for k in keys]))
        if colour_mean > 0:
            colours = sorted({colour for _, colour in r["layout"]})
            w *= float(np.mean([colour_rate.get(c, colour_mean) / colour_mean for c in colours]))
        weights.append(w)
    return np.asarray(weights, dtype=np.float64)


def allot(shares: np.ndarray, budget: int) -> np.ndarray:
    """Integer counts summing to ``budget`` in proportion to ``shares`` (largest remainder; ties to the
    earlier prompt), so the plan is deterministic."""
    exact = shares / shares.sum() * budget
    counts = np.floor(exact).astype(np.int64)
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: budget - int(counts.sum())]:
        counts[i] += 1
    return counts


def steered_plan(
    prompt_records: list[dict],
    signals: dict[str, Any] | None,
    *,
    budget: int,
    floor: float,
    seed: int,
    validation_iou: dict[str, float | None] | None = None,
    candidates: int = 1,
) -> dict[str, Any]:
    """Sample counts per prompt and the order to generate them in.

    Share of prompt p: ``floor / P + (1 - floor) * w_p / sum(w)`` (``prompt_weights``); with
    ``signals`` None every prompt gets ``1 / P`` (the uniform arm). Returns ``counts`` (slots
    per prompt record), ``candidates`` (images drawn per slot of each prompt, see
    ``candidate_counts``), ``samples`` (prompt strings to generate: each slot's candidates
    side by side, slots shuffled with ``seed``), ``slots`` (the slot of each sample) and
    ``class_shares`` (the fraction of slots naming each class).
    """
    n = len(prompt_records)
    uniform = np.full(n, 1.0 / n)
    per_slot = np.ones(n, dtype=np.int64)
    if signals is None:
        shares = uniform
    else:
        w = prompt_weights(prompt_records, signals, validation_iou)
        shares = uniform if w.sum() <= 0 else floor * uniform + (1 - floor) * w / w.sum()
        per_slot = candidate_counts(w, candidates)
    counts = allot(shares, budget)
    flat = [(r["prompt"], int(k)) for r, c, k in zip(prompt_records, counts, per_slot) for _ in range(int(c))]
    order = np.random.default_rng(seed).permutation(len(flat))
    samples, slots = [], []
    for slot, i in enumerate(order):
        prompt, k = flat[i]
        samples += [prompt] * k
        slots += [slot] * k
    class_counts: dict[str, int] = defaultdict(int)
    for r, c in zip(prompt_records, counts):
        for shape in {shape for shape, _ in r["layout"]}:
            class_counts[shape] += int(c)
    return {
        "counts": [int(c) for c in counts],
        "candidates": [int(k) for k in per_slot],
        "samples": samples,
        "slots": slots,
        "class_shares": {k: round(v / budget, 4) for k, v in sorted(class_counts.items())},
    }


def candidate_counts(weights: np.ndarray, candidates: int) -> np.ndarray:
    """Images drawn per slot for each prompt: ``candidates`` for the weakest prompt, fewer in proportion
    to weakness, at least 1 (``1 + round((candidates - 1) * w / max w)``).

    Steering by quantity alone buys a weak class more samples of the same quality; in the
    shapes world that bought little (``make steering-scarce``: 93 kept samples already gave
    0.943 mIoU). Drawing several images for a weak prompt's slot and keeping the one the
    filter scores best (``best_per_slot``) buys better samples of it instead, at the cost
    of generation only, which is the cheap part of a round.
    """
    ones = np.ones(len(weights), dtype=np.int64)
    if candidates <= 1 or len(weights) == 0 or weights.max() <= 0:
        return ones
    return ones + np.rint((candidates - 1) * weights / weights.max()).astype(np.int64)


def candidate_rank(decision: dict) -> float:
    """What a slot's candidates are ranked by: the filter's score, times the sample's shape
    fidelity where it was judged (``shape_prior``; ``steer.shape_check``)."""
    return decision["score"] * decision.get("shape", 1.0)


def best_per_slot(decisions: list[dict], slots: list[int]) -> list[dict]:
    """The filter's decisions (in generation order, one per sample) with only the best-ranked kept
    candidate of each slot (``candidate_rank``) still kept; the others are marked ``kept: False``,
    ``superseded: True``.

    A slot none of whose candidates passed the filter keeps nothing, as a single draw would.
    Ties go to the earlier candidate, so the choice is deterministic.
    """
    if len(decisions) != len(slots):
        raise ValueError(f"{len(decisions)} decisions for {len(slots)} planned samples")
    best: dict[int, int] = {}
    for i, (d, slot) in enumerate(zip(decisions, slots)):
        if d["kept"] and (slot not in best or candidate_rank(d) > candidate_rank(decisions[best[slot]])):
            best[slot] = i
    chosen = set(best.values())
    out = []
    for i, d in enumerate(decisions):
        if d["kept"] and i not in chosen:
            d = {**d, "kept": False, "superseded": True}
        out.append(d)
    return out
