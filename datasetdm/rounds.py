"""Regeneration rounds: each round appends a batch of samples beside the last, aimed at what the data lacks.

Round 0 is the factory's own generation (``generate.out``, ``filter.out``, ``export.out``).
Round r >= 1 lives in ``<steer.out>/round-NNN/``:

- ``plan.json``: the samples per prompt and the signals behind them (``steering.py``);
- ``generated/``, ``filtered.json``, ``export/``: made exactly as round 0's are;
- ``round.json``: written last, the seal; a sealed round is never rewritten.

What steers round r is read from rounds 0..r-1 and the K labelled images only: the
filter's decisions and the decoder's confidence, and a validation IoU per class on the K
labelled images (``steer.validation``: a synthetic-only model, which every one of the K
can validate, or the real + synthetic model k-fold over the K). The held-out real set is
never opened here; it is scored by ``datasetdm.rounds_heldout``, which nothing in this
module reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datasetdm import steering
from datasetdm.backbones.base import Backbone
from datasetdm.config import Params
from datasetdm.decoder.model import PDecoder
from datasetdm.downstream.data import ArraySet, from_export, from_labelled
from datasetdm.downstream.evaluate import evaluate_model
from datasetdm.downstream.models import train_audit_model
from datasetdm.errors import DatasetDMError
from datasetdm.export.dataset import export_dataset
from datasetdm.generate import generate, read_records
from datasetdm.io import sha256_bytes, sha256_file, write_json
from datasetdm.realset import LabelledImage, load_real_set, real_set_split_dirs
from datasetdm.shape_prior import ShapePrior
from datasetdm.steering import prompt_colours, prompt_shapes, steered_plan, weakness_signals

logger = logging.getLogger(__name__)
SEAL = "round.json"
# Round r's sample seeds: generate.seed = ROUND_SEED + 1000 * steer.seed + r, far from round 0's.
ROUND_SEED = 7_000_000


@dataclass(frozen=True)
class Made:
    """One round's outputs (round 0: the factory's own generation)."""

    round: int
    generated: Path
    filtered: Path
    export: Path


def round_dir(params: Params, r: int) -> Path:
    return Path(params.steer.out) / f"round-{r:03d}"


def made(params: Params, r: int) -> Made:
    if r == 0:
        return Made(0, Path(params.generate.out), Path(params.filter.out), Path(params.export.out))
    d = round_dir(params, r)
    return Made(r, d / "generated", d / "filtered.json", d / "export")


def sealed_rounds(params: Params) -> list[int]:
    """The rounds >= 1 already made (sealed), in order."""
    root = Path(params.steer.out)
    return sorted(int(p.parent.name.split("-")[1]) for p in root.glob(f"round-*/{SEAL}")) if root.is_dir() else []


def next_round(params: Params) -> int:
    """The round a new trigger makes: one after the last sealed round."""
    return max(sealed_rounds(params), default=0) + 1


def read_seal(params: Params, r: int) -> dict | None:
    file = round_dir(params, r) / SEAL
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DatasetDMError(file, f"line {e.lineno}", f"not valid JSON ({e.msg})") from None


def _prompt_records(params: Params) -> list[dict]:
    file = Path(params.prompts.out)
    if not file.is_file():
        raise DatasetDMError(file, None, "prompts file not found; run the expand-prompts stage")
    try:
        return list(json.loads(file.read_text())["prompts"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DatasetDMError(file, "prompts", 'expected {"prompts": [{"prompt": ..., "layout": ...}, ...]}') from None


# --- what steers a round (never the held-out set) ---------------------------------


def filter_signals(params: Params, upto: int, prompt_records: list[dict]) -> dict[str, Any]:
    """Weakness signals of the filter and the decoder over rounds 0..upto."""
    records, decisions = [], []
    for r in range(upto + 1):
        m = made(params, r)
        # shard names repeat from round to round: key every sample by its round too
        records += [{**x, "shard": f"{r}/{x['shard']}"} for x in read_records(m.generated)]
        file = m.filtered
        if not file.is_file():
            raise DatasetDMError(file, None, "filter decisions not found; run the filter stage")
        decisions += [{**d, "shard": f"{r}/{d['shard']}"} for d in json.loads(file.read_text())["samples"]]
    return weakness_signals(records, decisions, prompt_shapes(prompt_records), prompt_colours(prompt_records))


def synthetic_union(params: Params, upto: int) -> ArraySet:
    """The kept samples of rounds 0..upto, as one training set (each export checked against its card)."""
    return joined_sets([from_export(made(params, r).export) for r in range(upto + 1)])


def joined_sets(parts: list[ArraySet]) -> ArraySet:
    """One training source of ``parts`` (a label a part lacks is dropped from the whole), as a round's
    samples join the earlier rounds' in one source rather than taking a share of every batch of their own."""

    def cat(field: str) -> np.ndarray | None:
        values = [getattr(p, field) for p in parts]
        return None if any(v is None for v in values) else np.concatenate(values)

    return ArraySet(cat("images"), cat("semantic"), cat("depth"), cat("heatmaps"))


