"""Annotated generation with the Stable Diffusion backbone vs a plain StableDiffusionPipeline call.

Same weights, prompts, per-sample seeds (CPU generators), DDIM scheduler, steps and
guidance; both timed in this one process, interleaved round by round, so machine
load hits them alike. Prints images/s of each and their ratio (target <= 1.10).

    python benchmarks/sd_overhead.py                      # the embedded default (params.yaml backbone.model), CPU
    python benchmarks/sd_overhead.py --model DIR          # a local diffusers SD folder
    python benchmarks/sd_overhead.py --tiny               # tiny random-weight SD, CPU, float32
    python benchmarks/sd_overhead.py --sd15-shaped        # random SD-1.5-shaped model, 512 px, float16, cuda

"Plain" is ``StableDiffusionPipeline.__call__`` (its own UNet copy, stock attention
processors, no hooks, no decoder; output_type "pt" moved to the CPU). "Annotated" is
``datasetdm.generate.annotate_batch``: the same sampling with feature capture at one
step, then the P-Decoder (untrained, same architecture: the weights do not change
the time) and the quality score, i.e. what the factory runs per batch. A third line,
sampling with capture but no decoder, splits the overhead into capture and decoder;
on a GPU a fourth runs the P-Decoder on the GPU as well (as the stages do).
``--sd15-shaped`` builds SD 1.5's architecture with random weights (no download) for a
GPU; on a CPU it runs too, slowly.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from datasetdm.backbones.sd import DTYPES, StableDiffusionBackbone
from datasetdm.backbones.sd_folder import check_model_index, load_components, resolve_folder
from datasetdm.backbones.tiny_sd import build_sd_components, build_tiny_sd, sd15_shaped_configs
from datasetdm.config import load_params
from datasetdm.decoder.inputs import class_attention, prompt_classes
from datasetdm.decoder.train import build_decoder, predict
from datasetdm.filtering import clean_labels, quality_components
from datasetdm.generate import annotate_batch, object_class_probs
from datasetdm.keypoints import find_peaks
from datasetdm.prompts import expand_prompts


def components_for(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], str]:
    if args.sd15_shaped:
        return build_sd_components(sd15_shaped_configs(), seed=0), "random-weight SD-1.5-shaped (860M UNet, 512 px)"
    folder = build_tiny_sd(tmp / "tiny-sd", image_size=32) if args.tiny else resolve_folder(args.model)
    check_model_index(folder)
    return load_components(folder, DTYPES[args.dtype]), "tiny random-weight SD (32 px)" if args.tiny else str(folder)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--params", default="params.yaml", help="world, prompts, decoder and backbone steps/guidance/timestep"
    )
    ap.add_argument("--model", default="", help="diffusers SD folder (default: backbone.model of --params)")
    ap.add_argument("--tiny", action="store_true", help="build a tiny random-weight SD instead")
    ap.add_argument(
        "--sd15-shaped", action="store_true", help="random SD-1.5-shaped model at 512 px (defaults: float16, cuda)"
    )
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=list(DTYPES))
    ap.add_argument("--batch", type=int, default=None, help="default: generate.batch_size")
    ap.add_argument("--steps", type=int, default=None, help="default: backbone.steps")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 steadies timings on a busy machine",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if args.sd15_shaped else "cpu")
    args.dtype = args.dtype or ("float16" if args.sd15_shaped else "float32")
    params = load_params(args.params)
    args.model = args.model or params.backbone.model
    bb = dataclasses.replace(params.backbone, steps=args.steps or params.backbone.steps)
    classes = params.world.classes
    batch = args.batch or params.generate.batch_size
    prompts = [r["prompt"] for r in expand_prompts(params.world, params.prompts)][:batch]
    prompts = (prompts * batch)[:batch]
    seeds = list(range(batch))

    with tempfile.TemporaryDirectory() as tmp:
        components, model_name = components_for(args, Path(tmp))
    plain_unet = copy.deepcopy(components["unet"])  # the backbone instruments its own UNet for capture
    # Where results land is chosen at loading (output_device), so the P-Decoder-on-device
    # row gets its own backbone, built from an untouched copy of the same weights.
    on_device_components = copy.deepcopy(components) if torch.device(args.device).type != "cpu" else None
    options = dict(dtype=args.dtype, device=args.device, channels_last=args.channels_last, compile=args.compile)
    backbone = StableDiffusionBackbone(components, **options)
    device = backbone.device
    plain_unet = plain_unet.to(device) if plain_unet.dtype == backbone.dtype else plain_unet.to(device, backbone.dtype)
    if args.channels_last:
        plain_unet.to(memory_format=torch.channels_last)
    if args.compile:
        plain_unet.compile()
    pipe = StableDiffusionPipeline(
        vae=backbone.vae,
        text_encoder=backbone.text_encoder,
        tokenizer=backbone.tokenizer,
        unet=plain_unet,
        scheduler=DDIMScheduler.from_config(backbone.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def plain() -> torch.Tensor:
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return (
            pipe(
                prompts,
                num_inference_steps=bb.steps,
                guidance_scale=bb.guidance_scale,
                generator=gens,
                output_type="pt",
            )
            .images.float()
            .cpu()
        )

    _, probe = backbone.sample(
        prompts[:1], seeds[:1], steps=1, guidance_scale=bb.guidance_scale, capture_timestep=bb.feature_timestep
    )
    assert probe is not None
    decoder = build_decoder(probe, classes, params.decoder, backbone.image_size).eval()
    annotated = lambda: annotate_batch(backbone, decoder, prompts, seeds, classes=classes, bb=bb)  # noqa: E731

    if on_device_components is not None:
        backbone_on_device = StableDiffusionBackbone(on_device_components, output_device=device, **options)
        decoder_on_device = copy.deepcopy(decoder).to(device)

    def annotated_on_device() -> Any:
        """The same, with results and the P-Decoder on the model's device (as the stages run it)."""
        return annotate_batch(backbone_on_device, decoder_on_device, prompts, seeds, classes=classes, bb=bb)

    def capture_only():
        return backbone.sample(
            prompts, seeds, steps=bb.steps, guidance_scale=bb.guidance_scale, capture_timestep=bb.feature_timestep
        )

    same = (plain() - capture_only()[0]).abs().max().item()  # also the warm-up of both paths
    annotated()
    runs = {"plain": plain, "annotated": annotated, "capture": capture_only}
    if device.type != "cpu":
        annotated_on_device()
        runs["annotated_dev"] = annotated_on_device
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for key, fn in runs.items():
            times[key].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU"
    )
    print(
        f"model {model_name}  {args.dtype} on {device} ({where}, torch {torch.__version__}, {torch.get_num_threads()} "
        "threads)"
    )
    print(
        f"batch {batch}  steps {bb.steps}  guidance {bb.guidance_scale}  capture at t={bb.feature_timestep}  "
        f"image {backbone.image_size}px  rounds {args.rounds}  channels_last {args.channels_last}  compile "
        f"{args.compile}"
    )
    print(f"same images as the pipeline: max |diff| = {same:.2e}")
    labels = {
        "plain": "plain StableDiffusionPipeline",
        "capture": "sampling + capture (no decoder)",
        "annotated": "annotated (annotate_batch)",
        "annotated_dev": f"annotated, P-Decoder on {device.type}",
    }
    for key in runs:
        print(
            f"{labels[key]:36s}: {med[key]:.3f} s/batch  {batch / med[key]:.2f} it/s (images/s, median; best "
            f"{best[key]:.3f} s)"
        )
    for key, label in (
        ("annotated", "annotated"),
        ("capture", "capture-only"),
        ("annotated_dev", f"annotated, decoder on {device.type},"),
    ):
        if key in med:
            print(
                f"ratio {label} / plain: {med[key] / med['plain']:.3f} median, {best[key] / best['plain']:.3f} best"
                + ("  (target <= 1.10)" if key == "annotated" else "")
            )
    print("annotation work per batch (what annotate_batch adds after sampling; median of 10):")
    for name, ms in annotation_breakdown(backbone, decoder, prompts, seeds, classes, bb, device).items():
        print(f"  {name:32s} {ms:7.1f} ms")


