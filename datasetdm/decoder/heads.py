"""P-Decoder heads: small modules on the shared trunk, registered by name.

Every head takes the trunk's full-resolution feature map (B, D, H, W) and returns a
tensor; ``loss`` compares it with the target the labelled set provides. Adding a
task means adding a head here, not a new decoder.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from datasetdm.keypoints import CHANNELS, focal_loss


class SemanticHead(nn.Module):
    """Per-pixel class logits (B, 1 + C, H, W); index 0 is background."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, 1 + num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    @staticmethod
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy plus soft Dice: Dice keeps small objects from being ignored."""
        ce = F.cross_entropy(logits, target.long())
        probs = logits.softmax(1)
        onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).float()
        inter = (probs * onehot).sum((0, 2, 3))
        dice = 1 - (2 * inter + 1) / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)
        return ce + dice.mean()


class DepthHead(nn.Module):
    """Per-pixel metric depth (B, H, W) in metres, predicted as log-depth.

    Log space makes the loss scale-aware in the way depth metrics are (AbsRel is a
    ratio): an error of 10 cm matters more at 1 m than at 5 m.

    ``coords`` joins each pixel's (x, y) in [-1, 1] to the head's input (CoordConv, Liu et
    al. 2018; camera-aware depth convolutions, Facil et al. 2019). Where a pixel sits in
    the frame is a strong depth cue (the ground recedes upwards), and a convolution cannot
    see it: without it, a head fitted to K = 20 images reads each image's depth level from
    its texture instead, which does not carry over to new images.
    """

    def __init__(self, channels: int, num_classes: int, coords: bool = False, background_prior: bool = False) -> None:
        super().__init__()
        self.coords = coords
        cin = channels + (2 if coords else 0)
        self.proj = nn.Sequential(nn.Conv2d(cin, channels, 3, padding=1), nn.GELU(), nn.Conv2d(channels, 1, 1))
        self.background_prior = background_prior
        if background_prior:  # saved with the weights: the K images' mean background surface (``fit_background``)
            self.register_buffer("surface", torch.zeros(len(SURFACE_TERMS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.coords:
            x = torch.cat([x, coordinate_grid(x)], 1)
        return self.proj(x)[:, 0]  # log metres

    @staticmethod
    def loss(log_depth: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scale-invariant log loss (Eigen et al., lambda 0.85) plus L1 on log depth for the absolute scale."""
        valid = target > 0
        d = (log_depth - target.clamp_min(1e-3).log())[valid]
        if d.numel() == 0:
            return log_depth.sum() * 0
        silog = (d.pow(2).mean() - 0.85 * d.mean().pow(2)).clamp_min(0).sqrt()
        return silog + d.abs().mean()

    @staticmethod
    def metres(log_depth: torch.Tensor) -> torch.Tensor:
        return log_depth.exp()

    # -- the background prior (``decoder.depth_background_prior``) ------------------------
    @torch.no_grad()
    def fit_background(self, depth: torch.Tensor, semantic: torch.Tensor) -> None:
        """Fit ``surface``: a quadratic in the pixel's (x, y), least squares over every background pixel
        with a known depth in the labelled targets (``depth`` (N, H, W) metres, 0 where unknown).

        Why a prior and not the head: the background is a ground plane whose distance
        nothing in the image shows (the shapes world draws each image's level at random, as
        a real camera's height is unknown from one frame), so the best label a labeller can
        give is the mean surface. A head fitted to K = 20 images instead reads each image's
        level from its texture (measured on the validation set of ``scripts/depth_label_error.py``:
        AbsRel on the background 0.072 from the head, 0.046 from this surface).

        The normal equations are summed per pixel position (how many images have a known
        background there, and their depths' sum), so the memory it adds is one image's: as one
        least-squares system over every pixel, an SD-sized bank would need gigabytes.
        """
        known = (semantic == 0) & (depth > 0)
        if not known.any():
            raise ValueError("no background pixel with a known depth to fit the background prior to")
        count = depth.new_zeros(depth.shape[-2:], dtype=torch.float64)  # (H, W)
        total = torch.zeros_like(count)
        for image, mask in zip(depth, known):  # image by image, so memory stays one image's
            count += mask
            total += torch.where(mask, image.double(), 0)
        # The grid in the depth's dtype, then widened: the pixel coordinates the surface is read at.
        terms = _surface_terms(coordinate_grid(depth[:1, None]).double())[:, 0]  # (T, H, W)
        gram = torch.einsum("shw,thw,hw->st", terms, terms, count)
        moments = torch.einsum("thw,hw->t", terms, total)
        solution = torch.linalg.lstsq(gram, moments[:, None]).solution[:, 0]
        self.surface.copy_(solution.to(self.surface.dtype))

    def background_surface(self, height: int, width: int) -> torch.Tensor:
        """The fitted surface in metres, (H, W) at any resolution."""
        grid = coordinate_grid(self.surface.new_zeros(1, 1, height, width))
        return torch.einsum("t,thw->hw", self.surface, _surface_terms(grid)[:, 0])

    def depth_labels(self, metres: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The depth maps generation stores: the head's metres (B, H, W), with the background surface on
        the pixels ``labels`` (B, H, W) call background where this head has the prior."""
        if not self.background_prior:
            return metres
        surface = self.background_surface(*metres.shape[-2:]).to(metres)
        return torch.where(labels == 0, surface, metres)


SURFACE_TERMS = ("1", "x", "y", "x*x", "x*y", "y*y")  # the background surface's polynomial in pixel (x, y)


def _surface_terms(grid: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) coordinates -> (T, B, H, W), one map per ``SURFACE_TERMS`` entry."""
    x, y = grid[:, 0], grid[:, 1]
    return torch.stack([torch.ones_like(x), x, y, x * x, x * y, y * y])


def coordinate_grid(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) pixel centres' x and y in [-1, 1], on ``x``'s device and dtype."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))
    return grid[None].expand(b, -1, -1, -1)


class KeypointHead(nn.Module):
    """Class-agnostic keypoint heatmap logits (B, 2, H, W): centres and corners.

    Which corner is "corner1" is a convention of symmetric shapes, not something the
    image shows, so the head only says *where* keypoints are; ``datasetdm.keypoints``
    groups peaks into COCO keypoints per instance.
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(), nn.Conv2d(channels, len(CHANNELS), 1)
        )
        nn.init.constant_(self.proj[-1].bias, -2.19)  # start at p = 0.1 everywhere (CenterNet's prior)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    @staticmethod
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, target)


HEADS: dict[str, Callable[..., nn.Module]] = {
    "semantic": SemanticHead,
    "depth": DepthHead,
    "keypoints": KeypointHead,
}
