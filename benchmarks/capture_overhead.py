"""Annotated generation vs plain diffusers sampling, same model, prompts, seeds and steps.

Prints seconds per batch of each and their ratio (target <= 1.10). Both are timed in
this one process, interleaved round by round, so machine load hits them alike.

    python benchmarks/capture_overhead.py [--params params.yaml] [--rounds 5]

"Plain" is the stock diffusers loop: the UNet with its own attention processors,
DDIMScheduler, classifier-free guidance; no hooks, no decoder. "Annotated" is
``datasetdm.generate.annotate_batch``: the same sampling with feature capture at
one step, then the P-Decoder and the quality score, i.e. what the factory runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from datasetdm.backbones.toy import ToyBackbone
from datasetdm.config import load_params
from datasetdm.decoder.model import PDecoder
from datasetdm.decoder.train import build_decoder
from datasetdm.generate import annotate_batch
from datasetdm.prompts import expand_prompts


@torch.no_grad()
def plain_sample(backbone: ToyBackbone, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float) -> torch.Tensor:
    scheduler = backbone.sample_scheduler()
    scheduler.set_timesteps(steps)
    context = torch.cat([backbone.encode_prompts([""] * len(prompts)), backbone.encode_prompts(prompts)])
    latents = backbone.initial_noise(seeds)
    for t in scheduler.timesteps:
        uncond, cond = backbone.unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample.chunk(2)
        latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample
    return backbone.codec.decode(latents)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    params = load_params(args.params)
    backbone = ToyBackbone.load(params.backbone.path)
    classes = params.world.classes
    prompts = [r["prompt"] for r in expand_prompts(params.world, params.prompts)][: params.generate.batch_size]
    seeds = list(range(len(prompts)))
    bb = params.backbone
    if (Path(params.decoder.out) / "config.json").is_file():
        decoder, source = PDecoder.load(params.decoder.out), params.decoder.out
    else:  # same architecture, untrained: the timing does not depend on the weights
        _, probe = backbone.sample(prompts[:1], seeds[:1], 1, bb.guidance_scale, capture_timestep=bb.feature_timestep)
        decoder, source = build_decoder(probe, classes, params.decoder, backbone.image_size).eval(), "untrained (same architecture)"

    plain_sample(backbone, prompts, seeds, bb.steps, bb.guidance_scale)  # warm-up both paths
    annotate_batch(backbone, decoder, prompts, seeds, classes, bb)
    plain_t, annotated_t = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        plain_sample(backbone, prompts, seeds, bb.steps, bb.guidance_scale)
        plain_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        annotate_batch(backbone, decoder, prompts, seeds, classes, bb)
        annotated_t.append(time.perf_counter() - start)
    plain, annotated = statistics.median(plain_t), statistics.median(annotated_t)
    print(f"backbone {bb.path}  decoder {source}  batch {len(prompts)}  steps {bb.steps}  torch threads {torch.get_num_threads()}")
    print(f"plain diffusers sampling : {plain:.3f} s/batch  ({len(prompts) / plain:.1f} img/s, median of {args.rounds})")
    print(f"annotated generation     : {annotated:.3f} s/batch  ({len(prompts) / annotated:.1f} img/s)")
    print(f"ratio annotated / plain  : {annotated / plain:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
