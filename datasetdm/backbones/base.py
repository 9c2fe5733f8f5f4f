"""The contract a backbone fulfils (``StableDiffusionBackbone``: SD 1.x/2.x folders and the embedded miniature SD).

The decoder, generation, filtering and export code only ever see this interface, so
swapping the embedded miniature SD for real Stable Diffusion is a params change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Features:
    """What a backbone hands the P-Decoder for a batch of B images.

    ``maps``: multi-scale UNet decoder-block features, coarse to fine, each (B, C_i, h_i, w_i).
    ``attention``: cross-attention probability per prompt token, averaged over heads,
    layers and resolutions, (B, T, h, w) at the finest attention resolution.
    ``prompts``: the prompt of each image (to find which token is which word).
    """

    maps: list[torch.Tensor]
    attention: torch.Tensor
    prompts: list[str]

    def select(self, index: slice | list[int]) -> "Features":
        idx = list(range(len(self.prompts)))[index] if isinstance(index, slice) else index
        return Features([m[idx] for m in self.maps], self.attention[idx], [self.prompts[i] for i in idx])

    def to(self, device: torch.device | str) -> "Features":
        return Features([m.to(device) for m in self.maps], self.attention.to(device), self.prompts)

    def pooled(self) -> torch.Tensor:
        """(B, 4 sum C_i) float32: each scale's map averaged over the quadrants of the image.

        The image as the backbone sees it, in a thousand-odd numbers: curation searches
        near duplicates and similar samples with it. Quadrants, not one global mean,
        so that the same shape in another place is similar but not a duplicate. Each
        scale is normalised on its own so the wide maps do not drown the narrow ones;
        the row then has unit length (cosine-ready).
        """
        scales = [
            torch.nn.functional.normalize(torch.nn.functional.adaptive_avg_pool2d(m.float(), 2).flatten(1), dim=1)
            for m in self.maps
        ]
        return torch.cat(scales, dim=1) / len(scales) ** 0.5


class Backbone(Protocol):
    """A text-to-image diffusion model that can report where things are."""

    name: str
    image_size: int

    def fingerprint(self) -> str:
        """Content hash of the weights and config: recorded with every sample."""

    def token_positions(self, prompt: str, word: str) -> list[int]:
        """Token indices of ``word`` in ``prompt`` (to read its attention map)."""

    def validate_prompt(self, prompt: str) -> None:
        """Raise ``DatasetDMError`` if the prompt cannot be encoded."""

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
        """Generate images (B, 3, H, W) in [0, 1]; capture features at ``capture_timestep``.

        Each image's initial noise comes from its own seed, so a sample does not depend
        on which batch it was generated in. With ``init_images`` (B, 3, H, W) in [0, 1]
        sampling starts from those images noised to ``strength`` of the schedule
        (SDEdit / diffusers img2img): the layout survives, the pixels are regenerated.
        """

    def extract_features(self, images: torch.Tensor, prompts: list[str], timestep: int, seeds: list[int]) -> Features:
        """Features of real images: encode, noise to ``timestep``, one UNet pass."""

    def autoencode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] through the latent codec and back: what no generated image can exceed."""


def img2img_timesteps(timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a sampling schedule that img2img runs, as diffusers' img2img pipelines cut it."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    keep = max(1, min(int(len(timesteps) * strength), len(timesteps)))
    return timesteps[len(timesteps) - keep :]
