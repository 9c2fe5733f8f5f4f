"""A real Stable Diffusion model (diffusers folder, offline) behind the ``Backbone`` interface.

Sampling reproduces ``diffusers.StableDiffusionPipeline`` step for step (same prompt
encoding, per-sample CPU generators through ``randn_tensor``, classifier-free
guidance when ``guidance_scale > 1``, DDIM, one batched VAE decode), so an annotated
sample is the image the stock pipeline would have made from the same seed; the only
addition is ``FeatureCapture`` reading attention and decoder maps at one step.

The capture instrumentation is installed once, for the backbone's lifetime, rather
than per call: ``torch.compile`` then sees one fixed set of processors and hooks and
specialises on ``capture.active`` (two graphs) instead of recompiling every batch.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from transformers.utils import logging as transformers_logging

from datasetdm.backbones.base import Features, img2img_timesteps
from datasetdm.backbones.sd_folder import (
    check_model_index,
    check_seal,
    folder_fingerprint,
    load_components,
    resolve_folder,
)
from datasetdm.capture import FeatureCapture
from datasetdm.errors import DatasetDMError

logger = logging.getLogger(__name__)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_device(device: str, source: str | None) -> torch.device:
    """The torch device named by ``backbone.device``, or a one-line error if this machine has none."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DatasetDMError(
            source, "backbone.device", f"not a torch device: {device!r} (e.g. cpu, cuda, cuda:1, mps)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DatasetDMError(
            source, "backbone.device", f"{device!r}, but this machine has no CUDA GPU usable by torch; use cpu"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DatasetDMError(source, "backbone.device", f"{device!r}, but MPS is not available here; use cpu")
    return dev


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Any:
    """Frozen, in eval mode, on ``device``; cast only if not loaded in ``dtype`` already (diffusers warns on every
    dtype cast)."""
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