def semantic_scores(
    params: Params,
    sources: list[ArraySet],
    judged_on: list[LabelledImage],
    *,
    seed: int,
    desc: str,
    steps: int | None = None,
) -> dict[str, Any]:
    """Train the downstream semantic model on ``sources`` with the audit's recipe (``downstream``: steps,
    width, jitter; ``steps`` overrides its step count) and score it on ``judged_on``: ``mIoU`` and ``iou``
    per class (None where a class is in neither truth nor prediction)."""
    cfg, classes = params.downstream, params.world.classes
    model = train_audit_model("semantic", sources, cfg, num_labels=1 + len(classes), seed=seed, desc=desc, steps=steps)
    result = evaluate_model("semantic", model, judged_on, classes)
    iou = result["per_label_iou"][1:]
    return {
        "mIoU": round(float(result["mIoU"]), 4),
        "iou": {c: None if v is None else round(float(v), 4) for c, v in zip(classes, iou)},
    }


def validation_iou(params: Params, upto: int, seed: int) -> dict[str, float | None]:
    """Per class: a validation IoU on the K labelled images for rounds 0..upto (``steer.validation``).

    ``synthetic``: one model trained on the synthetic samples alone; it sees no real
    image, so all K validate it. ``kfold``: the model the rounds feed (K real + synthetic,
    as the held-out report trains it) is validated k-fold over the K, each fold on the
    labelled images its model did not see; what is weak for that model is what steering
    should buy, which a synthetic-only model can rank differently.
    """
    train_dir, _ = real_set_split_dirs(params.real.dir)
    labelled = load_real_set(train_dir, params.world.classes)
    synthetic = synthetic_union(params, upto)
    desc = f"validation model (rounds 0-{upto})"
    if params.steer.validation == "synthetic":
        return semantic_scores(params, [synthetic], labelled, seed=seed, desc=desc)["iou"]
    return kfold_iou(params, labelled, synthetic, folds=params.steer.folds, seed=seed, desc=desc)


def kfold_split(items: list, folds: int, f: int) -> tuple[list, list]:
    """Fold f of ``folds`` interleaved over ``items`` in their order: (the rest, to train on; fold f, to judge)."""
    return [x for i, x in enumerate(items) if i % folds != f], items[f::folds]


def kfold_iou(
    params: Params, labelled: list[LabelledImage], synthetic: ArraySet, *, folds: int, seed: int, desc: str
) -> dict[str, float | None]:
    """Per class: the mean over ``folds`` of the IoU of a K real (minus the fold) + synthetic model on
    its fold (folds interleave the K in their order; a class absent from a fold's truth and
    predictions does not count for that fold)."""
    if not 2 <= folds <= len(labelled):
        raise DatasetDMError("params.yaml", "steer.folds", f"must be between 2 and K = {len(labelled)}, got {folds}")
    per_fold = []
    for f in range(folds):
        seen, judged = kfold_split(labelled, folds, f)
        sources = [from_labelled(seen), synthetic]
        per_fold.append(
            semantic_scores(params, sources, judged, seed=seed + f, desc=f"{desc}, fold {f + 1}/{folds}")["iou"]
        )
    result: dict[str, float | None] = {}
    for c in params.world.classes:
        values = [fold[c] for fold in per_fold if fold[c] is not None]
        result[c] = round(float(np.mean(values)), 4) if values else None
    logger.info("k-fold validation IoU over %d folds: %s", folds, result)
    return result