def annotation_breakdown(backbone, decoder, prompts, seeds, classes, bb, device) -> dict[str, float]:
    """Milliseconds of each step ``annotate_batch`` runs on a sampled batch, in its order: where the
    overhead goes when the ratio is above target (the steps mirror ``annotate_batch``; keep them so)."""
    images, features = backbone.sample(
        prompts, seeds, steps=bb.steps, guidance_scale=bb.guidance_scale, capture_timestep=bb.feature_timestep
    )
    attention = class_attention(features, backbone, classes)
    out = predict(decoder, backbone, features, images, classes=classes, attention=attention)
    probs = out["semantic"]
    named = [[classes.index(c) for c in prompt_classes(p, backbone, classes)] for p in prompts]
    labels = probs.argmax(1).to(torch.uint8).cpu().numpy()
    steps = {
        "class attention": lambda: class_attention(features, backbone, classes),
        "P-Decoder (all heads, softmax)": lambda: predict(
            decoder, backbone, features, images, classes=classes, attention=attention
        ),
        "quality score": lambda: quality_components(probs, attention, named),
        "label cleaning": lambda: [clean_labels(x) for x in labels],
        "class probabilities (curation)": lambda: object_class_probs(probs),
        "pooled embeddings": lambda: features.pooled().cpu(),
        "keypoint peaks": lambda: (
            [find_peaks(h) for h in out["keypoints"].cpu().numpy()] if "keypoints" in out else None
        ),
    }
    return {name: 1000 * statistics.median(timed(fn, device) for _ in range(10)) for name, fn in steps.items()}


if __name__ == "__main__":
    main()
