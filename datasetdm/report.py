"""The run report: a short markdown page a person reads after ``make run``."""

from __future__ import annotations

import os
from pathlib import Path

from datasetdm.config import Params
from datasetdm.cost import MAKING, cost_summary


def render_report(
    card: dict,
    metrics: dict,
    params: Params,
    *,
    downstream: dict | None = None,
    backbone: dict | None = None,
    costs: dict[str, dict] | None = None,
    weakness: dict | None = None,
) -> str:
    counts = card.get("counts", {})
    models = card.get("models", {})
    sem = metrics.get("semantic", {})
    here = Path(params.report.out).parent
    grid = os.path.relpath(Path(params.export.out) / "grid.png", here)
    lines = [
        "# datasetdm run report",
        "",
        f"Backbone `{params.backbone.kind}` (sha256 {models.get('backbone', '?')[:12]}), decoder (sha256 "
        f"{models.get('decoder', '?')[:12]}), "
        f"trained on K = {params.real.num_train} labelled real images.",
        "",
        "## Dataset",
        "",
        "| generated | kept | dropped | filter threshold |",
        "|---:|---:|---:|---:|",
        f"| {counts.get('generated', '?')} | {counts.get('kept', '?')} | {counts.get('dropped', '?')} | "
        f"{params.filter.min_score} |",
        "",
        f"Exported to `{params.export.out}`: `annotations.json` (COCO, RLE masks), `masks/` (VOC PNGs), "
        "`dataset.json` (card).",
        "",
        f"![sample grid]({grid})",
        "",
        "Plots (filter score distribution and any other DVC plots): `make plots` renders them offline to "
        "[plots/index.md](plots/index.md).",
        "",
        *_backbone_section(backbone, params, here),
        "## P-Decoder quality on the held-out real set",
        "",
        f"{metrics.get('num_images', '?')} held-out images, features from noised real images.",
        "",
        "Semantic: the labels as generation makes them (the decoder finds the objects and, where the caption "
        "names several classes, the cross-attention says which is which: `decoder.class_source`); the decoder "
        "choosing the named class itself; the decoder with every class competing; and the training-free "
        "cross-attention baseline (DiffuMask-style).",
        "",
        "| label | as generated | decoder's classes | decoder, all classes compete | attention only |",
        "|---|---:|---:|---:|---:|",
    ]
    kinds = ("semantic", "semantic_decoder_classes", "semantic_unrestricted", "attention_only")
    columns = [metrics.get(k, {}).get("per_class_iou", {}) for k in kinds]
    for name in sem.get("per_class_iou", {}):
        lines.append(f"| {name} | " + " | ".join(_num(col.get(name)) for col in columns) + " |")
    lines.append("| **mIoU** | " + " | ".join(f"**{_num(metrics.get(k, {}).get('mIoU'))}**" for k in kinds) + " |")
    lines.append("")
    if "instances" in metrics:
        ins = metrics["instances"]
        lines += [
            "Instances (connected components of the semantic labels, COCO mask AP over "
            f"{ins.get('num_instances', '?')} "
            f"true instances): AP {_num(ins.get('AP'))}, AP50 {_num(ins.get('AP50'))}.",
            "",
        ]
    if metrics.get("zero_shot"):
        z = metrics["zero_shot"]
        lines += [
            f"Zero-shot ({', '.join(z['unseen_classes'])}: never labelled; masks from decoder foreground + "
            "cross-attention), "
            f"{z['num_images']} held-out images: mIoU seen {_num(z['mIoU_seen'])}, unseen {_num(z['mIoU_unseen'])}, "
            f"harmonic {_num(z['harmonic'])}.",
            "",
        ]
    if metrics.get("filter"):
        f = metrics["filter"]
        lines += [
            "Quality filter, measured on the held-out real images (where truth exists): at threshold "
            f"{f['min_score']} it keeps "
            f"{f['kept_fraction'] * 100:.0f}% of them; their per-image mIoU is {_num(f['image_mIoU_kept'])} against "
            f"{_num(f['image_mIoU_all'])} for all and {_num(f['image_mIoU_dropped'])} for those it drops.",
            "",
        ]
    if metrics.get("filter_regenerated"):
        f = metrics["filter_regenerated"]
        lines += [
            f"Quality filter on {f['num_images']} generated images of known layout (the backbone regenerates rendered "
            "scenes, "
            f"img2img at strength {f['strength']}): it keeps {f['kept_fraction'] * 100:.0f}%; per-image mIoU against "
            "the "
            f"layout is {_num(f['image_mIoU_kept'])} for kept, {_num(f['image_mIoU_all'])} for all, "
            f"{_num(f['image_mIoU_dropped'])} for dropped (score/mIoU correlation "
            f"{_num(f['score_mIoU_correlation'])}).",
            "",
        ]
    if "depth" in metrics:
        d = metrics["depth"]
        lines += [
            "Depth head: " + f"AbsRel {_num(d['abs_rel'])}, RMSE {_num(d['rmse'])} m, delta<1.25 {_num(d['delta1'])}.",
            "",
        ]
    if "keypoints" in metrics:
        k = metrics["keypoints"]
        lines += [
            "Keypoint head (heatmap peaks grouped per instance; COCO keypoint AP, OKS sigma "
            f"{k.get('oks_sigma', '?')}, "
            f"best cyclic order of corners, over {k.get('num_instances', '?')} instances): "
            f"AP {_num(k.get('AP'))}, AP50 {_num(k.get('AP50'))}.",
            "",
        ]
    if downstream:
        any_task = next(iter(downstream.values()), {})
        num_real, num_synthetic = any_task.get("num_real", "?"), any_task.get("num_synthetic", "?")
        # (b) is trained only where downstream.synthetic_arm (make uplift always trains it): read it off the rows
        with_b = any(f"{key}_synthetic" in row for row in downstream.values() for key in ("mIoU", "AP", "abs_rel"))
        arms = ("real", "synthetic", "real+synthetic") if with_b else ("real", "real+synthetic")
        trained = (
            f"(a) {num_real} real images, (b) {num_synthetic} synthetic images, (c) both"
            if with_b
            else f"(a) {num_real} real images, (c) those and {num_synthetic} synthetic images"
        )
        columns = {"real": "(a) real", "synthetic": "(b) synthetic", "real+synthetic": "(c) real + synthetic"}
        lines += [
            "## Downstream uplift",
            "",
            f"One small model per task trained on {trained}; scored on {any_task.get('num_test', '?')} "
            "held-out real images. Depth: AbsRel (lower is better).",
            "",
            "| task | metric | " + " | ".join(columns[name] for name in arms) + " | (c) vs (a) |",
            "|---|---|" + "---:|" * (len(arms) + 1),
        ]
        for task, metric, key in (
            ("semantic", "mIoU", "mIoU"),
            ("instances", "mask AP", "AP"),
            ("depth", "AbsRel", "abs_rel"),
            ("keypoints", "keypoint AP", "AP"),
        ):
            row = downstream.get(task)
            if not row:
                continue
            if task == "depth":
                change = f"{row['abs_rel_reduction'] * 100:+.1f}% lower" if "abs_rel_reduction" in row else "n/a"
            else:
                change = f"{row['uplift'] * 100:+.1f} points" if "uplift" in row else "n/a"
            lines.append(
                f"| {task} | {metric} | "
                + " | ".join(_num(row.get(f"{key}_{name}")) for name in arms)
                + f" | {change} |"
            )
        lines.append("")
    if weakness:
        lines += _weakness_section(weakness)
    if costs:
        lines += _cost_section(costs, counts)
    return "\n".join(lines)


