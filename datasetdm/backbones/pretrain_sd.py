"""Training the embedded miniature Stable Diffusion on the shapes world (``make pretrain``).

Two stages, as SD itself was built:

1. the AutoencoderKL on rendered scenes (L1 + image-gradient L1 + a tiny KL), then its
   ``scaling_factor`` set so latents have unit variance, as SD's 0.18215 was chosen;
2. the UNet and the CLIP text encoder on the frozen VAE's latents: v-prediction,
   Min-SNR weighting, caption dropout (for classifier-free guidance), an EMA of the
   weights for sampling.

It is a long job on two CPU cores, so it checkpoints every ``checkpoint_every`` steps and
resumes from its own checkpoint; every random draw of step ``s`` comes from a generator
seeded by ``(seed, s)``, so a resumed run makes the same draws as an unbroken one. Each
checkpoint also keeps an EMA snapshot, from which the fidelity-against-steps curve is
measured afterwards (by ``datasetdm.evaluate.backbone``, never by this loop).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from datasetdm.backbones.mini_sd import mini_sd_configs
from datasetdm.backbones.sd_folder import PRETRAIN_LOG, folder_fingerprint
from datasetdm.backbones.tiny_sd import build_sd_components, save_sd_folder
from datasetdm.config import Params
from datasetdm.errors import DatasetDMError
from datasetdm.io import atomic_path, sha256_file, write_json
from datasetdm.worlds.shapes import render_scene

logger = logging.getLogger(__name__)
VAE_DIR, DECODER_DIR, SHARPEN_DIR = "vae", "vae-decoder", "vae-decoder-sharpen"
VAE_FINAL, UNET_STATE, SNAPSHOTS = "vae-final", "unet-state", "snapshots"


def render_pool(params: Params, size: int, seed: int, *, first: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Pre-render ``size`` scenes as uint8 (N, 3, H, W) plus captions (rendering per step would cost more than the
    UNet). ``first`` skips that many of the seed's scenes: a pool's own scenes start at 0, so scenes from
    ``pool_size`` on are ones pretraining never saw (``scripts/pool_fit.py``)."""
    world = dataclasses.replace(params.world, classes=params.pretrain.classes)
    images = np.empty((size, world.image_size, world.image_size, 3), dtype=np.uint8)
    captions = []
    for i in tqdm(range(size), desc="render shapes world", unit="img", mininterval=2):
        scene = render_scene(world, seed * 10_000_019 + first + i)
        images[i] = scene.image
        captions.append(scene.caption)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def _lr(base: float, step: int, cycle: int, *, restart_decay: float = 1.0, warmup: int = 200) -> float:
    """Warm restarts: in each cycle a linear warm-up, then cosine decay to a tenth of its peak;
    cycle k peaks at ``base * restart_decay**k``. Depends on the step, never on the total."""
    k, s = divmod(step, cycle)
    peak = base * restart_decay**k
    return peak * min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cycle)))


