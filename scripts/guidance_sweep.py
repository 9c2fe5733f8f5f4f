"""Prompt fidelity of the embedded backbone against its sampler settings (guidance scale, DDIM steps).

The default (``backbone.guidance_scale``, ``backbone.steps``) was chosen at 7,000
pretraining steps, where guidance 3 and 5 scored alike. This script measures the finished
model again, on prompts and image seeds of **its own range** (7,000,000+), not the audit's
(``inspect.fidelity_seed``), so the audit's figure in ``metrics/backbone.json`` stays an
unbiased reading of whatever setting is chosen. The inspector reads the images, as the
audit does; nothing here changes what the factory generates.

    python scripts/guidance_sweep.py --num 300 --out metrics/guidance_sweep.json
    python scripts/guidance_sweep.py --settings 3x10,5x10,3x8,3x6 --out metrics/guidance_sweep_shipped.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from datasetdm import stages
from datasetdm.config import load_params
from datasetdm.evaluate.backbone import fidelity_layouts, generate_layouts, prompt_fidelity
from datasetdm.evaluate.inspector import Inspector
from datasetdm.io import write_json

SWEEP_SEED = 7_000_000
SETTINGS = ((3.0, 10), (5.0, 10), (7.5, 10), (10.0, 10), (5.0, 20))  # (guidance scale, DDIM steps)


def parse_setting(item: str) -> tuple[float, int]:
    """``"3x10"`` -> (3.0, 10); a malformed item stops with one line naming it."""
    try:
        guidance, steps = item.strip().split("x")
        return float(guidance), int(steps)
    except ValueError:
        raise SystemExit(f"error: --settings: {item!r} is not GUIDANCExSTEPS, e.g. 3x10") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--num", type=int, default=300, help="prompts per group (one object, two objects)")
    parser.add_argument("--out", default="metrics/guidance_sweep.json")
    parser.add_argument(
        "--settings",
        default=",".join(f"{g:g}x{n}" for g, n in SETTINGS),
        help="comma-separated GUIDANCExSTEPS pairs, e.g. 3x10,3x8,3x6",
    )
    args = parser.parse_args()
    settings = [parse_setting(item) for item in args.settings.split(",")]

    params = load_params(args.params)
    backbone = stages.load_backbone(params)
    inspector = Inspector.load(params.inspect.model)
    rows = []
    for guidance, steps in settings:
        setting = dataclasses.replace(params.backbone, guidance_scale=guidance, steps=steps)
        row: dict = {"guidance_scale": guidance, "steps": steps}
        start = time.perf_counter()
        for num_objects, key in ((1, "single_object"), (2, "two_objects")):
            layouts = fidelity_layouts(
                inspector.classes, params.world.colours, num=args.num, num_objects=num_objects, seed=SWEEP_SEED
            )
            images = generate_layouts(
                backbone,
                layouts,
                seed=SWEEP_SEED + 10_000 * num_objects,
                params=dataclasses.replace(params, backbone=setting),
            )
            row[key] = prompt_fidelity(inspector, images, layouts)[0]
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(row, flush=True)
        rows.append(row)
    result = {"num_per_group": args.num, "seed": SWEEP_SEED, "model": params.backbone.model, "settings": rows}
    write_json(args.out, result)


if __name__ == "__main__":
    main()
