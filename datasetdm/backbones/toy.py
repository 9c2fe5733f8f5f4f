"""The embedded toy text-to-image backbone: a small diffusers UNet over patch latents.

It is built the way Stable Diffusion is (UNet2DConditionModel + text encoder +
codec + DDPM/DDIM schedulers), small enough to train on two CPU cores in minutes,
and it ships trained inside the repo so the default factory run needs no download.
Weights are safetensors; the architecture lives in ``config.json`` beside them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from datasetdm.backbones.base import Features, img2img_timesteps
from datasetdm.backbones.codec import PatchCodec
from datasetdm.backbones.text import TextEncoder, TextEncoderConfig, WordTokenizer, default_vocab
from datasetdm.capture import FeatureCapture
from datasetdm.checkpoints import load_weights
from datasetdm.errors import DatasetDMError
from datasetdm.io import atomic_path

CONFIG_FILE, UNET_FILE, TEXT_FILE = "config.json", "unet.safetensors", "text_encoder.safetensors"


def toy_config(image_size: int = 64, patch_size: int = 4, block_out_channels: tuple[int, ...] = (32, 64, 64),
               layers_per_block: int = 1, text_dim: int = 64, text_layers: int = 2) -> dict[str, Any]:
    """The full architecture description of a toy backbone, as saved in config.json."""
    vocab = default_vocab()
    n = len(block_out_channels)
    channels = 3 * patch_size**2
    return {
        "kind": "toy",
        "image_size": image_size,
        "patch_size": patch_size,
        "vocab": vocab,
        "text": {"vocab_size": len(vocab), "dim": text_dim, "layers": text_layers, "heads": 4, "max_length": 16},
        "unet": {
            "sample_size": image_size // patch_size,
            "in_channels": channels,
            "out_channels": channels,
            "block_out_channels": list(block_out_channels),
            "layers_per_block": layers_per_block,
            # Full resolution has no attention (it is the costly level); cross-attention
            # at every coarser level gives the per-token maps the decoder reads.
            "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
            "up_block_types": ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
            "cross_attention_dim": text_dim,
            "attention_head_dim": 8,
            "norm_num_groups": 16,
        },
        # v-prediction: at high noise an epsilon-predicting model must reproduce its input
        # almost exactly and its x0 estimate explodes (measured: pure-noise samples after
        # 1300 CPU steps); v stays well scaled at every t. Patch latents live in [-1, 1]
        # exactly, so clipping the x0 estimate while sampling is free and safe.
        "scheduler": {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
                      "clip_sample": True},
    }


class ToyBackbone:
    """Implements ``datasetdm.backbones.base.Backbone`` for the embedded model."""

    name = "toy"

    def __init__(self, config: dict[str, Any], unet: UNet2DConditionModel, text_encoder: TextEncoder, device: str = "cpu") -> None:
        self.config = config
        self.image_size = int(config["image_size"])
        self.codec = PatchCodec(int(config["patch_size"]))
        self.tokenizer = WordTokenizer(config["vocab"], config["text"]["max_length"])
        self.device = torch.device(device)
        self.unet = unet.to(self.device).eval()
        self.text_encoder = text_encoder.to(self.device).eval()
        self._fingerprint: str | None = None

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any], device: str = "cpu") -> "ToyBackbone":
        unet = UNet2DConditionModel(**config["unet"])
        text = TextEncoder(TextEncoderConfig(**config["text"]))
        return cls(config, unet, text, device)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "ToyBackbone":
        path = Path(path)
        cfg_file = path / CONFIG_FILE
        if not cfg_file.is_file():
            raise DatasetDMError(path, "backbone.path", f"no toy backbone here (missing {CONFIG_FILE}); run `make pretrain` or fix backbone.path")
        try:
            config = json.loads(cfg_file.read_text())
            model = cls.from_config(config, device="cpu")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DatasetDMError(cfg_file, None, f"not a toy backbone config ({e})") from None
        for file, module in ((UNET_FILE, model.unet), (TEXT_FILE, model.text_encoder)):
            _load_weights(path / file, module)
        model.unet.to(device)
        model.text_encoder.to(device)
        model.device = torch.device(device)
        return model

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            tmp.mkdir()
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config, indent=2) + "\n")
            save_file({k: v.contiguous().cpu() for k, v in self.unet.state_dict().items()}, tmp / UNET_FILE)
            save_file({k: v.contiguous().cpu() for k, v in self.text_encoder.state_dict().items()}, tmp / TEXT_FILE)
        self._fingerprint = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:

            digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
            for module in (self.unet, self.text_encoder):
                for k, v in sorted(module.state_dict().items()):
                    digest.update(k.encode())
                    digest.update(v.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    # -- text -----------------------------------------------------------------------
    def validate_prompt(self, prompt: str) -> None:
        if not prompt.strip():
            raise DatasetDMError(None, "prompt", "empty prompt")
        self.tokenizer([prompt])

    def token_positions(self, prompt: str, word: str) -> list[int]:
        return self.tokenizer.token_positions(prompt, word)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(self.tokenizer(prompts).to(self.device))

    def noise_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler(**self.config["scheduler"])

    def sample_scheduler(self) -> DDIMScheduler:
        return DDIMScheduler(**self.config["scheduler"], set_alpha_to_one=True)

    @property
    def latent_hw(self) -> tuple[int, int]:
        s = self.image_size // self.codec.patch_size
        return (s, s)

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """Per-sample noise: sample i depends on seeds[i] only, never on batch layout."""
        shape = (self.codec.latent_channels(), *self.latent_hw)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(self.device)

    # -- generation -------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float,
               capture_timestep: int | None = None, init_images: torch.Tensor | None = None,
               strength: float = 1.0) -> tuple[torch.Tensor, Features | None]:
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        scheduler = self.sample_scheduler()
        scheduler.set_timesteps(steps)
        cond = self.encode_prompts(prompts)
        use_cfg = guidance_scale != 1.0
        context = torch.cat([self.encode_prompts([""] * len(prompts)), cond]) if use_cfg else cond
        latents = self.initial_noise(seeds)
        timesteps = scheduler.timesteps
        if init_images is not None:
            timesteps = img2img_timesteps(timesteps, strength)
            latents = scheduler.add_noise(self.codec.encode(init_images.to(self.device)), latents, timesteps[:1])
        capture_index = None
        if capture_timestep is not None:
            capture_index = int((timesteps - capture_timestep).abs().argmin())
        features = None
        with FeatureCapture(self.unet) as cap:
            for i, t in enumerate(timesteps):
                x = torch.cat([latents, latents]) if use_cfg else latents
                cap.active = i == capture_index
                eps = self.unet(x, t, encoder_hidden_states=context).sample
                if cap.active:
                    maps, attention = cap.collected(self.latent_hw)
                    if use_cfg:  # keep the conditional half: it is what the prompt shaped
                        n = len(prompts)
                        maps, attention = [m[n:] for m in maps], attention[n:]
                    features = Features(maps, attention, list(prompts))
                    cap.active = False
                    cap.reset()
                if use_cfg:
                    uncond, cond_eps = eps.chunk(2)
                    eps = uncond + guidance_scale * (cond_eps - uncond)
                latents = scheduler.step(eps, t, latents).prev_sample
        return self.codec.decode(latents), features

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor, prompts: list[str], timestep: int, seeds: list[int]) -> Features:
        x0 = self.codec.encode(images.to(self.device))
        noise = self.initial_noise(seeds)
        t = torch.full((len(prompts),), int(timestep), dtype=torch.long, device=self.device)
        xt = self.noise_scheduler().add_noise(x0, noise, t)
        with FeatureCapture(self.unet) as cap:
            cap.active = True
            self.unet(xt, t, encoder_hidden_states=self.encode_prompts(prompts))
            maps, attention = cap.collected(self.latent_hw)
        return Features(maps, attention, list(prompts))


def _load_weights(file: Path, module: torch.nn.Module) -> None:
    load_weights(file, module, CONFIG_FILE)