def _step_rng(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The draws of one step depend on (seed, step) only: resuming repeats them exactly."""
    return np.random.default_rng([seed, step]), torch.Generator().manual_seed(seed * 1_000_003 + step)


def _image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def _reconstruction_loss(
    recon: torch.Tensor, x: torch.Tensor, edge_weight: float, kl: torch.Tensor | None = None
) -> torch.Tensor:
    """L1 on pixels (+ the weighted KL term, if given) plus, if weighted, L1 on image gradients (edges are what the
    labels depend on)."""
    loss = F.l1_loss(recon, x)
    if kl is not None:
        loss = loss + kl
    if edge_weight:
        loss = loss + edge_weight * sum(F.l1_loss(a, b) for a, b in zip(_image_gradients(recon), _image_gradients(x)))
    return loss


def _optimizer_step(
    opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.nn.Parameter], *, losses: list[float], bar: tqdm
) -> None:
    """Backward, clip to norm 1, step; log the loss and advance the progress bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    losses.append(loss.item())
    bar.update(1)
    if len(losses) % 50 == 0:
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")


def _save_state(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """A checkpoint written whole or not at all (temp folder, then rename)."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "state.safetensors")
        meta = {**meta, "sha256": sha256_file(tmp / "state.safetensors")}  # checked on resume
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def _load_state(folder: Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """A checkpoint, or ``None`` if there is none; one written under other settings (``key``) is refused."""
    if not (folder / "meta.json").is_file():
        return None
    meta = json.loads((folder / "meta.json").read_text())
    if key is not None and meta.get("settings") != key:
        raise DatasetDMError(
            folder,
            "pretrain",
            "this checkpoint was written under other pretrain/world settings; "
            "restore them to resume, or delete the folder to start over",
        )
    state = folder / "state.safetensors"
    if "sha256" not in meta:  # written before checkpoints recorded their hash
        logger.info("%s: no recorded sha256 (an older checkpoint): resumed unchecked", folder)
    elif sha256_file(state) != meta["sha256"]:
        raise DatasetDMError(
            state, "sha256", "differs from the one meta.json recorded; delete the folder to start this stage over"
        )
    return load_file(state), meta


def settings_key(params: Params, stage: str) -> str:
    """Hash of the settings a stage's checkpoint depends on (not where outputs go or how often it saves)."""
    cfg = dataclasses.asdict(params.pretrain)
    for k in ("out", "curve", "checkpoint_every", "steps"):  # the state at a step never depends on the total
        cfg.pop(k)
    if stage not in (DECODER_DIR, SHARPEN_DIR):  # the encoder's latents, all the UNet sees, ignore the decoder passes
        cfg["vae"] = {k: v for k, v in cfg["vae"].items() if not k.startswith("decoder_")}
    if stage == DECODER_DIR:  # the first decoder pass does not depend on the one after it
        cfg["vae"] = {k: v for k, v in cfg["vae"].items() if not k.startswith("decoder_sharpen_")}
    if stage in ("vae", DECODER_DIR, SHARPEN_DIR):
        cfg = {k: cfg[k] for k in ("classes", "pool_size", "seed", "vae")}
    payload = {"world": dataclasses.asdict(params.world), "pretrain": cfg}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _flat(prefix: str, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def _unflat(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            out[f"opt.{i}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state = opt.state_dict()
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = value
    opt.load_state_dict(state)


def train_vae(
    params: Params, vae: torch.nn.Module, images: torch.Tensor, *, work: Path, device: torch.device
) -> torch.nn.Module:
    """Stage 1: reconstruct rendered scenes; resumable; returns the trained VAE (eval mode)."""
    cfg, vcfg = params.pretrain, params.pretrain.vae
    done, key = work / VAE_DIR, settings_key(params, "vae")
    loaded = _load_state(done, key)
    if loaded is not None and loaded[1]["step"] == vcfg.steps:
        logger.info("VAE already trained (%s), reusing it", done)
        vae.load_state_dict(_unflat("vae", loaded[0]))
        return vae.to(device).eval()
    vae = vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=vcfg.lr, weight_decay=0.0)
    step = 0
    if loaded is not None:
        vae.load_state_dict(_unflat("vae", loaded[0]))
        _restore_optimizer(opt, loaded[0])
        step = int(loaded[1]["step"])
        logger.info("resuming VAE training at step %d", step)
    bar = tqdm(total=vcfg.steps, initial=step, desc="pretrain VAE", unit="step", mininterval=5)
    losses: list[float] = []
    while step < vcfg.steps:
        for g in opt.param_groups:
            g["lr"] = _lr(vcfg.lr, step, vcfg.steps)
        rng, gen = _step_rng(cfg.seed + 1, step)
        x = images[torch.from_numpy(rng.integers(0, len(images), size=vcfg.batch_size))].to(device).float() / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
        recon = vae.decode(z).sample
        loss = _reconstruction_loss(recon, x, vcfg.edge_weight, kl=vcfg.kl_weight * posterior.kl().mean())
        _optimizer_step(opt, loss, list(vae.parameters()), losses=losses, bar=bar)
        step += 1
        if step % cfg.checkpoint_every == 0 or step == vcfg.steps:
            _save_state(
                done,
                {**_flat("vae", vae.state_dict()), **_optimizer_tensors(opt)},
                {"step": step, "loss": float(np.mean(losses[-50:])), "settings": key},
            )
    bar.close()
    return vae.eval()


@dataclasses.dataclass(frozen=True)
class DecoderPass:
    """One pass of VAE-decoder training on the frozen encoder's latents (its own optimizer, cosine and checkpoint)."""

    stage: str  # settings_key stage and checkpoint folder
    steps: int
    lr: float
    batch_size: int
    edge_weight: float
    seed: int


def decoder_passes(params: Params) -> list[DecoderPass]:
    """Stage 1b, the decoder fine-tune, then 1c, the sharpening pass from its weights (skipped at 0 steps)."""
    cfg, v = params.pretrain, params.pretrain.vae
    return [
        DecoderPass(DECODER_DIR, v.decoder_steps, v.decoder_lr, v.batch_size, v.edge_weight, cfg.seed + 2),
        DecoderPass(
            SHARPEN_DIR,
            v.decoder_sharpen_steps,
            v.decoder_sharpen_lr,
            v.decoder_sharpen_batch_size,
            v.decoder_sharpen_edge_weight,
            cfg.seed + 3,
        ),
    ]


def finetune_decoder(
    params: Params,
    vae: torch.nn.Module,
    images: torch.Tensor,
    *,
    run: DecoderPass,
    means: torch.Tensor,
    stds: torch.Tensor,
    work: Path,
    device: torch.device,
) -> torch.nn.Module:
    """The VAE decoder alone on the frozen encoder's latents (resumable); the latent space, all the UNet sees, stays
    put."""
    if not run.steps:
        logger.info("pretrain.vae: the %s pass has 0 steps, skipped", run.stage)
        return vae
    done, key = work / run.stage, settings_key(params, run.stage)
    decoder = [vae.post_quant_conv, vae.decoder]
    loaded = _load_state(done, key)
    if loaded is not None:
        vae.load_state_dict({**vae.state_dict(), **_unflat("vae", loaded[0])})
        if loaded[1]["step"] == run.steps:
            logger.info("VAE %s pass already done (%s), reusing it", run.stage, done)
            return vae.eval()
    params_ = [p for m in decoder for p in m.parameters()]
    opt = torch.optim.AdamW(params_, lr=run.lr, weight_decay=0.0)
    step = 0
    if loaded is not None:
        _restore_optimizer(opt, loaded[0])
        step = int(loaded[1]["step"])
        logger.info("resuming the VAE %s pass at step %d", run.stage, step)
    for m in decoder:
        m.train()
    bar = tqdm(total=run.steps, initial=step, desc=f"VAE {run.stage}", unit="step", mininterval=5)
    losses: list[float] = []
    while step < run.steps:
        for g in opt.param_groups:
            g["lr"] = _lr(run.lr, step, run.steps)
        rng, gen = _step_rng(run.seed, step)
        idx = torch.from_numpy(rng.integers(0, len(images), size=run.batch_size))
        x = images[idx].to(device).float() / 127.5 - 1
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)).to(device)
        recon = vae.decode(z).sample
        _optimizer_step(opt, _reconstruction_loss(recon, x, run.edge_weight), params_, losses=losses, bar=bar)
        step += 1
        if step % params.pretrain.checkpoint_every == 0 or step == run.steps:
            decoder_state = {
                k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))
            }
            _save_state(
                done,
                {**_flat("vae", decoder_state), **_optimizer_tensors(opt)},
                {"step": step, "loss": float(np.mean(losses[-50:])), "settings": key},
            )
    bar.close()
    return vae.eval()


