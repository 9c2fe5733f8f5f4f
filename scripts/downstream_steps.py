"""How long must the downstream audit's models train? Validation scores against training steps.

The uplift table is only honest if every arm is trained until more steps no longer
help. This script trains one of the audit's models (``--task``: semantic, depth or
keypoints; ``downstream`` recipe: width,
batch, lr, dihedral views + colour jitter; only the step count varies) on (a) the K
real images, (c) K real + the kept synthetic samples of the export and, optionally,
the 2,000-image ceiling, and scores each on a **validation set rendered from its own
seed range** (3,000,000+ by default): never the held-out test set, which must not
choose the recipe.

    python scripts/downstream_steps.py --steps 300 600 1200 --arms real real+synthetic ceiling
    python scripts/downstream_steps.py --task depth --steps 300 1200

Writes ``--out`` (default ``metrics/downstream_steps.json``, ``metrics/downstream_steps_<task>.json``
for depth and keypoints): arm -> steps -> the task's scores (semantic: mIoU and IoU per class;
depth: AbsRel, RMSE, delta < 1.25; keypoints: keypoint AP).
Points already in ``--out`` for the same validation set, recipe and training seed are kept (so a
longer run can be added later), except those of an arm trained on an export that has changed since.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from datasetdm.config import Params, load_params
from datasetdm.downstream.data import ArraySet, from_export, from_labelled
from datasetdm.downstream.evaluate import evaluate_model
from datasetdm.downstream.models import TASKS, train_audit_model
from datasetdm.io import sha256_file, write_json
from datasetdm.realset import LabelledImage, load_real_set, real_set_split_dirs, write_real_set
from datasetdm.rounds import semantic_scores

ARMS = ("real", "synthetic", "real+synthetic", "ceiling")
logger = logging.getLogger("downstream_steps")


def _kept_points(out: Path, header: dict, export_digest: str) -> dict:
    """arm -> steps -> result of an earlier run of this script with the same header, fresh exports only."""
    if not out.is_file():
        return {}
    earlier = json.loads(out.read_text())
    if {k: earlier.get(k) for k in header} != header:
        logger.warning("%s was measured on another validation set or recipe: its points are not kept", out)
        return {}
    kept: dict = {}
    for arm, points in earlier.get("arms", {}).items():
        for steps, result in points.items():
            if "synthetic" in arm and result.get("export") != export_digest:
                logger.warning("%s, %s steps: trained on another export, dropped", arm, steps)
                continue
            kept.setdefault(arm, {})[steps] = result
    return kept


def task_scores(
    task: str, params: Params, sources: list[ArraySet], validation: list[LabelledImage], *, seed: int, desc: str
) -> dict:
    """Train ``task``'s model with the audit's recipe and score it on ``validation``."""
    if task == "semantic":
        return semantic_scores(params, sources, validation, seed=seed, desc=desc)
    classes = params.world.classes
    model = train_audit_model(task, sources, params.downstream, num_labels=1 + len(classes), seed=seed, desc=desc)
    result = evaluate_model(task, model, validation, classes)
    keys = ("abs_rel", "rmse", "delta1") if task == "depth" else ("AP", "AP50")
    return {k: round(float(result[k]), 4) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[300, 600, 1200])
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=["real", "real+synthetic"])
    ap.add_argument("--num-val", type=int, default=200)
    ap.add_argument("--val-seed", type=int, default=3_000_000)
    ap.add_argument("--seed", type=int, default=0, help="training seed (downstream.seed + this)")
    ap.add_argument("--task", choices=TASKS, default="semantic")
    ap.add_argument(
        "--synthetic-depth",
        choices=("all", "background"),
        default="all",
        help="background: train on the synthetic depth labels' background pixels only (where they are good, "
        "metrics/depth_labels.json), object levels from the real images alone",
    )
    ap.add_argument("--out", default=None, help="default: metrics/downstream_steps.json (semantic), _<task> otherwise")
    args = ap.parse_args()
    args.out = args.out or f"metrics/downstream_steps{'' if args.task == 'semantic' else '_' + args.task}.json"

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params()
    classes, cfg = params.world.classes, params.downstream
    header = {
        "validation": {"num_images": args.num_val, "seed": args.val_seed},
        "training_seed": cfg.seed + args.seed,
        "recipe": {"batch_size": cfg.batch_size, "lr": cfg.lr, "width": cfg.width, "jitter": cfg.colour_jitter},
    }
    if args.synthetic_depth != "all":
        header["synthetic_depth"] = args.synthetic_depth
    annotations = Path(params.export.out) / "annotations.json"
    export_digest = sha256_file(annotations)[:16] if annotations.is_file() else ""
    train_dir, _ = real_set_split_dirs(params.real.dir)
    with tempfile.TemporaryDirectory() as tmp:
        # 1. The validation set: rendered by the world from its own seed range, as the real sets are.
        write_real_set(params.world, Path(tmp) / "val", args.num_val, args.val_seed)
        validation = load_real_set(Path(tmp) / "val", classes)
        # 2. The arms' training sources (the ceiling: its own seed range, as make uplift renders it).
        real = from_labelled(load_real_set(train_dir, classes))
        sources = {"real": [real]}
        if {"synthetic", "real+synthetic"} & set(args.arms):
            synthetic = from_export(params.export.out)
            if args.synthetic_depth == "background" and synthetic.depth is not None:
                # 0 is "unknown" to the depth loss: object pixels of synthetic images teach nothing
                synthetic = dataclasses.replace(synthetic, depth=np.where(synthetic.semantic > 0, 0, synthetic.depth))
            sources |= {"synthetic": [synthetic], "real+synthetic": [real, synthetic]}
        if "ceiling" in args.arms:
            write_real_set(params.world, Path(tmp) / "ceiling", cfg.ceiling_images, cfg.ceiling_seed)
            sources["ceiling"] = [from_labelled(load_real_set(Path(tmp) / "ceiling", classes))]
    # 3. Every arm at every step count, the rest of the recipe fixed.
    results = _kept_points(Path(args.out), header, export_digest)
    for arm in args.arms:
        results.setdefault(arm, {})
        for steps in args.steps:
            p = dataclasses.replace(params, downstream=dataclasses.replace(cfg, steps=steps))
            start = time.perf_counter()
            scores = task_scores(
                args.task,
                p,
                sources[arm],
                validation,
                seed=cfg.seed + args.seed,
                desc=f"{args.task}, {arm}, {steps} steps",
            )
            results[arm][str(steps)] = {**scores, "seconds": round(time.perf_counter() - start, 1)}
            if "synthetic" in arm:
                results[arm][str(steps)]["export"] = export_digest  # annotations.json's sha256, first 16
            print(arm, steps, json.dumps(results[arm][str(steps)]), flush=True)
    ordered = {arm: dict(sorted(points.items(), key=lambda kv: int(kv[0]))) for arm, points in results.items()}
    write_json(args.out, {**header, "arms": ordered})


if __name__ == "__main__":
    main()
