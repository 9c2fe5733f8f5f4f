"""The most any round steered to the weakest class could give it: rounds of perfect samples.

The steering experiments (``make steering``, ``make steering-scarce``) moved the weakest
class (triangle) +0.2 to +1.8 points over uniform rounds, against a target of +5. Is the
target out of reach because of how the factory allots and ranks samples, or because no
round of this size could do it? This script bounds it from above. On top of the K real
images and the default export (the (c) arm of the uplift table), it adds ``--num``
*perfect* samples (800: the two rounds of 400 of ``make steering``), joined to the export
as a round's samples are, rendered by the shapes world with exact labels, drawn two ways from
the same render (seeds of its own range, 8,000,000+, never the held-out set's):

- ``uniform``: the first ``--num`` scenes, as a uniform round would spread them;
- ``weakest``: the first ``--num`` scenes that hold the weakest class, every sample of the
  round spent on it (the most a steered round can allot; the factory's floor keeps 30%
  for the others).

Each arm trains the scoring model of the steering experiment (``downstream.uplift_steps.semantic``
steps, seeds ``downstream.seed + k``) and is scored on the held-out set, which serves
here only to report, never to choose anything. The weakest class is the one with the
lowest held-out IoU of the base arm (K real + export), which neither added arm shapes.
Results per (arm, seed) are kept in ``--results`` as they come, so a killed run resumes.

    python scripts/steering_oracle.py --num 800 --seeds 3 --weakest triangle --out metrics/steering_oracle.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from datasetdm.config import load_params
from datasetdm.downstream.data import from_export, from_labelled
from datasetdm.io import write_json
from datasetdm.realset import load_real_set, real_set_split_dirs, write_real_set
from datasetdm.rounds import joined_sets, semantic_scores

ORACLE_SEED = 8_000_000
ARMS = ("base", "uniform", "weakest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--num", type=int, default=800, help="perfect samples per arm (2 rounds of 400)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--weakest", default=None, help="the class to steer to (default: the base arm's weakest)")
    parser.add_argument("--out", default="metrics/steering_oracle.json")
    parser.add_argument("--results", default="metrics/steering_oracle_results.json")
    args = parser.parse_args()

    params = load_params(args.params)
    classes = params.world.classes
    steps = params.downstream.uplift_steps.semantic
    train_dir, test_dir = real_set_split_dirs(params.real.dir)
    real = from_labelled(load_real_set(train_dir, classes))
    synthetic = from_export(params.export.out)
    test = load_real_set(test_dir, classes)
    results_file = Path(args.results)
    results: dict = json.loads(results_file.read_text()) if results_file.is_file() else {}

    # 1. the weakest class: given, or the base arm's (K real + export) lowest held-out IoU
    if args.weakest is None:
        for k in range(args.seeds):
            run(results, results_file, f"base/seed{k}", params, [real, synthetic], test, k, steps)
        base = {c: np.mean([results[f"base/seed{k}"]["iou"][c] for k in range(args.seeds)]) for c in classes}
    weakest = args.weakest or min(classes, key=base.__getitem__)

    # 2. perfect samples: one render, two ways of choosing a round from it
    uniform, steered = perfect_rounds(params, args.num, weakest)
    with_uniform, with_steered = joined_sets([synthetic, uniform]), joined_sets([synthetic, steered])

    # 3. the arms, seed by seed (the pair that compares steering first)
    for k in range(args.seeds):
        run(results, results_file, f"uniform/seed{k}", params, [real, with_uniform], test, k, steps)
        run(results, results_file, f"weakest/seed{k}", params, [real, with_steered], test, k, steps)
        run(results, results_file, f"base/seed{k}", params, [real, synthetic], test, k, steps)

    summary = summarize(results, classes, weakest, args.seeds, args.num, steps)
    write_json(args.out, summary)
    print(json.dumps(summary, indent=1))


def perfect_rounds(params, num: int, weakest: str):
    """``num`` rendered scenes as a uniform round takes them, and ``num`` that each hold ``weakest``."""
    label = 1 + params.world.classes.index(weakest)
    with tempfile.TemporaryDirectory() as tmp:
        write_real_set(params.world, Path(tmp) / "set", 6 * num, ORACLE_SEED)
        scenes = load_real_set(Path(tmp) / "set", params.world.classes)
    holding = [x for x in scenes if (x.semantic == label).any()]
    if len(holding) < num:
        raise SystemExit(f"only {len(holding)} of {len(scenes)} rendered scenes hold a {weakest}")
    return from_labelled(scenes[:num]), from_labelled(holding[:num])


def run(results, results_file, key, params, sources, test, k, steps) -> None:
    if results.get(key, {}).get("steps") == steps:
        return
    start = time.perf_counter()
    scores = semantic_scores(params, sources, test, seed=params.downstream.seed + k, desc=key, steps=steps)
    results[key] = {"steps": steps, "seconds": round(time.perf_counter() - start, 1), **scores}
    write_json(results_file, results)
    print(key, scores, flush=True)


def summarize(results: dict, classes, weakest: str, seeds: int, num: int, steps: int) -> dict:
    def arm(name: str, pick) -> np.ndarray:
        return np.array([pick(results[f"{name}/seed{k}"]) for k in range(seeds)])

    out: dict = {"seeds": seeds, "perfect_samples": num, "model_steps": steps, "weakest_class": weakest}
    for name in ARMS:
        out[f"mIoU_{name}_mean"] = round(float(arm(name, lambda x: x["mIoU"]).mean()), 4)
        for c in classes:
            out[f"iou_{c}_{name}_mean"] = round(float(arm(name, lambda x, c=c: x["iou"][c]).mean()), 4)
    for a, b in (("weakest", "uniform"), ("uniform", "base"), ("weakest", "base")):
        g = arm(a, lambda x: x["iou"][weakest]) - arm(b, lambda x: x["iou"][weakest])
        m = arm(a, lambda x: x["mIoU"]) - arm(b, lambda x: x["mIoU"])
        out[f"{a}_minus_{b}"] = {
            "weakest_class_gain_mean": round(float(g.mean()), 4),
            "weakest_class_gain_std": round(float(g.std()), 4),
            "mean_miou_gain_mean": round(float(m.mean()), 4),
            "mean_miou_gain_std": round(float(m.std()), 4),
        }
    return out


if __name__ == "__main__":
    main()
