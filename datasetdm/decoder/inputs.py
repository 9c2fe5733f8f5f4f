"""Turning backbone features into the P-Decoder's fixed-layout inputs.

Cross-attention maps are per *token*, and prompts differ in length and word order.
The decoder needs a fixed channel per *class*, so each class's channel is the sum of
the maps of the tokens naming it (singular or plural); a class the prompt does not
mention gets zeros. Maps are rescaled to a max of 1 because raw attention mass
shrinks as prompts get longer.
"""

from __future__ import annotations

import torch

from datasetdm.backbones.base import Backbone, Features
from datasetdm.worlds.shapes import PLURAL


def class_words(name: str) -> tuple[str, ...]:
    return (name, PLURAL[name]) if name in PLURAL else (name,)


def class_attention(features: Features, backbone: Backbone, classes: tuple[str, ...]) -> torch.Tensor:
    """(B, C, h, w) attention per class, each map scaled to max 1 (zeros if unmentioned)."""
    b, _, h, w = features.attention.shape
    out = features.attention.new_zeros(b, len(classes), h, w)
    for i, prompt in enumerate(features.prompts):
        for c, name in enumerate(classes):
            positions = [p for word in class_words(name) for p in backbone.token_positions(prompt, word)]
            if positions:
                m = features.attention[i, positions].sum(0)
                out[i, c] = m / m.amax().clamp_min(1e-8)
    return out


def prompt_classes(prompt: str, backbone: Backbone, classes: tuple[str, ...]) -> list[str]:
    """The classes a prompt mentions, in vocabulary order."""
    return [name for name in classes if any(backbone.token_positions(prompt, w) for w in class_words(name))]
