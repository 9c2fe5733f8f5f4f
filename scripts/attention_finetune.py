"""Does self-attention at the 16x16 latent lift prompt fidelity? A warm-started, controlled test.

The UNet it was written for, shipped until 2026-12-07 (the asset of commit 09d2d5f), has
attention at 8x8 and 4x4 only (``pretrain.full_res_attention: false``: it cost 1.7x the
training step on 2 CPU cores). Its answer (no gain) led to ``attention_scratch.py``, whose
model ships now. Rerunning this one needs that former asset (``--model``, a checkout of it;
the new one is refused by ``warm_components``). Retraining from scratch with attention at
16x16 was another ~6 hours, so this script asked the question cheaply, as a controlled pair:

* **attention**: the shipped weights loaded into the same UNet with attention added at
  16x16; each new transformer's ``proj_out`` starts at zero, so at step 0 the model is
  the shipped one exactly (checked below), and training decides what the new layers add;
* **control**: the shipped UNet as it is, trained the same steps with the same draws.

On the model shipped since 2026-12-07 (attention at 16x16 from the start) only ``--arms control``
applies: one more cycle of the shipped design, the compute lever on its own.

Both go on from the shipped EMA weights for ``--steps`` steps (one cosine, peak ``--lr``,
fresh AdamW, the pretraining loss and pool, draws seeded by ``--seed``), and each snapshot
is read by the inspector on prompts and image seeds of this script's own range
(7,500,000+), never the audit's (``inspect.fidelity_seed``), so whatever is adopted later is
still measured unbiased by ``inspect``. Nothing here changes what the factory ships.

    python scripts/attention_finetune.py --steps 4000 --work /work/scratch/attn \\
        --out metrics/attention_finetune.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from datasetdm.backbones.pretrain_sd import (
    VAE_FINAL,
    build_components,
    encode_pool,
    render_pool,
    snapshot_components,
    snapshots,
    train_unet,
)
from datasetdm.backbones.sd import StableDiffusionBackbone
from datasetdm.backbones.sd_folder import load_components, resolve_folder
from datasetdm.config import Params, load_params
from datasetdm.evaluate.backbone import fidelity_layouts, generate_layouts, prompt_fidelity
from datasetdm.evaluate.inspector import Inspector
from datasetdm.io import write_json

logger = logging.getLogger("attention_finetune")
EVAL_SEED = 7_500_000


def arm_params(params: Params, *, attention: bool, steps: int, lr: float, seed: int, work: Path) -> Params:
    """Pretrain settings of one arm: one cosine of ``steps`` at peak ``lr``, checkpoints in ``work``."""
    pretrain = dataclasses.replace(
        params.pretrain,
        full_res_attention=attention,
        steps=steps,
        cycle_steps=steps,
        lr=lr,
        seed=seed,
        out=str(work / "model"),
    )
    return dataclasses.replace(params, pretrain=pretrain)


def warm_components(params: Params, shipped: dict) -> tuple[dict, list[str]]:
    """Fresh components of ``params`` holding the shipped weights, and the prefixes of the attention layers added
    (``<block>.attentions.``); the new layers start as the identity."""
    components = build_components(params)
    unet = components["unet"]
    missing, unexpected = unet.load_state_dict(shipped["unet"].state_dict(), strict=False)
    if unexpected or any(".attentions." not in k for k in missing):
        raise RuntimeError(
            f"shipped UNet does not map onto this one: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    added = sorted({k.split(".attentions.")[0] for k in missing})
    for name, module in unet.named_modules():
        if name.endswith("proj_out") and any(name.startswith(a + ".attentions.") for a in added):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    components["text_encoder"].load_state_dict(shipped["text_encoder"].state_dict())
    components["vae"] = shipped["vae"]
    logger.info("warm start: %d new tensors (%s), their proj_out zeroed", len(missing), ", ".join(added) or "none")
    _check_same_function(unet, shipped["unet"], params)
    return components, [f"{a}.attentions." for a in added]


def train_arm(
    params: Params,
    components: dict,
    pool: tuple[torch.Tensor, torch.Tensor, list[str]],
    work: Path,
    *,
    lr_scales: dict[str, float] | None = None,
    until_step: int | None = None,
) -> list[dict]:
    """``train_unet`` for one arm in ``work/model.work`` on the pool's encoded latents (``means, stds, captions``),
    with the arm's VAE saved there first (``snapshot_components`` reads it); returns the loss log."""
    vae_dir = work / "model.work" / VAE_FINAL
    if not vae_dir.is_dir():
        components["vae"].save_pretrained(vae_dir, safe_serialization=True)
    means, stds, captions = pool
    _, _, log, reached = train_unet(
        params,
        components,
        means=means,
        stds=stds,
        captions=captions,
        work=work / "model.work",
        device=torch.device("cpu"),
        lr_scales=lr_scales,
        until_step=until_step,
    )
    logger.info("reached step %d", reached)
    return log


def _probe_inputs(params: Params, timesteps: list[int]) -> dict[str, torch.Tensor]:
    """UNet inputs for checks (random latents and text states, seed 0), one per timestep."""
    gen = torch.Generator().manual_seed(0)
    n, side = len(timesteps), params.world.image_size // 4
    return {
        "sample": torch.randn(n, 4, side, side, generator=gen),
        "encoder_hidden_states": torch.randn(n, params.pretrain.max_length, params.pretrain.text_dim, generator=gen),
        "timestep": torch.tensor(timesteps),
    }


def last_unet(params: Params) -> torch.nn.Module:
    """The EMA UNet of an arm's last snapshot."""
    return snapshot_components(params, snapshots(params)[-1][1])["unet"]


