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


HEADS: dict[str, Callable[[int, int], nn.Module]] = {"semantic": SemanticHead}
