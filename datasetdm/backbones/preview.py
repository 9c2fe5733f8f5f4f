"""A labelled grid of backbone samples: the quickest way to see if a model follows prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datasetdm.backbones.base import Backbone
from datasetdm.export.grid import sample_grid

PREVIEW_PROMPTS = (
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow star",
    "a red hexagon",
    "two blue circles",
    "three yellow squares",
    "a green star and a red square",
    "a blue triangle and a yellow circle",
    "two red stars",
    "a green hexagon and a blue star",
    "",
)


def preview_grid(
    backbone: Backbone,
    path: str | Path,
    *,
    prompts: tuple[str, ...] = PREVIEW_PROMPTS,
    seeds_per_prompt: int = 2,
    steps: int = 20,
    guidance_scale: float = 3.0,
    columns: int = 6,
) -> None:
    """Sample each prompt with a few seeds and write them, captioned, to one PNG."""
    items = []
    for k, prompt in enumerate(prompts):
        seeds = [1000 * k + j for j in range(seeds_per_prompt)]
        images, _ = backbone.sample([prompt] * seeds_per_prompt, seeds, steps=steps, guidance_scale=guidance_scale)
        for img in images:
            pixels = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            items.append((pixels, None, prompt or "(empty prompt)", None))
    sample_grid(items, path, columns=columns, scale=2)
