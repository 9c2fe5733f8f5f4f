"""Has the embedded UNet learned its pretraining pool more than the world? Its loss on pool scenes vs unseen ones.

Pretraining draws its batches from a fixed pool of rendered scenes (``pretrain.pool_size``,
rendering per step would cost more than the UNet). If the UNet had fitted those scenes
rather than the world, a larger pool would be a lever for prompt fidelity. This script
measures that directly: the pretraining loss (v-prediction, Min-SNR weighted, as
``train_unet`` computes it) of the shipped EMA UNet on the pool's first scenes and on two
sets of scenes of the same world it never saw, each scene paired with the same noise,
timestep and latent draw, so the sets differ in their scenes alone.

    python scripts/pool_fit.py --out metrics/pool_fit.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import numpy as np
import torch
import torch.nn.functional as F

from datasetdm.backbones.pretrain_sd import encode_pool
from datasetdm.backbones.sd_folder import load_components, resolve_folder
from datasetdm.config import Params, load_params
from datasetdm.io import write_json
from datasetdm.worlds.shapes import render_scene

logger = logging.getLogger("pool_fit")
# scene indices of each set (scene seed = pretrain.seed * 10_000_019 + index, as render_pool draws them)
SETS = {"pool": 0, "unseen_a": 16_000, "unseen_b": 100_000}


def scenes(params: Params, first: int, num: int) -> tuple[torch.Tensor, list[str]]:
    world = dataclasses.replace(params.world, classes=params.pretrain.classes)
    rendered = [render_scene(world, params.pretrain.seed * 10_000_019 + first + i) for i in range(num)]
    images = torch.from_numpy(np.stack([s.image for s in rendered])).permute(0, 3, 1, 2).contiguous()
    return images, [s.caption for s in rendered]


@torch.no_grad()
def losses(components: dict, images: torch.Tensor, captions: list[str], draws: dict, gamma: float) -> torch.Tensor:
    """Per-scene weighted v-prediction loss, as pretraining computes it."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(components["scheduler"].config)
    scale = float(components["vae"].config.scaling_factor)
    unet, text, tokenizer = components["unet"].eval(), components["text_encoder"].eval(), components["tokenizer"]
    means, stds = encode_pool(components["vae"], images, torch.device("cpu"))
    out = []
    for i in range(0, len(captions), 128):
        part = slice(i, i + 128)
        x0 = (means[part] + stds[part] * draws["latent"][part]) * scale
        t, noise = draws["t"][part], draws["noise"][part]
        ids = tokenizer(
            captions[part],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=text(ids)[0]).sample
        snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
        weight = torch.clamp(snr, max=gamma) / (snr + 1)
        out.append(weight * F.mse_loss(pred, sched.get_velocity(x0, noise, t), reduction="none").mean(dim=(1, 2, 3)))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--num", type=int, default=1024, help="scenes per set")
    parser.add_argument("--out", default="metrics/pool_fit.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    params = load_params(args.params)
    components = load_components(resolve_folder(params.backbone.model), torch.float32)
    side = params.world.image_size // 4
    gen = torch.Generator().manual_seed(123)
    draws = {
        "t": torch.randint(0, components["scheduler"].config.num_train_timesteps, (args.num,), generator=gen),
        "noise": torch.randn(args.num, 4, side, side, generator=gen),
        "latent": torch.randn(args.num, 4, side, side, generator=gen),
    }
    result: dict = {"model": params.backbone.model, "pool_size": params.pretrain.pool_size, "num": args.num}
    for name, first in SETS.items():
        images, captions = scenes(params, first, args.num)
        values = losses(components, images, captions, draws, params.pretrain.min_snr_gamma)
        result[name] = {
            "first_index": first,
            "loss": round(values.mean().item(), 5),
            "standard_error": round((values.std() / len(values) ** 0.5).item(), 5),
        }
        logger.info("%s: %s", name, result[name])
    write_json(args.out, result)
    print(result, flush=True)


if __name__ == "__main__":
    main()
