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
import logging

import torch

from datasetdm.backbones.pretrain_sd import encode_pool, render_pool, v_loss
from datasetdm.backbones.sd_folder import load_components, resolve_folder
from datasetdm.config import load_params
from datasetdm.io import write_json

logger = logging.getLogger("pool_fit")
# the first scene index of each set in render_pool's order (the pool is indices 0 .. pool_size - 1)
SETS = {"pool": 0, "unseen_a": 16_000, "unseen_b": 100_000}


@torch.no_grad()
def losses(components: dict, images: torch.Tensor, captions: list[str], draws: dict, gamma: float) -> torch.Tensor:
    """Per-scene pretraining loss (``v_loss``, what ``train_unet`` minimises)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(components["scheduler"].config)
    scale = float(components["vae"].config.scaling_factor)
    for name in ("unet", "text_encoder"):
        components[name].eval()
    means, stds = encode_pool(components["vae"], images, torch.device("cpu"))
    out = []
    for i in range(0, len(captions), 128):
        part = slice(i, i + 128)
        x0 = (means[part] + stds[part] * draws["latent"][part]) * scale
        out.append(
            v_loss(components, sched, x0, draws["noise"][part], draws["t"][part], captions[part], min_snr_gamma=gamma)
        )
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
        images, captions = render_pool(params, args.num, params.pretrain.seed, first=first)
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