def plan_round(params: Params, r: int) -> dict[str, Any]:
    """Round r's plan: samples per prompt from the weakness of rounds 0..r-1 (uniform: evenly).

    Deterministic from the signals and ``steer``; reads no held-out data (a test moves the
    held-out set away and gets the same plan).
    """
    steer = params.steer
    prompt_records = _prompt_records(params)
    signals = validation = None
    if steer.mode == "steered":
        signals = filter_signals(params, r - 1, prompt_records)
        validation = validation_iou(params, r - 1, seed=1000 * steer.seed + r)
    plan = steered_plan(
        prompt_records,
        signals,
        budget=steer.budget,
        floor=steer.floor,
        seed=1000 * steer.seed + r,
        validation_iou=validation,
        candidates=steer.candidates,
    )
    logger.info(
        "round %d (%s): class shares %s, %d images for %d slots",
        r,
        steer.mode,
        plan["class_shares"],
        len(plan["samples"]),
        steer.budget,
    )
    return {
        "round": r,
        "mode": steer.mode,
        "budget": steer.budget,
        "floor": steer.floor,
        "candidates": steer.candidates,
        "seed": steer.seed,
        "validation": steer.validation if steer.mode == "steered" else None,
        "signals": signals,
        "validation_iou": validation,
        "class_shares": plan["class_shares"],
        "prompts": [
            {"prompt": p["prompt"], "layout": p["layout"], "samples": c, "candidates": k}
            for p, c, k in zip(prompt_records, plan["counts"], plan["candidates"])
            if c
        ],
        "samples": plan["samples"],
        "slots": plan["slots"],
    }


# --- making a round ------------------------------------------------------------------


def make_round(params: Params, r: int, backbone: Backbone, decoder: PDecoder, *, provenance: dict) -> dict:
    """Make round r (rounds 0..r-1 sealed): plan, generate, filter, export, then seal. Returns the seal."""
    d, m = round_dir(params, r), made(params, r)
    # 1. Plan from rounds 0..r-1 (kept across a killed run: the plan costs a model training).
    plan_file = d / "plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    wanted = {k: getattr(params.steer, k) for k in ("mode", "budget", "floor", "candidates", "seed")}
    if plan is None or any(plan.get(k) != v for k, v in wanted.items()):
        plan = plan_round(params, r)
        write_json(plan_file, plan)
    # 2. Generate: the round's own seeds; shards on disk are reused, as generate.out's are.
    gen = dataclasses.replace(
        params.generate,
        out=str(m.generated),
        num_samples=len(plan["samples"]),
        seed=ROUND_SEED + 1000 * params.steer.seed + r,
    )
    generate(
        backbone,
        decoder,
        plan["samples"],
        gen=gen,
        bb=params.backbone,
        out_dir=m.generated,
        prompts_source=str(plan_file),
    )
    # 3. Filter by the filter stage itself, then export as round 0 is; the card's provenance
    #    carries the plan and its signals.
    from datasetdm.stages import filter_stage  # the stage layer calls this module: imported here, not above

    round_filter = dataclasses.replace(params.filter, out=str(m.filtered))
    filter_stage(dataclasses.replace(params, generate=gen, filter=round_filter))
    if len(plan["slots"]) > len(set(plan["slots"])):
        judge = shape_judge(params, m.generated) if shape_checked(params) else None
        keep_best_candidates(m.filtered, plan["slots"], shape=judge)
    recorded = (
        "round",
        "mode",
        "budget",
        "floor",
        "candidates",
        "class_shares",
        "signals",
        "validation",
        "validation_iou",
    )
    summary = {**{k: plan[k] for k in recorded}, "shape_check": shape_checked(params)}
    card = export_dataset(
        m.generated,
        m.filtered,
        m.export,
        params_dict=params.to_dict(),
        grid_samples=params.export.grid_samples,
        provenance={**provenance, "steering": {**summary, "plan": plan["prompts"]}},
    )
    # 4. Seal.
    seal = {
        "round": r,
        "mode": params.steer.mode,
        "budget": params.steer.budget,
        "candidates": params.steer.candidates,
        "shape_check": shape_checked(params),
        "generated": len(plan["samples"]),
        "kept": card["counts"]["kept"],
        "class_shares": plan["class_shares"],
        "plan_sha256": sha256_file(plan_file),
        "dataset_sha256": sha256_file(m.export / "dataset.json"),
    }
    write_json(d / SEAL, seal)
    logger.info("round %d sealed: %d of %d samples kept", r, seal["kept"], seal["generated"])
    return seal