@torch.no_grad()
def encode_pool(
    vae: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool image (encoded once: the UNet stage never runs the encoder)."""
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="encode pool", unit="batch", mininterval=5):
        dist = vae.encode(images[i : i + batch].to(device).float() / 127.5 - 1).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def train_unet(
    params: Params,
    components: dict[str, Any],
    *,
    means: torch.Tensor,
    stds: torch.Tensor,
    captions: list[str],
    work: Path,
    device: torch.device,
    until_step: int | None = None,
    lr_scales: Mapping[str, float] | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module, list[dict], int]:
    """Stage 2: UNet + text encoder on scaled latents; resumable; returns the EMA modules, the loss log and the step
    reached.

    ``until_step`` stops early (after checkpointing there), to split the job across sessions.
    ``lr_scales``: UNet parameter-name prefixes whose learning rate is that multiple of the
    schedule's, for layers added to a trained model (``scripts/attention_finetune.py``): the
    trained ones go on gently while the new ones learn at a from-scratch rate. Resume with the
    same scales (the checkpoint's settings key does not record them).
    """
    from diffusers import DDPMScheduler

    cfg = params.pretrain
    # moved in place: ``components`` holds these very modules, which ``v_loss`` reads from it
    unet, text = components["unet"].to(device).train(), components["text_encoder"].to(device).train()
    ema = [copy.deepcopy(unet).eval().requires_grad_(False), copy.deepcopy(text).eval().requires_grad_(False)]
    trainable = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(_param_groups(unet, text, lr_scales or {}), lr=cfg.lr, weight_decay=0.01)
    noise_sched = DDPMScheduler.from_config(components["scheduler"].config)
    scale = float(components["vae"].config.scaling_factor)
    state_dir, snapshots, key = work / UNET_STATE, work / SNAPSHOTS, settings_key(params, "unet")
    step, log = 0, []
    if (loaded := _load_state(state_dir, key)) is not None:
        tensors, meta = loaded
        unet.load_state_dict(_unflat("unet", tensors))
        text.load_state_dict(_unflat("text", tensors))
        ema[0].load_state_dict(_unflat("ema_unet", tensors))
        ema[1].load_state_dict(_unflat("ema_text", tensors))
        _restore_optimizer(opt, tensors)
        step, log = int(meta["step"]), meta["log"]
        logger.info("resuming UNet training at step %d", step)
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain UNet + text encoder", unit="step", mininterval=5)
    losses: list[float] = []
    start = time.monotonic() - (log[-1]["minutes"] * 60 if log else 0.0)
    stop = cfg.steps if until_step is None else min(cfg.steps, until_step)
    while step < stop:
        lr = _lr(cfg.lr, step, cfg.cycle_steps, restart_decay=cfg.restart_decay)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        rng, gen = _step_rng(cfg.seed, step)
        idx = torch.from_numpy(rng.integers(0, len(captions), size=cfg.batch_size))
        prompts = ["" if rng.random() < cfg.caption_dropout else captions[i] for i in idx.tolist()]
        # No flip augmentation: the world draws mirror images equally often already, and a
        # flipped latent is not the latent of the flipped image (the VAE's kernels are not symmetric).
        z = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)
        x0 = (z * scale).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen).to(device)
        loss = v_loss(components, noise_sched, x0, noise, t, prompts, min_snr_gamma=cfg.min_snr_gamma).mean()
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
        on_grid = step % cfg.checkpoint_every == 0 or step == cfg.steps
        if on_grid:  # a log row and an EMA snapshot (a point of the fidelity curve)
            log.append(
                {
                    "step": step,
                    "loss": float(np.mean(losses[-cfg.checkpoint_every :])),
                    "minutes": (time.monotonic() - start) / 60,
                }
            )
            _save_state(snapshots / f"step-{step:06d}", _ema_tensors(ema), {**log[-1], "settings": key})
        if on_grid or step == stop:
            _save_state(
                state_dir,
                {
                    **_flat("unet", unet.state_dict()),
                    **_flat("text", text.state_dict()),
                    **_ema_tensors(ema),
                    **_optimizer_tensors(opt),
                },
                {"step": step, "log": log, "settings": key},
            )
    bar.close()
    return ema[0], ema[1], log, step


def v_loss(
    components: Mapping[str, Any],
    sched: Any,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    prompts: list[str],
    *,
    min_snr_gamma: float,
) -> torch.Tensor:
    """Per-sample pretraining loss: v-prediction error, Min-SNR-gamma weighted. One definition, so what
    ``scripts/pool_fit.py`` measures is what training minimises."""
    unet, text, tokenizer = components["unet"], components["text_encoder"], components["tokenizer"]
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(x0.device)
    pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=text(ids)[0]).sample
    target = sched.get_velocity(x0, noise, t)
    alphas = sched.alphas_cumprod.to(x0.device)[t]
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1)
    return weight * F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def _param_groups(
    unet: torch.nn.Module, text: torch.nn.Module, lr_scales: Mapping[str, float]
) -> list[dict[str, Any]]:
    """AdamW groups, one per learning-rate scale; with no scales, one group holding the UNet's parameters then the
    text encoder's, in the order (and so the optimizer-state layout) of every checkpoint before scales existed."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    used: set[str] = set()
    for name, param in unet.named_parameters():
        prefix = next((p for p in lr_scales if name.startswith(p)), None)
        if prefix is not None:
            used.add(prefix)
        groups.setdefault(1.0 if prefix is None else float(lr_scales[prefix]), []).append(param)
    if unused := sorted(set(lr_scales) - used):
        raise ValueError(f"lr_scales prefixes name no UNet parameter: {unused}")
    groups.setdefault(1.0, []).extend(text.parameters())
    return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]


def _ema_tensors(ema: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {**_flat("ema_unet", ema[0].state_dict()), **_flat("ema_text", ema[1].state_dict())}


def _part_of(key: str) -> str:
    """Which part a checkpoint tensor travels in: its module (``unet``, ``ema_unet``, ...), or for AdamW's state
    its kind (``opt-exp_avg``, ...), so no part is bigger than about one UNet."""
    head, _, rest = key.partition(".")
    return f"opt-{rest.split('.', 1)[1]}" if head == "opt" else head


def export_state(folder: Path, dest: Path) -> list[str]:
    """Write a resumable checkpoint (``train_unet``'s state folder) to ``dest`` as several safetensors files,
    each under git hosts' 100 MB limit (one UNet's weights, its EMA, each AdamW moment), plus its ``meta.json``.

    A pretraining run longer than a session moves to the next machine through git this way;
    ``import_state`` puts it back, checked against the hash the checkpoint recorded.
    """
    if (loaded := _load_state(folder)) is None:
        raise DatasetDMError(folder, "meta.json", "no checkpoint here to export")
    tensors, meta = loaded
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        parts.setdefault(_part_of(key), {})[key] = value
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        for name, part in sorted(parts.items()):
            save_file({k: v.contiguous() for k, v in part.items()}, tmp / f"{name}.safetensors")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    logger.info("exported step %s to %s in %d parts", meta.get("step"), dest, len(parts))
    return sorted(parts)


def import_state(src: Path, folder: Path) -> int:
    """Rebuild the checkpoint ``export_state`` split into ``src`` at ``folder``; returns its step. The rebuilt file
    must hash to what the original recorded, so a part lost or changed in transit is refused, not resumed from."""
    meta = json.loads((src / "meta.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for part in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(part))
    _save_state(folder, tensors, {k: v for k, v in meta.items() if k != "sha256"})
    rebuilt = json.loads((folder / "meta.json").read_text())["sha256"]
    if rebuilt != meta.get("sha256"):
        shutil.rmtree(folder)
        raise DatasetDMError(src, "sha256", "the parts do not rebuild the exported checkpoint; export it again")
    return int(meta["step"])


def snapshot_components(params: Params, snapshot: Path) -> dict[str, Any]:
    """The pipeline as it stood at one snapshot: trained VAE, EMA UNet and text encoder (for the fidelity curve)."""
    from diffusers import AutoencoderKL

    components = build_components(params)
    components["vae"] = AutoencoderKL.from_pretrained(work_dir(params) / VAE_FINAL, use_safetensors=True).eval()
    tensors, _ = _load_state(snapshot, settings_key(params, "unet"))
    components["unet"].load_state_dict(_unflat("ema_unet", tensors))
    components["text_encoder"].load_state_dict(_unflat("ema_text", tensors))
    return components


def snapshots(params: Params) -> list[tuple[int, Path]]:
    """(step, folder) of every EMA snapshot written so far, in step order."""
    key = settings_key(params, "unet")
    found = sorted((work_dir(params) / SNAPSHOTS).glob("step-*"))
    metas = [(json.loads((f / "meta.json").read_text()), f) for f in found if (f / "meta.json").is_file()]
    return [(int(meta["step"]), f) for meta, f in metas if meta.get("settings") == key]


def vae_of_folder(vae: torch.nn.Module, folder: Path) -> tuple[torch.nn.Module, float]:
    """``vae`` (built from ``params.pretrain.vae``) holding the weights of ``folder``'s VAE, and that VAE's scaling
    factor; a folder whose VAE has another shape is refused, naming the first differing tensor."""
    from diffusers import AutoencoderKL

    src = folder / "vae"
    if not (src / "config.json").is_file():
        raise DatasetDMError(src, "config.json", "no VAE there: pass a pipeline folder `make pretrain` wrote")
    found = AutoencoderKL.from_pretrained(src, use_safetensors=True)
    want, have = vae.state_dict(), found.state_dict()
    keys = sorted(want.keys() | have.keys())
    if bad := next((k for k in keys if k not in have or k not in want or have[k].shape != want[k].shape), None):
        got, built = (tuple(d[bad].shape) if bad in d else "none" for d in (have, want))
        raise DatasetDMError(src, bad, f"shape {got}, params.pretrain.vae builds {built}: not this config's VAE")
    vae.load_state_dict(have)
    return vae.eval(), float(found.config.scaling_factor)


def work_dir(params: Params) -> Path:
    """Checkpoints live beside the output folder, never inside what ships."""
    out = Path(params.pretrain.out)
    return out.parent / f"{out.name}.work"


def build_components(params: Params) -> dict[str, Any]:
    """Fresh components from ``params.pretrain`` (deterministic per seed)."""
    return build_sd_components(mini_sd_configs(params.pretrain, params.world.image_size), seed=params.pretrain.seed)


def pretrain_sd(
    params: Params,
    *,
    out: str | Path | None = None,
    device: str = "cpu",
    preview: bool = True,
    until_step: int | None = None,
    vae_from: str | Path | None = None,
) -> dict[str, Any]:
    """Train the miniature SD (VAE, then UNet + text encoder) and save it as a pipeline folder at ``out``.

    With ``until_step`` below ``pretrain.steps`` it stops there, checkpointed, and saves nothing
    to ``out``: run it again (with or without ``until_step``) to go on from that step.
    ``vae_from`` (a pipeline folder this function wrote, ``out`` itself allowed) skips the VAE
    stages and trains the UNet on that folder's VAE: VAE checkpoints stay on the machine that
    trained them, and retraining them on another CPU may give other bytes, so a UNet carried on
    elsewhere (``import_state``) or a new UNet design compared at matched latents needs the
    very VAE that shipped.
    """
    if until_step is not None and until_step < 1:
        raise ValueError(f"until_step must be >= 1, got {until_step}")
    cfg = params.pretrain
    out = Path(out or cfg.out)
    dev = torch.device(device)
    work = work_dir(params)
    start = time.monotonic()
    # 1. fresh modules (a VAE from ``vae_from`` checked before any work: rendering the pool takes a while), data
    components = build_components(params)
    taken = vae_of_folder(components["vae"], Path(vae_from)) if vae_from is not None else None
    work.mkdir(parents=True, exist_ok=True)
    images, captions = render_pool(params, cfg.pool_size, cfg.seed)
    # 2. the VAE (trained here, or taken whole from a finished folder), its pool latents and scaling factor
    if taken is None:
        vae = train_vae(params, components["vae"], images, work=work, device=dev)
        means, stds = encode_pool(vae, images, dev)
        for run in decoder_passes(params):
            vae = finetune_decoder(params, vae, images, run=run, means=means, stds=stds, work=work, device=dev)
        scaling = float(1.0 / means.std().item())
    else:
        vae, scaling = taken
        means, stds = encode_pool(vae.to(dev), images, dev)
        logger.info(
            "VAE from %s (scaling_factor %.5f; the pool's latents give %.5f)",
            vae_from,
            scaling,
            1.0 / means.std().item(),
        )
    vae.register_to_config(scaling_factor=scaling)
    components["vae"] = vae.cpu().eval()
    components["vae"].save_pretrained(work / VAE_FINAL, safe_serialization=True)  # snapshots are measured with it
    logger.info("VAE scaling_factor %.5f", scaling)
    # 3. UNet + text encoder
    unet, text, log, reached = train_unet(
        params, components, means=means, stds=stds, captions=captions, work=work, device=dev, until_step=until_step
    )
    if reached < cfg.steps:
        logger.info("stopped at step %d of %d (checkpointed in %s)", reached, cfg.steps, work)
        return {"stopped_at": reached, "steps": cfg.steps, "work": str(work)}
    components.update(unet=unet.cpu().eval(), text_encoder=text.cpu().eval())
    # 4. save as a diffusers pipeline folder, preview beside it
    with atomic_path(out) as tmp:
        save_sd_folder(components, tmp)
        log_file = {"scaling_factor": scaling, "log": log, "fingerprint": folder_fingerprint(tmp)}
        write_json(tmp / PRETRAIN_LOG, log_file)  # the seal StableDiffusionBackbone.load checks
    if preview:
        from datasetdm.backbones.preview import preview_grid
        from datasetdm.backbones.sd import StableDiffusionBackbone

        preview_grid(StableDiffusionBackbone.load(str(out)), out / "preview.png")
    return {
        "steps": cfg.steps,
        "vae_steps": cfg.vae.steps if vae_from is None else f"from {vae_from}",
        "minutes": (time.monotonic() - start) / 60,
        "final_loss": log[-1]["loss"] if log else None,
        "scaling_factor": scaling,
    }