def _weakness_section(weakness: dict) -> list[str]:
    """Where the synthetic data is weak, by class and by pair (``datasetdm.steering``), weakest first."""
    lines = [
        "## Where the synthetic data is weak",
        "",
        "From the factory's own outputs only (each sample's prompt, filter score and decision, the decoder's "
        "confidence at generation; never the held-out set). A sample counts for every class its prompt names.",
        "",
        "| class or pair | samples | rejected | mean filter score | 10th percentile | decoder confidence |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = [*weakness["per_class"].items(), *weakness["per_pair"].items()]
    for name, row in sorted(rows, key=lambda kv: kv[1]["score_mean"]):
        lines.append(
            f"| {name} | {row['samples']} | {row['rejection_rate'] * 100:.1f}% | {row['score_mean']:.3f} | "
            f"{row['score_p10']:.3f} | {row['confidence_mean']:.3f} |"
        )
    return [*lines, ""]


def _count(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def _cost_section(costs: dict[str, dict], counts: dict) -> list[str]:
    """Wall seconds of each stage's latest run (``datasetdm.cost``) and what a kept sample costs."""
    summary = cost_summary(costs, generated=counts.get("generated", 0), kept=counts.get("kept", 0))
    lines = [
        "## Cost",
        "",
        f"Wall seconds of each stage's latest run on {'; '.join(summary['machines'])} (a stage DVC skipped keeps "
        "the time of the run that made its outputs; the report's is its previous run's).",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *(f"| {stage} | {seconds:.1f} |" for stage, seconds in summary["stages"].items()),
        f"| **total** | **{summary['total_seconds']:.1f}** |",
        *(f"| {stage} (on demand, not in the total) | {sec:.1f} |" for stage, sec in summary["on_demand"].items()),
        "",
        f"Generation: {_count(summary['images_per_hour'])} images per hour; making the dataset "
        f"({', '.join(s for s in MAKING if s in costs)}): {summary['making_seconds']:.1f} s, "
        f"{_count(summary['seconds_per_1000_kept'])} s per 1,000 kept samples."
        + (
            f" The latest generate run reused {summary['reused']:,} images an earlier (killed) run had made: "
            "images per hour counts only the rest, and the per-1,000 figure understates a full run."
            if summary["reused"]
            else ""
        ),
        "",
    ]
    return lines


def _backbone_section(backbone: dict | None, params: Params, here: Path) -> list[str]:
    """The inspector's audit of the generator (``metrics/backbone.json``), with the captioned samples it judged."""
    if not backbone:
        return []
    pf, la, ins = (
        backbone.get("prompt_fidelity", {}),
        backbone.get("label_agreement", {}),
        backbone.get("inspector", {}),
    )
    by_shape = ", ".join(f"{k} {_num(v)}" for k, v in pf.get("single_object_by_shape", {}).items())
    grid = os.path.relpath(Path(params.inspect.grid), here)
    return [
        "## Backbone, audited by the inspector",
        "",
        "The inspector is a segmenter trained on rendered scenes of its own seed range (held-out mIoU "
        f"{_num(ins.get('mIoU'))}; "
        f"it reads exactly the objects of {_num(ins.get('reading_accuracy'))} of rendered scenes, its ceiling). "
        "Nothing in training, filtering or prompt choice reads these figures.",
        "",
        "| prompt fidelity, one object | prompt fidelity, two objects | label agreement (mIoU) | Fréchet distance |",
        "|---:|---:|---:|---:|",
        f"| {_num(pf.get('single_object'))} | {_num(pf.get('two_objects'))} | {_num(la.get('mIoU'))} | "
        f"{_num(backbone.get('frechet'))} |",
        "",
        f"One object, by shape: {by_shape}.",
        "",
        *_codec_line(backbone.get("codec")),
        f"![fidelity samples]({grid})",
        "",
    ]


def _codec_line(codec: dict | None) -> list[str]:
    """The VAE round trip: every generated image leaves through its decoder, so it bounds edge sharpness."""
    if not codec:
        return []
    psnr = "lossless" if codec.get("psnr") is None else f"PSNR {codec['psnr']:.1f} dB"
    return [
        f"The VAE round trip of {codec.get('num')} rendered scenes: {psnr}; the inspector reads the "
        f"reconstructions at mIoU {_num(codec.get('inspector_mIoU_reconstructed'))} "
        f"({_num(codec.get('inspector_mIoU_original'))} on the scenes themselves).",
        "",
    ]


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
