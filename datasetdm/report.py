"""The run report: a short markdown page a person reads after ``make run``."""

from __future__ import annotations

import os
from pathlib import Path

from datasetdm.config import Params


def render_report(card: dict, metrics: dict, params: Params) -> str:
    counts = card.get("counts", {})
    models = card.get("models", {})
    sem = metrics.get("semantic", {})
    here = Path(params.report.out).parent
    grid = os.path.relpath(Path(params.export.out) / "grid.png", here)
    lines = [
        "# datasetdm run report",
        "",
        f"Backbone `{params.backbone.kind}` (sha256 {models.get('backbone', '?')[:12]}), decoder (sha256 {models.get('decoder', '?')[:12]}), "
        f"trained on K = {params.real.num_train} labelled real images.",
        "",
        "## Dataset",
        "",
        "| generated | kept | dropped | filter threshold |",
        "|---:|---:|---:|---:|",
        f"| {counts.get('generated', '?')} | {counts.get('kept', '?')} | {counts.get('dropped', '?')} | {params.filter.min_score} |",
        "",
        f"Exported to `{params.export.out}`: `annotations.json` (COCO, RLE masks), `masks/` (VOC PNGs), `dataset.json` (card).",
        "",
        f"![sample grid]({grid})",
        "",
        "Plots (filter score distribution and any other DVC plots): `make plots` renders them offline to "
        "[plots/index.md](plots/index.md).",
        "",
        "## P-Decoder quality on the held-out real set",
        "",
        f"{sem.get('num_images', '?')} held-out images, features from noised real images.",
        "",
        "| label | IoU |",
        "|---|---:|",
    ]
    for name, v in sem.get("per_class_iou", {}).items():
        lines.append(f"| {name} | {'n/a' if v is None else f'{v:.3f}'} |")
    lines += [f"| **mIoU** | **{sem.get('mIoU', float('nan')):.3f}** |", ""]
    return "\n".join(lines)
