"""The (a) arm of the downstream audit, trained once per real set and recipe.

The models trained on the K real images alone depend on the real sets and the training
recipe, never on what the factory generates, yet they were retrained on every run: a
third of the audit, the longest stage of ``make run``. The ``baseline`` stage trains
them and writes their per-seed held-out results to ``downstream.baseline``, a file
tracked in git as the metrics are, under a key naming what they are a function of (the
digests of the labelled and held-out sets, the classes, the recipe and the seeds). The
``downstream`` stage reuses those results when the key matches and trains the arm itself
when it does not, so a missing or stale file costs time, never a wrong figure.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from datasetdm.config import DownstreamConfig
from datasetdm.downstream.data import ArraySet
from datasetdm.downstream.uplift import score_arms
from datasetdm.errors import DatasetDMError
from datasetdm.io import sha256_dir
from datasetdm.realset import LabelledImage

logger = logging.getLogger(__name__)
RECIPE = ("steps", "batch_size", "lr", "width", "seed", "colour_jitter")


def baseline_key(train_dir: Path, test_dir: Path, classes: tuple[str, ...], cfg: DownstreamConfig) -> dict[str, Any]:
    """What the (a) arm's results are a function of (``cfg.seeds`` seeds, as ``downstream`` trains them)."""
    return {
        "labelled": sha256_dir(train_dir),
        "held_out": sha256_dir(test_dir),
        "classes": list(classes),
        "recipe": {name: getattr(cfg, name) for name in RECIPE},
        "seeds": cfg.seeds,
    }


def train_baseline(
    real: ArraySet, test: list[LabelledImage], classes: tuple[str, ...], *, cfg: DownstreamConfig, key: dict
) -> dict[str, Any]:
    """Train and score the (a) arm: ``{"key": key, "real": task -> held-out result per seed}``."""
    scores = score_arms({"real": [real]}, test, classes, cfg=cfg, seeds=key["seeds"])
    return {"key": key, "real": {task: arms["real"] for task, arms in scores.items() if "real" in arms}}


def read_baseline(path: str | Path, key: dict[str, Any]) -> dict[str, list[dict]] | None:
    """The stored (a) results if ``path`` holds them for ``key``; None (and why, in the log) otherwise."""
    path = Path(path)
    if not path.is_file():
        logger.info("no baseline at %s: the real-only arm is trained here", path)
        return None
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetDMError(path, None, f"not valid JSON ({e}); delete it or run the baseline stage") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("real"), dict):
        raise DatasetDMError(path, "real", "missing or not an object; delete the file or run the baseline stage")
    if stored.get("key") != key:
        logger.info("baseline at %s is of other real sets or another recipe: the real-only arm is trained here", path)
        return None
    logger.info("real-only arm reused from %s (same real sets and recipe)", path)
    return stored["real"]
