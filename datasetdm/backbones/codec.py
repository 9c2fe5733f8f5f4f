"""Space-to-depth "latent" codec for the toy backbone.

Stable Diffusion denoises VAE latents at 1/8 of the image size. Training a VAE costs
CPU time we do not have, and a learned codec would blur the exact edges the shapes
world is for. A 4x4 space-to-depth rearrangement gives the same shape of problem (a
UNet over a small spatial grid with many channels) losslessly: 64x64x3 <-> 16x16x48.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PatchCodec:
    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) floats in [0, 1] -> (B, 3*p*p, H/p, W/p) in [-1, 1]."""
        return F.pixel_unshuffle(images * 2 - 1, self.patch_size)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of ``encode``; output clamped to [0, 1]."""
        return ((F.pixel_shuffle(latents, self.patch_size) + 1) / 2).clamp(0, 1)

    def latent_channels(self, image_channels: int = 3) -> int:
        return image_channels * self.patch_size**2
