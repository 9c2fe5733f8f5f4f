"""What a run costs: wall seconds per stage, on the machine that ran it.

DVC records what each output is, not what it took to make. The command line times every
stage it runs and keeps the latest time per stage in ``.datasetdm/cost/<stage>.json``
beside ``params.yaml``: workspace state, not a DVC output, because the outputs must stay
byte-identical across runs and machines and a wall time never is. The report turns the
records into seconds per stage, images per hour and seconds per 1,000 kept samples.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

from datasetdm.io import write_json

logger = logging.getLogger(__name__)
COST_DIR = Path(".datasetdm/cost")
# The stages that make the dataset (the rest audit it): their sum is what a kept sample costs.
MAKING = ("real-data", "train-decoder", "expand-prompts", "generate", "filter", "export", "curate")
# Run on demand (make uplift, make rounds, make steering), not by ``make run``: their latest
# times may be days old and an hour long, so they are shown apart and kept out of the total.
ON_DEMAND = ("uplift-semantic", "uplift-depth", "uplift-keypoints", "uplift", "rounds", "steering")


def machine(device: str = "cpu") -> str:
    """The processor that did the work: the GPU's name on CUDA, else the CPU model and core count."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def record_cost(root: str | Path, stage: str, seconds: float, *, device: str = "cpu", made: int | None = None) -> None:
    """Keep ``stage``'s wall time of this run as its latest cost (written atomically).

    made: the images this run made (generate reuses the shards of a killed run, and its
    time covers only the rest); recorded so images per hour divides only those.
    """
    entry = {"stage": stage, "seconds": round(seconds, 3), "machine": machine(device), "device": device}
    if made is not None:
        entry["made"] = made
    write_json(Path(root) / COST_DIR / f"{stage}.json", entry)
    logger.info("%s took %.1f s on %s", stage, seconds, entry["machine"])


def read_costs(root: str | Path) -> dict[str, dict[str, Any]]:
    """Stage -> its latest cost record; unreadable records are skipped (they are a convenience, not an input)."""
    costs = {}
    for file in sorted((Path(root) / COST_DIR).glob("*.json")):
        try:
            entry = json.loads(file.read_text())
            costs[entry["stage"]] = entry
        except (OSError, ValueError, KeyError, TypeError):
            logger.info("%s: unreadable cost record, left out", file)
    return costs


def cost_summary(costs: dict[str, dict[str, Any]], *, generated: int, kept: int) -> dict[str, Any]:
    """Seconds per stage and the figures a buyer of synthetic data compares.

    ``total_seconds``: the stages of a factory run (``ON_DEMAND`` ones are listed in
    ``on_demand`` and left out); ``images_per_hour``: the images the generate stage's
    latest run made (``made``; ``generated`` for records older than that field) per hour
    of that run, None when it made none; ``reused``: the generated images that run took
    from an earlier one; ``seconds_per_1000_kept``: the dataset-making stages' seconds per
    1,000 kept samples.
    """
    making = sum(costs[s]["seconds"] for s in MAKING if s in costs)
    generate = costs.get("generate", {}).get("seconds")
    made = costs.get("generate", {}).get("made", generated)
    run = {s: c["seconds"] for s, c in costs.items() if s not in ON_DEMAND}
    return {
        "stages": run,
        "on_demand": {s: costs[s]["seconds"] for s in ON_DEMAND if s in costs},
        "total_seconds": round(sum(run.values()), 1),
        "making_seconds": round(making, 1),
        "images_per_hour": round(made / generate * 3600) if generate and made else None,
        "reused": max(generated - made, 0) if generate else 0,
        "seconds_per_1000_kept": round(making / kept * 1000, 1) if kept and making else None,
        "machines": sorted({c["machine"] for c in costs.values()}),
    }
