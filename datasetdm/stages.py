"""The factory's stages as plain functions of ``Params``.

One function per stage, each reading and writing the paths ``params.yaml`` names.
The CLI (and so ``dvc.yaml``) and the Prefect tasks both call these, so the two
ways of running the factory cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from datasetdm.backbones.base import Backbone
from datasetdm.backbones.sd import StableDiffusionBackbone
from datasetdm.config import Params
from datasetdm.decoder.model import PDecoder
from datasetdm.decoder.train import train_decoder
from datasetdm.downstream.data import from_export, from_labelled
from datasetdm.downstream.uplift import uplift_table
from datasetdm.errors import DatasetDMError
from datasetdm.evaluate.regenerated import filter_on_regenerated
from datasetdm.evaluate.semantic import evaluate_decoder, fit_attention_threshold
from datasetdm.evaluate.zero_shot import evaluate_zero_shot
from datasetdm.export.dataset import export_dataset
from datasetdm.filtering import filter_samples
from datasetdm.generate import generate, load_prompts, read_records
from datasetdm.io import write_json, write_text
from datasetdm.prompts import expand_prompts
from datasetdm.realset import load_real_set, real_set_split_dirs, write_real_set
from datasetdm.report import render_report


def load_backbone(params: Params) -> Backbone:
    """The Stable Diffusion folder ``params.backbone.model`` names (by default the embedded miniature SD)."""
    torch.manual_seed(0)
    bb = params.backbone
    backbone = StableDiffusionBackbone.load(
        bb.model,
        dtype=bb.dtype,
        device=bb.device,
        channels_last=bb.channels_last,
        compile=bb.compile,
        source=params.source,
    )
    backbone.output_device = torch.device(bb.device)  # the decoder runs there too (see load_decoder)
    return backbone


def make_real_sets(params: Params) -> dict:
    """Render the labelled few-shot training set and the held-out test set."""
    train_dir, test_dir = real_set_split_dirs(params.real.dir)
    write_real_set(params.world, train_dir, params.real.num_train, params.real.train_seed)
    write_real_set(params.world, test_dir, params.real.num_test, params.real.test_seed)
    counts = {"train": params.real.num_train, "test": params.real.num_test}
    if params.evaluate.unseen_classes:
        world = dataclasses.replace(params.world, classes=params.world.classes + params.evaluate.unseen_classes)
        write_real_set(world, zero_shot_dir(params), params.evaluate.num_zero_shot, params.evaluate.zero_shot_seed)
        counts["zero_shot"] = params.evaluate.num_zero_shot
    return counts


def zero_shot_dir(params: Params) -> Path:
    """Held-out images that include the unseen classes (never used for training)."""
    return Path(params.real.dir) / "zero-shot"


def train_decoder_stage(params: Params) -> dict:
    backbone = load_backbone(params)
    train_dir, _ = real_set_split_dirs(params.real.dir)
    labelled = load_real_set(train_dir, params.world.classes)
    decoder, stats = train_decoder(backbone, labelled, params.world.classes, params.decoder, params.backbone)
    decoder.save(params.decoder.out, extra={"backbone": backbone.fingerprint(), "trained_on": len(labelled)})
    return stats


def expand_prompts_stage(params: Params) -> dict:
    prompts = expand_prompts(params.world, params.prompts)
    write_json(params.prompts.out, {"num_prompts": len(prompts), "prompts": prompts})
    return {"num_prompts": len(prompts)}


def load_decoder(params: Params, backbone: Backbone) -> PDecoder:
    decoder = PDecoder.load(params.decoder.out)
    trained_for = decoder.config.get("backbone")
    if trained_for and trained_for != backbone.fingerprint():
        raise DatasetDMError(
            Path(params.decoder.out) / "config.json",
            "backbone",
            "decoder was trained on features of a different backbone; re-run the train-decoder stage",
        )
    if tuple(decoder.config["classes"]) != params.world.classes:
        raise DatasetDMError(
            Path(params.decoder.out) / "config.json",
            "classes",
            f"decoder labels {decoder.config['classes']} but world.classes is {list(params.world.classes)}; re-run "
            "train-decoder",
        )
    # The decoder runs where the backbone's features are: on a GPU, copying every
    # captured map to the CPU costs more than the decoder itself (measured 2.18x vs 1.03x).
    return decoder.to(params.backbone.device)


def generate_stage(params: Params) -> dict:
    backbone = load_backbone(params)
    decoder = load_decoder(params, backbone)
    prompts = load_prompts(params.prompts.out)
    manifest = generate(
        backbone,
        decoder,
        prompts,
        params.generate,
        params.backbone,
        params.generate.out,
        prompts_source=params.prompts.out,
    )
    return {"num_samples": manifest["num_samples"], "shards": len(manifest["shards"])}


def filter_stage(params: Params) -> dict:
    result = filter_samples(read_records(params.generate.out), params.filter.min_score)
    write_json(params.filter.out, result)
    return {"kept": result["kept"], "dropped": result["dropped"]}


def export_stage(params: Params) -> dict:
    from datasetdm.provenance import repo_provenance

    provenance = repo_provenance(".", deps=(params.generate.out, params.filter.out))
    card = export_dataset(
        params.generate.out,
        params.filter.out,
        params.export.out,
        params.to_dict(),
        params.export.grid_samples,
        provenance=provenance,
    )
    return card["counts"]


def curate_stage(params: Params) -> dict:
    """Load the export into FiftyOne, tag low-quality and near-duplicate samples, export the rest."""
    from datasetdm.curate import curate  # FiftyOne starts its database on import; only this stage needs it

    summary = curate(params.export.out, params.curate)
    return {"dataset": summary["fiftyone_dataset"], **summary["counts"]}


def evaluate_stage(params: Params) -> dict:
    backbone = load_backbone(params)
    decoder = load_decoder(params, backbone)
    train_dir, test_dir = real_set_split_dirs(params.real.dir)
    threshold = fit_attention_threshold(
        backbone, load_real_set(train_dir, params.world.classes), params.backbone, params.world.classes
    )
    metrics = evaluate_decoder(
        backbone,
        decoder,
        load_real_set(test_dir, params.world.classes),
        params.backbone,
        params.filter.min_score,
        threshold,
    )
    if params.evaluate.unseen_classes:
        every = params.world.classes + params.evaluate.unseen_classes
        metrics["zero_shot"] = evaluate_zero_shot(
            backbone,
            decoder,
            load_real_set(zero_shot_dir(params), every),
            params.backbone,
            params.evaluate.unseen_classes,
        )
    ev = params.evaluate
    if ev.num_regenerated:
        metrics["filter_regenerated"] = filter_on_regenerated(
            backbone,
            decoder,
            params.world,
            params.backbone,
            params.filter.min_score,
            ev.num_regenerated,
            ev.regenerated_seed,
            ev.regenerate_strength,
        )
    write_json(params.evaluate.out, metrics)
    return metrics


def train_inspector_stage(params: Params) -> dict:
    """Train the inspector (``make inspector``; it ships trained, like the backbone); save it to ``inspect.model``."""
    from datasetdm.evaluate.inspector import train_inspector

    inspector, stats = train_inspector(params.world, params.inspect)
    inspector.save(params.inspect.model, extra={"held_out": stats})
    return stats


def pretrain_curve_stage(params: Params) -> dict:
    """Prompt fidelity of every pretraining snapshot, written as a DVC plot (``make pretrain`` runs it last)."""
    from datasetdm.evaluate.backbone import fidelity_curve
    from datasetdm.evaluate.inspector import Inspector

    rows = fidelity_curve(params, Inspector.load(params.inspect.model))
    write_json(params.pretrain.curve, rows)
    return {"snapshots": len(rows), "last": rows[-1] if rows else None}


def inspect_stage(params: Params) -> dict:
    """Audit the backbone and the export with the inspector: prompt fidelity, label agreement, Fréchet distance."""
    from datasetdm.evaluate.backbone import measure_backbone
    from datasetdm.evaluate.inspector import Inspector, held_out_quality

    inspector = Inspector.load(params.inspect.model)
    _, test_dir = real_set_split_dirs(params.real.dir)
    real = np.stack([x.image for x in load_real_set(test_dir, params.world.classes)])
    metrics = measure_backbone(
        load_backbone(params),
        inspector,
        params,
        real_images=real,
        export_dir=params.export.out,
        grid=params.inspect.grid,
    )
    metrics["inspector"] = held_out_quality(inspector, params.world, params.inspect)
    write_json(params.inspect.out, metrics)
    return {
        "prompt_fidelity": metrics["prompt_fidelity"],
        "label_agreement_mIoU": metrics["label_agreement"]["mIoU"],
        "frechet": metrics["frechet"],
    }


def downstream_stage(params: Params) -> dict:
    """Train one small model per task on real, synthetic and real + synthetic data; score all on held-out real."""
    cfg = params.downstream
    train_dir, test_dir = real_set_split_dirs(params.real.dir)
    real = from_labelled(load_real_set(train_dir, params.world.classes))
    synthetic = from_export(params.export.out)
    test = load_real_set(test_dir, params.world.classes)
    results = uplift_table(real, synthetic, test, params.world.classes, cfg)
    write_json(cfg.out, results["metrics"])
    write_json(cfg.plot, results["plot"])
    return results["metrics"]


def uplift_stage(params: Params) -> dict:
    """The uplift table over ``downstream.uplift_seeds`` seeds with the fully supervised ceiling row (``make uplift``).

    The ceiling's labelled images are rendered from their own seed range, never the
    held-out test images, and written and read as a COCO set as any labelled set is.
    """
    cfg = params.downstream
    train_dir, test_dir = real_set_split_dirs(params.real.dir)
    real = from_labelled(load_real_set(train_dir, params.world.classes))
    synthetic = from_export(params.export.out)
    test = load_real_set(test_dir, params.world.classes)
    ceiling = None
    if cfg.ceiling_images:
        with tempfile.TemporaryDirectory() as tmp:
            write_real_set(params.world, Path(tmp) / "ceiling", cfg.ceiling_images, cfg.ceiling_seed)
            ceiling = from_labelled(load_real_set(Path(tmp) / "ceiling", params.world.classes))
    results = uplift_table(real, synthetic, test, params.world.classes, cfg, seeds=cfg.uplift_seeds, ceiling=ceiling)
    write_json(cfg.uplift_out, results["metrics"])
    return results["metrics"]


def report_stage(params: Params) -> dict:
    """A markdown run report: what was made, how good the annotator is, where things are."""
    card = _read_json(Path(params.export.out) / "dataset.json")
    metrics = _read_json(Path(params.evaluate.out))
    downstream = _read_json(Path(params.downstream.out)) if Path(params.downstream.out).is_file() else None
    backbone = _read_json(Path(params.inspect.out)) if Path(params.inspect.out).is_file() else None
    text = render_report(card, metrics, params, downstream, backbone)
    write_text(params.report.out, text)
    return {"report": params.report.out}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetDMError(path, None, "not found; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetDMError(path, f"line {e.lineno}", f"not valid JSON ({e.msg})") from None


STAGES = {
    "real-data": make_real_sets,
    "train-decoder": train_decoder_stage,
    "expand-prompts": expand_prompts_stage,
    "generate": generate_stage,
    "filter": filter_stage,
    "export": export_stage,
    "curate": curate_stage,
    "evaluate": evaluate_stage,
    "inspect": inspect_stage,
    "downstream": downstream_stage,
    "uplift": uplift_stage,
    "report": report_stage,
}


def summary(result: dict) -> str:
    return json.dumps(result, sort_keys=True)