def shape_checked(params: Params) -> bool:
    """Whether this round's candidates are ranked by shape fidelity too (only a round that draws
    candidates has any to rank)."""
    return params.steer.shape_check and params.steer.candidates > 1


def shape_judge(params: Params, generated: Path) -> Callable[[dict], float]:
    """A filter decision -> its sample's shape fidelity, judged on the mask generation stored,
    against the outlines of the K labelled images (``shape_prior``; the held-out set is not read)."""
    classes = tuple(params.world.classes)
    prior = ShapePrior.from_labelled(load_real_set(real_set_split_dirs(params.real.dir)[0], classes), classes)

    def judge(decision: dict) -> float:
        mask = generated / decision["shard"] / "semantic" / f"{decision['id']}.png"
        return prior.fidelity(np.asarray(Image.open(mask)))

    return judge


def keep_best_candidates(filtered: Path, slots: list[int], *, shape: Callable[[dict], float] | None = None) -> None:
    """Rewrite a round's filter decisions so each slot keeps only its best-ranked candidate
    (``steering.best_per_slot``); samples are matched to slots by generation index (their id).

    shape: a decision -> its sample's shape fidelity; given, every kept candidate of a slot
    with more than one is judged and the fidelity recorded beside its score (``shape``).
    """
    result = json.loads(filtered.read_text())
    decisions = sorted(result["samples"], key=lambda d: int(d["id"]))
    if shape is not None:
        drawn = Counter(slots)
        decisions = [
            {**d, "shape": round(shape(d), 6)} if d["kept"] and drawn[slot] > 1 else d
            for d, slot in zip(decisions, slots)
        ]
    chosen = steering.best_per_slot(decisions, slots)
    kept = sum(d["kept"] for d in chosen)
    superseded = sum(bool(d.get("superseded")) for d in chosen)
    logger.info(
        "%d slots: %d kept (best of their candidates), %d candidates superseded", len(set(slots)), kept, superseded
    )
    write_json(
        filtered, {**result, "kept": kept, "dropped": len(chosen) - kept, "superseded": superseded, "samples": chosen}
    )


def make_rounds(params: Params, backbone: Backbone, decoder: PDecoder, *, provenance: dict) -> list[dict]:
    """Rounds 1..steer.round, making those not sealed yet; a sealed round of another mode stops the run."""
    seals = []
    for r in range(1, params.steer.round + 1):
        seal = read_seal(params, r)
        if seal is not None:
            wanted = {
                "mode": params.steer.mode,
                "candidates": params.steer.candidates,
                "shape_check": shape_checked(params),
            }
            for field, value in wanted.items():
                made_with = seal.get(field, {"candidates": 1, "shape_check": False}.get(field))
                if made_with != value:
                    raise DatasetDMError(
                        round_dir(params, r) / SEAL,
                        field,
                        f"round {r} was made with {field} {made_with} but steer.{field} is "
                        f"{getattr(params.steer, field)}; rounds are never rewritten: set steer.out to a new folder",
                    )
            logger.info("round %d already made (%d kept): reused", r, seal["kept"])
        else:
            seal = make_round(params, r, backbone, decoder, provenance=provenance)
        seals.append(seal)
    return seals


def seal_digest(seal: dict) -> str:
    return sha256_bytes(json.dumps(seal, sort_keys=True).encode())


def rounds_digest(params: Params, seals: list[dict]) -> str:
    """Names rounds 0..len(seals) as made: round 0's dataset card and every later round's seal.

    Figures computed on the same digest are the same figures, so they can be reused.
    """
    base = sha256_file(made(params, 0).export / "dataset.json")[:12]
    return "-".join([base, *(seal_digest(s)[:12] for s in seals)])
