"""Do generated pixels depend on torch's CPU thread count or on the batch size?

Samples the same prompts and seeds with the backbone of the params at 1 and 2 torch
threads, and as one batch vs two half batches, and prints how many uint8 pixel values
differ. Batch size must never matter (per-sample noise); thread count may move low
bits of CPU convolutions, which is why reproducibility is promised per thread count.

    python benchmarks/thread_determinism.py [--params params.yaml] [--steps 4] [--batch 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasetdm.config import load_params  # noqa: E402
from datasetdm.prompts import expand_prompts  # noqa: E402
from datasetdm.stages import load_backbone  # noqa: E402


def pixels(backbone, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> np.ndarray:
    images, _ = backbone.sample(prompts, seeds, steps=steps, guidance_scale=guidance)
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    params = load_params(args.params)
    backbone = load_backbone(params)
    prompts = [r["prompt"] for r in expand_prompts(params.world, params.prompts)][: args.batch]
    seeds = list(range(len(prompts)))
    g = params.backbone.guidance_scale
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out[threads] = pixels(backbone, prompts, seeds, args.steps, g)
    half = len(prompts) // 2
    split = np.concatenate(
        [
            pixels(backbone, prompts[:half], seeds[:half], args.steps, g),
            pixels(backbone, prompts[half:], seeds[half:], args.steps, g),
        ]
    )
    total = out[1].size
    print(
        f"1 vs 2 threads: {int((out[1] != out[2]).sum())} of {total} pixel values differ "
        f"(max |diff| {int(np.abs(out[1].astype(int) - out[2]).max())})"
    )
    print(f"batch {len(prompts)} vs 2 x {half} (2 threads): {int((out[2] != split).sum())} of {total} differ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
