"""The arms of the downstream audit that never read the export, trained once per real set and recipe.

The models trained on the K real images alone depend on the real sets and the training
recipe, never on what the factory generates, yet they were retrained on every run: a
third of the audit, the longest stage of ``make run``. The ``baseline`` stage trains
them and writes their per-seed held-out results to ``downstream.baseline``, a file
tracked in git as the metrics are, under a key naming what they are a function of (the
digests of the labelled and held-out sets, the classes, the recipe and the seeds). The
``downstream`` stage reuses those results when the key matches and trains the arm itself
when it does not, so a missing or stale file costs time, never a wrong figure.

``make uplift`` has two such arms per model, (a) and the 2,000-image ceiling: half of its
hours. Each ``uplift-<model>`` stage keeps them beside its rows (``uplift_fixed_key``,
``read_fixed_arms``) and trains only the synthetic arms when the export alone changed.
That file lives inside the stage it serves, where DVC cannot tell a code change from
none, so its key names the code the arms run too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from datasetdm.config import DownstreamConfig, WorldConfig
from datasetdm.downstream.data import ArraySet
from datasetdm.downstream.uplift import score_arms
from datasetdm.errors import DatasetDMError
from datasetdm.io import sha256_dir
from datasetdm.realset import LabelledImage

logger = logging.getLogger(__name__)
RECIPE = ("steps", "batch_size", "lr", "width", "seed", "colour_jitter")
# the sources the (a) and ceiling arms of make uplift run: models, scoring, the ceiling's rendering
ARM_CODE = ("downstream", "evaluate", "worlds", "keypoints.py", "realset.py")


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
    return _read_keyed(path, key, "real", "run the baseline stage", "the real-only arm")


def uplift_fixed_key(
    train_dir: Path, test_dir: Path, classes: tuple[str, ...], cfg: DownstreamConfig, world: WorldConfig, model: str
) -> dict[str, Any]:
    """What one ``make uplift`` model's (a) and ceiling arms are a function of: everything but the export."""
    recipe = {name: getattr(cfg, name) for name in RECIPE}
    recipe["steps"] = getattr(cfg.uplift_steps, model)
    key = {
        "labelled": sha256_dir(train_dir),
        "held_out": sha256_dir(test_dir),
        "classes": list(classes),
        "recipe": recipe,
        "seeds": cfg.uplift_seeds,
        "ceiling": {"images": cfg.ceiling_images, "seed": cfg.ceiling_seed, "world": dataclasses.asdict(world)},
        "code": code_digest(ARM_CODE),
    }
    return json.loads(json.dumps(key))  # as it reads back from the file (tuples become lists)


def code_digest(names: tuple[str, ...]) -> str:
    """Hash of the package's Python sources under ``names`` (folders or files inside ``datasetdm/``)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for name in names:
        files = sorted((root / name).rglob("*.py")) if (root / name).is_dir() else [root / name]
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def read_fixed_arms(path: str | Path, key: dict[str, Any]) -> dict[str, dict[str, list[dict]]] | None:
    """Arm -> task -> held-out result per seed, if ``path`` holds them for ``key``; None otherwise."""
    return _read_keyed(path, key, "arms", "run dvc repro uplift", "the (a) and ceiling arms")


def _read_keyed(path: str | Path, key: dict[str, Any], field: str, remedy: str, what: str) -> Any | None:
    path = Path(path)
    if not path.is_file():
        logger.info("no stored results at %s: %s are trained here", path, what)
        return None
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetDMError(path, None, f"not valid JSON ({e}); delete it or {remedy}") from None
    if not isinstance(stored, dict) or not isinstance(stored.get(field), dict):
        raise DatasetDMError(path, field, f"missing or not an object; delete the file or {remedy}")
    if stored.get("key") != key:
        was = stored.get("key") if isinstance(stored.get("key"), dict) else {}
        differ = ", ".join(sorted(k for k in set(key) | set(was) if key.get(k) != was.get(k)))
        logger.info("results at %s differ in %s: %s are trained here", path, differ, what)
        return None
    logger.info("%s reused from %s (same %s)", what, path, ", ".join(key))
    return stored[field]
