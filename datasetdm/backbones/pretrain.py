"""Training the embedded toy backbone on the shapes world (nanoGPT-sized loop).

Standard text-to-image diffusion training: DDPM noise-prediction loss on patch
latents, captions dropped to "" with probability ``caption_dropout`` so
classifier-free guidance works, an EMA of the weights for sampling, and a fixed step
count so the shipped checkpoint can be reproduced exactly from params.yaml.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasetdm.backbones.preview import preview_grid
from datasetdm.backbones.toy import ToyBackbone, toy_config
from datasetdm.config import Params
from datasetdm.worlds.shapes import render_scene


def render_pool(params: Params, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Pre-render ``size`` scenes as uint8 (N, 3, H, W) plus captions (rendering per step would cost more than the UNet)."""
    world = dataclasses.replace(params.world, classes=params.pretrain.classes)
    images = np.empty((size, world.image_size, world.image_size, 3), dtype=np.uint8)
    captions = []
    for i in tqdm(range(size), desc="render shapes world", unit="img", mininterval=2):
        scene = render_scene(world, seed * 10_000_019 + i)
        images[i] = scene.image
        captions.append(scene.caption)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def pretrain(params: Params, out: str | Path | None = None, preview: bool = True) -> dict[str, float]:
    """Train a toy backbone from scratch and save it (EMA weights) to ``out``; deterministic per seed."""
    cfg = params.pretrain
    out = Path(out or cfg.out)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = ToyBackbone.from_config(toy_config(params.world.image_size, cfg.patch_size, cfg.block_out_channels,
                                               cfg.layers_per_block, cfg.text_dim, cfg.text_layers))
    images, captions = render_pool(params, cfg.pool_size, cfg.seed)
    unet, text = model.unet.train(), model.text_encoder.train()
    ema = [copy.deepcopy(unet).eval().requires_grad_(False), copy.deepcopy(text).eval().requires_grad_(False)]
    trainable = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.01)
    noise_sched = model.noise_scheduler()
    start = time.monotonic()
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, desc="pretrain toy backbone", unit="step", mininterval=5)
    step = 0
    while step < cfg.steps:
        frac = step / cfg.steps
        lr = cfg.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(0, len(captions), size=cfg.batch_size)
        x = images[idx].float() / 255
        flip = torch.from_numpy(rng.random(cfg.batch_size) < 0.5)
        x[flip] = x[flip].flip(-1)  # captions say nothing of left/right
        prompts = ["" if rng.random() < cfg.caption_dropout else captions[i] for i in idx]
        x0 = model.codec.encode(x)
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,))
        xt = noise_sched.add_noise(x0, noise, t)
        context = text(model.tokenizer(prompts))
        target = noise if noise_sched.config.prediction_type == "epsilon" else noise_sched.get_velocity(x0, noise, t)
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=context).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for shadow, live in zip(ema, (unet, text)):
                for ps, pl in zip(shadow.parameters(), live.parameters()):
                    ps.lerp_(pl, 1 - decay)
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{lr:.1e}")
    bar.close()
    trained = ToyBackbone(model.config, ema[0], ema[1])
    trained.save(out)
    # Look before trusting: a captioned grid of samples beside the weights.
    if preview:
        preview_grid(trained, out / "preview.png")
    return {"steps": step, "minutes": (time.monotonic() - start) / 60,
            "first_loss": float(np.mean(losses[:10])), "final_loss": float(np.mean(losses[-10:]))}
