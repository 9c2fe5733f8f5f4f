"""Prompt expansion v1: classes x colours x counts x templates, deterministic.

Every distinct multiset of (shape, colour) objects has one canonical caption, so
deduplication is exact. Prompts are balanced over the object count (otherwise the
combinatorics make almost every prompt a crowded one) and shuffled with a fixed seed.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np

from datasetdm.config import PromptsConfig, WorldConfig
from datasetdm.worlds.shapes import caption_for

logger = logging.getLogger(__name__)


def expand_prompts(world: WorldConfig, cfg: PromptsConfig) -> list[dict]:
    """Return up to ``cfg.num_prompts`` records ``{"prompt", "layout"}``, deduplicated.

    When fewer distinct layouts exist than asked for, all of them are returned.
    """
    pairs = [(s, c) for s in world.classes for c in world.colours]
    rng = np.random.default_rng(cfg.seed)
    pools: list[list[tuple[tuple[str, str], ...]]] = []
    for n in range(1, cfg.max_objects + 1):
        layouts = list(itertools.combinations_with_replacement(pairs, n))
        pools.append([layouts[i] for i in rng.permutation(len(layouts))])
    chosen: list[tuple[tuple[str, str], ...]] = []
    cursors = [0] * len(pools)
    while len(chosen) < cfg.num_prompts and any(c < len(p) for c, p in zip(cursors, pools)):
        for k, pool in enumerate(pools):
            if cursors[k] < len(pool) and len(chosen) < cfg.num_prompts:
                chosen.append(pool[cursors[k]])
                cursors[k] += 1
    records, seen = [], set()
    for layout in chosen:
        for template in cfg.templates:
            prompt = template.format(objects=caption_for(list(layout)))
            if prompt not in seen:
                seen.add(prompt)
                records.append({"prompt": prompt, "layout": [list(p) for p in layout]})
    if len(records) < cfg.num_prompts:
        logger.info(
            "prompts.num_prompts is %d, but the world has only %d distinct prompts: all of them are used",
            cfg.num_prompts,
            len(records),
        )
    return records[: cfg.num_prompts]