@torch.no_grad()
def _check_same_function(unet: torch.nn.Module, shipped: torch.nn.Module, params: Params) -> None:
    inputs = _probe_inputs(params, [100, 700])
    a = unet.eval()(**inputs).sample
    b = shipped.eval()(**inputs).sample
    err = (a - b).abs().max().item()
    if err > 1e-4:
        raise RuntimeError(f"warm-started UNet differs from the shipped one by {err}")
    logger.info("warm-started UNet matches the shipped one (max difference %.1e)", err)


@torch.no_grad()
def branch_sizes(unet: torch.nn.Module, params: Params) -> dict[str, dict[str, float]]:
    """Per attention block: its ``proj_out`` weight norm, and its output's norm relative to its input's on random
    latents (how much of the block's residual the attention branch writes; near 0: still the identity)."""
    sizes: dict[str, dict[str, float]] = {}
    hooks = []
    for name, module in unet.named_modules():
        if name.endswith("proj_out"):
            block = name.removesuffix(".proj_out")
            sizes[block] = {"proj_out_norm": round(module.weight.norm().item(), 3)}

            def record(mod, inp, out, block=block):  # noqa: ANN001
                sizes[block]["output_over_input"] = round((out.norm() / inp[0].norm()).item(), 3)

            hooks.append(module.register_forward_hook(record))
    unet.eval()(**_probe_inputs(params, [100, 300, 600, 900]))
    for h in hooks:
        h.remove()
    return sizes


def fidelity(backbone: StableDiffusionBackbone, inspector: Inspector, params: Params, num: int) -> dict:
    row = {}
    for n, key in ((1, "single_object"), (2, "two_objects")):
        layouts = fidelity_layouts(inspector.classes, params.world.colours, num=num, num_objects=n, seed=EVAL_SEED)
        images = generate_layouts(backbone, layouts, seed=EVAL_SEED + 10_000 * n, params=params)
        row[key] = prompt_fidelity(inspector, images, layouts)[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=2.5e-4, help="peak learning rate of the one cosine")
    parser.add_argument("--seed", type=int, default=1, help="seeds the steps' draws (pretraining used 0)")
    parser.add_argument("--num", type=int, default=300, help="prompts per group at each snapshot")
    parser.add_argument("--read-every", type=int, default=2000, help="read every this many steps, and the last")
    parser.add_argument("--arms", default="attention,control")
    parser.add_argument(
        "--new-lr-scale",
        type=float,
        default=1.0,
        help="the added attention layers' learning rate as a multiple of --lr (the trained layers keep --lr)",
    )
    parser.add_argument(
        "--probe-only", action="store_true", help="only add branch_sizes of the finished arms to --out"
    )
    parser.add_argument("--model", default=None, help="pipeline folder to go on from (default: backbone.model)")
    parser.add_argument("--pool", type=int, default=None, help="pool size (default: pretrain.pool_size)")
    parser.add_argument("--work", default="/work/scratch/attention-finetune")
    parser.add_argument("--out", default="metrics/attention_finetune.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)

    params = load_params(args.params)

    def arm_of(arm: str) -> Params:
        kw = {"steps": args.steps, "lr": args.lr, "seed": args.seed, "work": Path(args.work) / arm}
        # control keeps the design of the model gone on from (params' setting): on the shipped
        # model, attention at 16x16 already, so its control is a plain further cycle of it
        attention = arm == "attention" or params.pretrain.full_res_attention
        return arm_params(params, attention=attention, **kw)

    if args.probe_only:
        result = json.loads(Path(args.out).read_text())
        for arm in args.arms.split(","):
            p = arm_of(arm)
            result[f"{arm}_branch_sizes"] = branch_sizes(last_unet(p), p)
        write_json(args.out, result)
        return
    inspector = Inspector.load(params.inspect.model)
    folder = resolve_folder(args.model or params.backbone.model)
    shipped = load_components(folder, torch.float32)
    # 1. the model gone on from (the shipped one unless --model), read once (step 0 of every arm)
    start = time.perf_counter()
    base = fidelity(StableDiffusionBackbone(dict(shipped)), inspector, params, args.num)
    logger.info("the model gone on from (step 0): %s (%.0f s)", base, time.perf_counter() - start)
    result: dict = {"eval_seed": EVAL_SEED, "num_per_group": args.num, "steps": args.steps, "lr": args.lr}
    result["new_lr_scale"] = args.new_lr_scale
    result["pool"] = args.pool or params.pretrain.pool_size
    result["start"] = base
    result["start_model"] = str(args.model or params.backbone.model)
    # 2. the pretraining pool (seed 0, as pretraining drew it), encoded by the shipped VAE
    images, captions = render_pool(params, args.pool or params.pretrain.pool_size, params.pretrain.seed)
    means, stds = encode_pool(shipped["vae"], images, torch.device("cpu"))
    for arm in args.arms.split(","):
        work, p = Path(args.work) / arm, arm_of(arm)
        components, added = warm_components(p, load_components(folder, torch.float32))
        log = train_arm(
            p,
            components,
            (means, stds, captions),
            work,
            lr_scales={prefix: args.new_lr_scale for prefix in added},  # at 1.0: one group, as with none
        )
        rows = [{"step": 0, "minutes": 0.0, **base}]
        for step, snap in snapshots(p):
            if step % args.read_every and step != args.steps:
                continue
            row = fidelity(StableDiffusionBackbone(snapshot_components(p, snap)), inspector, p, args.num)
            minutes = next(r["minutes"] for r in log if r["step"] == step)
            rows.append({"step": step, "minutes": round(minutes, 1), **row})
            logger.info("%s step %d: %s", arm, step, row)
        result[arm] = rows
        result[f"{arm}_branch_sizes"] = branch_sizes(last_unet(p), p)
        write_json(args.out, result)
    print(result, flush=True)


if __name__ == "__main__":
    main()