class StableDiffusionBackbone:
    """Implements ``datasetdm.backbones.base.Backbone`` for SD 1.x/2.x-style diffusers pipelines.

    Images and features are handed back as float32 on ``output_device`` (the CPU unless
    given), whatever ``dtype`` and ``device`` the model runs in. The stages load it with
    ``output_device`` = ``backbone.device`` because the P-Decoder runs there too: on a
    GPU, copying every captured map to the CPU and back costs more than the decoder.
    """

    name = "stable-diffusion"

    def __init__(
        self,
        components: dict[str, Any],
        *,
        dtype: str = "float32",
        device: str = "cpu",
        output_device: str | torch.device = "cpu",
        channels_last: bool = False,
        compile: bool = False,
        folder: Path | None = None,
        source: str | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise DatasetDMError(source, "backbone.dtype", f"must be one of {list(DTYPES)}, got {dtype!r}")
        self.dtype_name, self.dtype = dtype, DTYPES[dtype]
        self.device = parse_device(device, source)
        self.folder = folder
        self.output_device = parse_device(str(output_device), source)
        self.tokenizer = components["tokenizer"]
        self.scheduler_config = dict(components["scheduler"].config)
        self.unet = _place(components["unet"], self.device, self.dtype)
        self.vae = _place(components["vae"], self.device, self.dtype)
        self.text_encoder = _place(components["text_encoder"], self.device, self.dtype)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_size = int(self.unet.config.sample_size) * self.vae_scale_factor
        self.latent_hw = (int(self.unet.config.sample_size),) * 2
        self._check_dtype_runs(source)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        self.capture = FeatureCapture(self.unet).__enter__()
        if compile:
            self.unet.compile()
        logger.info(
            "stable-diffusion backbone from %s: %s on %s, results on %s, %dpx, channels_last=%s, compile=%s",
            folder if folder is not None else "components in memory",
            dtype,
            self.device,
            self.output_device,
            self.image_size,
            channels_last,
            compile,
        )
        self._fingerprint: str | None = None
        self._token_cache: dict[str, list[str]] = {}

    @classmethod
    def load(
        cls,
        model: str,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        output_device: str | torch.device = "cpu",
        channels_last: bool = False,
        compile: bool = False,
        source: str | None = None,
    ) -> "StableDiffusionBackbone":
        """Load from a local diffusers folder (or a hub id already cached); never downloads."""
        if dtype not in DTYPES:
            raise DatasetDMError(source, "backbone.dtype", f"must be one of {list(DTYPES)}, got {dtype!r}")
        parse_device(device, source)  # fail before reading gigabytes
        parse_device(str(output_device), source)
        folder = resolve_folder(model)
        check_model_index(folder)
        check_seal(folder)
        return cls(
            load_components(folder, DTYPES[dtype]),
            dtype=dtype,
            device=device,
            output_device=output_device,
            channels_last=channels_last,
            compile=compile,
            folder=folder,
            source=source,
        )

    def _check_dtype_runs(self, source: str | None) -> None:
        """One text-encoder, UNet and VAE pass at the smallest size: fail now, on one line, if the dtype can't run
        here."""
        try:
            with torch.no_grad():
                side = 2 ** (len(self.unet.config.block_out_channels) - 1)
                context = self.encode_prompts([""])
                x = torch.zeros(1, self.unet.config.in_channels, side, side, device=self.device, dtype=self.dtype)
                self.unet(x, 1, encoder_hidden_states=context)
                self.vae.decode(x[:, : self.vae.config.latent_channels])
        except (RuntimeError, NotImplementedError, TypeError) as e:
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise DatasetDMError(
                source,
                "backbone.dtype",
                f"{self.dtype_name} does not run on {self.device} here ({first[:200]}); use float32",
            ) from None

    def fingerprint(self) -> str:
        """Weights, configs and the dtype (a float16 run draws different samples from a float32 one)."""
        if self._fingerprint is None:
            digest = hashlib.sha256(f"stable-diffusion:{self.dtype_name}:".encode())
            if self.folder is not None:
                digest.update(folder_fingerprint(self.folder).encode())
            else:  # built in memory (benchmarks): hash the weights themselves
                for module in (self.unet, self.vae, self.text_encoder):
                    for k, v in sorted(module.state_dict().items()):
                        digest.update(k.encode())
                        digest.update(v.detach().float().cpu().contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    # -- text -----------------------------------------------------------------------
    def _tokens(self, text: str) -> list[str]:
        if text not in self._token_cache:
            # A prompt longer than the encoder takes is validate_prompt's one-line error, not a tokenizer warning.
            level = transformers_logging.get_verbosity()
            transformers_logging.set_verbosity_error()
            try:
                self._token_cache[text] = list(self.tokenizer.tokenize(text))
            finally:
                transformers_logging.set_verbosity(level)
        return self._token_cache[text]

    def validate_prompt(self, prompt: str) -> None:
        if not prompt.strip():
            raise DatasetDMError(None, "prompt", "empty prompt")
        tokens = self._tokens(prompt)
        room = self.tokenizer.model_max_length - 2
        if len(tokens) > room:
            raise DatasetDMError(
                None, "prompt", f"{prompt!r} is {len(tokens)} tokens; the CLIP text encoder takes at most {room}"
            )
        if self.tokenizer.unk_token in tokens:
            raise DatasetDMError(None, "prompt", f"{prompt!r} has characters this tokenizer cannot encode")

    def token_positions(self, prompt: str, word: str) -> list[int]:
        """Indices (after the start token) of every BPE token of each whole-word occurrence of ``word``.

        A word may be several tokens ("gre", "en</w>"); a match must start a word, and
        it ends one because a word's last token carries "</w>", so "circle" never
        matches inside "circles".
        """
        tokens, target = self._tokens(prompt), self._tokens(word)
        n, room = len(target), self.tokenizer.model_max_length - 2
        out: list[int] = []
        if n == 0:
            return out
        for i in range(min(len(tokens), room) - n + 1):
            if tokens[i : i + n] == target and (i == 0 or tokens[i - 1].endswith("</w>")):
                out.extend(range(i + 1, i + 1 + n))
        return out

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP last hidden states (B, 77, D), padded and truncated as the SD pipeline does."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = (
            ids.attention_mask.to(self.device)
            if getattr(self.text_encoder.config, "use_attention_mask", False)
            else None
        )
        return self.text_encoder(ids.input_ids.to(self.device), attention_mask=mask)[0].to(self.dtype)

    # -- diffusion ------------------------------------------------------------------------
    def scheduler(self) -> DDIMScheduler:
        return DDIMScheduler.from_config(self.scheduler_config)

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """Per-sample noise from per-sample CPU generators, drawn exactly as the SD pipeline draws it."""
        shape = (len(seeds), self.unet.config.in_channels, *self.latent_hw)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        return randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)

    def _collect(self, prompts: list[str], keep_last: int) -> Features:
        maps, attention = self.capture.collected(self.latent_hw)
        self.capture.active = False
        self.capture.reset()
        out = self.output_device
        return Features(
            [m[-keep_last:].to(out, torch.float32) for m in maps],
            attention[-keep_last:].to(out, torch.float32),
            list(prompts),
        )

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        steps: int,
        guidance_scale: float,
        capture_timestep: int | None = None,
        init_images: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> tuple[torch.Tensor, Features | None]:
        """Images (B, 3, H, W) float32 in [0, 1] on ``output_device`` and, if asked, features at the step nearest
        ``capture_timestep``."""
        if len(prompts) != len(seeds) or not prompts:
            raise ValueError("one seed per prompt, at least one prompt")
        scheduler = self.scheduler()
        scheduler.set_timesteps(steps, device=self.device)
        use_cfg = guidance_scale > 1.0  # as StableDiffusionPipeline.do_classifier_free_guidance
        context = self.encode_prompts(prompts)
        if use_cfg:
            context = torch.cat([self.encode_prompts([""] * len(prompts)), context])
        noise = self.initial_noise(seeds)
        latents = noise * scheduler.init_noise_sigma
        timesteps = scheduler.timesteps
        if init_images is not None:
            timesteps = img2img_timesteps(timesteps, strength)
            latents = scheduler.add_noise(self._encode(init_images), noise, timesteps[:1])
        capture_index = None
        if capture_timestep is not None:
            capture_index = int((timesteps.cpu() - capture_timestep).abs().argmin())
        features = None
        for i, t in enumerate(timesteps):
            x = torch.cat([latents, latents]) if use_cfg else latents
            x = scheduler.scale_model_input(x, t)
            self.capture.active = i == capture_index
            eps = self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
            if self.capture.active:  # the conditional half: it is what the prompt shaped
                features = self._collect(prompts, keep_last=len(prompts))
            if use_cfg:
                uncond, cond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(eps, t, latents, eta=0.0, return_dict=False)[0]
        return self._decode(latents), features

    @torch.no_grad()
    def autoencode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> the VAE's reconstruction at the model's size, in [0, 1].

        Every image the model draws leaves through this decoder, so its reconstructions bound
        how sharp a generated edge can be (audited in ``metrics/backbone.json``).
        """
        return self._decode(self._encode(images))

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents -> images (B, 3, H, W) in [0, 1], float32 on the output device: ``_encode``'s inverse."""
        images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1).to(self.output_device, torch.float32)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> scaled VAE latents (the mean, so only seeds vary noise), resized to the
        model's size."""
        x = images.float()
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True
            )
        x = (x * 2 - 1).to(self.device, self.dtype)
        return self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor, prompts: list[str], timestep: int, seeds: list[int]) -> Features:
        """Features of real images (B, 3, H, W) in [0, 1]: resize to the model's size, VAE-encode, noise to t, one UNet
        pass.

        Resizing makes real-image features the same shapes as generated ones (DatasetDM
        feeds SD its native resolution); the VAE mean is used so only the seed varies the noise.
        """
        latents = self._encode(images)
        t = torch.full((len(prompts),), int(timestep), dtype=torch.long, device=self.device)
        noisy = self.scheduler().add_noise(latents, self.initial_noise(seeds), t)
        self.capture.active = True
        try:
            self.unet(noisy, t, encoder_hidden_states=self.encode_prompts(prompts), return_dict=False)
            return self._collect(prompts, keep_last=len(prompts))
        finally:
            self.capture.active = False
            self.capture.reset()
