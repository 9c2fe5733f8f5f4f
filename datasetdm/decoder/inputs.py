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


def named_class_mask(prompts: list[str], backbone: Backbone, classes: tuple[str, ...]) -> torch.Tensor:
    """(B, 1 + C) bool: background plus the classes each prompt names.

    A generated image's prompt says which classes it should contain, so the decoder
    only chooses among those (and background). The same restriction is used in
    training, so the decoder spends its few labelled examples on telling *named*
    classes apart rather than on ruling out absent ones.
    """
    mask = torch.zeros(len(prompts), 1 + len(classes), dtype=torch.bool)
    mask[:, 0] = True
    for i, prompt in enumerate(prompts):
        for name in prompt_classes(prompt, backbone, classes):
            mask[i, 1 + classes.index(name)] = True
    return mask


def restrict_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Push logits of classes outside ``mask`` (B, 1 + C) to a large negative value."""
    return logits.masked_fill(~mask.to(logits.device)[:, :, None, None], -1e4)
