"""The factory's stages as plain functions of ``Params``.

One function per stage, each reading and writing the paths ``params.yaml`` names.
The CLI (and so ``dvc.yaml``) and the Prefect tasks both call these, so the two
ways of running the factory cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from datasetdm import backbones
from datasetdm.backbones.base import Backbone
from datasetdm.config import Params
from datasetdm.cost import read_costs
from datasetdm.decoder.model import PDecoder
from datasetdm.decoder.train import train_decoder
from datasetdm.downstream.baseline import (
    baseline_key,
    read_baseline,
    read_fixed_arms,
    train_baseline,
    uplift_fixed_key,
)
from datasetdm.downstream.data import ArraySet, from_export, from_labelled
from datasetdm.downstream.models import TASKS
from datasetdm.downstream.uplift import score_arms, uplift_table
from datasetdm.errors import DatasetDMError
from datasetdm.evaluate.regenerated import filter_on_regenerated
from datasetdm.evaluate.semantic import evaluate_decoder, fit_attention_threshold
from datasetdm.evaluate.zero_shot import evaluate_zero_shot
from datasetdm.export.dataset import export_dataset
from datasetdm.export.verify import verify_export
from datasetdm.filtering import filter_samples
from datasetdm.generate import MANIFEST, generate, load_prompts, read_records
from datasetdm.io import sha256_file, write_json, write_text
from datasetdm.prompts import expand_prompts
from datasetdm.realset import LabelledImage, load_real_set, real_set_split_dirs, write_real_set
from datasetdm.report import render_report

logger = logging.getLogger(__name__)


def load_backbone(params: Params) -> Backbone:
    """The backbone ``backbone.kind`` names, loaded from ``backbone.model`` (by default the embedded miniature SD).

    Results come back on ``backbone.device`` because the decoder runs there too (see ``load_decoder``).
    """
    torch.manual_seed(0)
    return backbones.load_backbone(params.backbone, source=params.source, output_device=params.backbone.device)


def make_real_sets(params: Params) -> dict:
    """Stage ``real-data``: render the labelled few-shot set and the held-out test set into ``real.dir``.

    Reads ``world`` and ``real`` (and ``evaluate``): with ``evaluate.unseen_classes`` it
    also renders the zero-shot test set, which adds classes the decoder never trains on.
    """
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
    """Stage ``train-decoder``: train the P-Decoder on the K labelled images; save it to ``decoder.out``.

    Reads the labelled set in ``real.dir`` and the backbone's features of it. The saved
    config records the backbone's fingerprint, so a decoder is never run on features of
    another backbone (``load_decoder`` checks).
    """
    backbone = load_backbone(params)
    train_dir, _ = real_set_split_dirs(params.real.dir)
    labelled = load_real_set(train_dir, params.world.classes)
    decoder, stats = train_decoder(backbone, labelled, params.world.classes, cfg=params.decoder, bb=params.backbone)
    decoder.save(params.decoder.out, extra={"backbone": backbone.fingerprint(), "trained_on": len(labelled)})
    return stats


def expand_prompts_stage(params: Params) -> dict:
    """Stage ``expand-prompts``: write the prompts generation cycles through to ``prompts.out``.

    Reads ``world`` and ``prompts`` only (no model): prompts are captions of the world's
    classes, colours and counts, so every prompt names something the decoder labels.
    """
    prompts = expand_prompts(params.world, params.prompts)
    write_json(params.prompts.out, {"num_prompts": len(prompts), "prompts": prompts})
    return {"num_prompts": len(prompts)}


def load_decoder(params: Params, backbone: Backbone) -> PDecoder:
    """The trained P-Decoder from ``decoder.out``, checked against ``backbone`` and ``world.classes``, on
    ``backbone.device``."""
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
    logger.info("decoder %s placed on %s, beside the backbone's features", params.decoder.out, params.backbone.device)
    return decoder.to(params.backbone.device)


def generate_stage(params: Params) -> dict:
    """Stage ``generate``: sample images from the prompts and label them with the decoder, into ``generate.out``.

    Reads ``prompts.out`` and both models. Shards already on disk with the same plan and
    models are reused, so a killed run resumes; the manifest is written last, as the seal.
    """
    backbone = load_backbone(params)
    decoder = load_decoder(params, backbone)
    prompts = load_prompts(params.prompts.out)
    manifest = generate(
        backbone,
        decoder,
        prompts,
        gen=params.generate,
        bb=params.backbone,
        out_dir=params.generate.out,
        prompts_source=params.prompts.out,
    )
    return {"num_samples": manifest["num_samples"], "shards": len(manifest["shards"]), "made": manifest["made"]}


def filter_stage(params: Params) -> dict:
    """Stage ``filter``: score every generated sample and write keep/drop per sample to ``filter.out``.

    Reads the records in ``generate.out`` only (their quality terms were computed at
    generation), so changing ``filter.min_score`` reruns this stage, not generation. The
    decisions record the sha256 of the manifest they were computed under; the export checks it.
    """
    records = read_records(params.generate.out)  # checks the manifest exists and every shard's hash
    manifest_sha256 = sha256_file(Path(params.generate.out) / MANIFEST)
    result = filter_samples(records, params.filter.min_score, generation_manifest=manifest_sha256)
    write_json(params.filter.out, result)
    return {"kept": result["kept"], "dropped": result["dropped"]}


def export_stage(params: Params) -> dict:
    """Stage ``export``: write the kept samples (images, COCO annotations, VOC masks, depth) and a dataset card
    into ``export.out``.

    Reads ``generate.out`` and ``filter.out``, checked against the generation manifest;
    the card records the params, the git revision and the DVC state that made the set,
    so an export found on a disk can be traced back.
    """
    from datasetdm.provenance import repo_provenance

    provenance = repo_provenance(".", deps=(params.generate.out, params.filter.out))
    # Round 0 is not shaped by the regeneration rounds' settings (a round's own card carries them).
    settings = {k: v for k, v in params.to_dict().items() if k != "steer"}
    card = export_dataset(
        params.generate.out,
        params.filter.out,
        params.export.out,
        params_dict=settings,
        grid_samples=params.export.grid_samples,
        provenance=provenance,
    )
    return card["counts"]


def curate_stage(params: Params) -> dict:
    """Stage ``curate``: load ``export.out`` into FiftyOne, tag low-quality and near-duplicate samples, and export
    the rest to ``curate.out``."""
    from datasetdm.curate import curate  # FiftyOne starts its database on import; only this stage needs it

    summary = curate(params.export.out, params.curate)
    return {"dataset": summary["fiftyone_dataset"], **summary["counts"]}


def evaluate_stage(params: Params) -> dict:
    """Stage ``evaluate``: score the decoder on the held-out real set; write ``evaluate.out``.

    Reads both models and the sets in ``real.dir``. Also fits the attention-only baseline's
    threshold on the labelled set, scores unseen classes (zero-shot) and measures the
    filter on regenerated known layouts, each when ``evaluate`` asks for it.
    """
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
        min_score=params.filter.min_score,
        attention_threshold=threshold,
    )
    if params.evaluate.unseen_classes:
        every = params.world.classes + params.evaluate.unseen_classes
        metrics["zero_shot"] = evaluate_zero_shot(
            backbone,
            decoder,
            load_real_set(zero_shot_dir(params), every),
            params.backbone,
            unseen=params.evaluate.unseen_classes,
        )
    ev = params.evaluate
    if ev.num_regenerated:
        metrics["filter_regenerated"] = filter_on_regenerated(
            backbone,
            decoder,
            params.world,
            params.backbone,
            min_score=params.filter.min_score,
            num=ev.num_regenerated,
            seed=ev.regenerated_seed,
            strength=ev.regenerate_strength,
        )
    write_json(params.evaluate.out, metrics)
    return metrics


def train_inspector_stage(params: Params) -> dict:
    """Train the inspector (``make inspector``; it ships trained, like the backbone); save it to ``inspect.model``.

    Reads ``world`` and ``inspect`` only: it learns from rendered scenes of its own seed
    range, so it can audit the backbone without sharing anything with what it audits.
    """
    from datasetdm.evaluate.inspector import train_inspector

    inspector, stats = train_inspector(params.world, params.inspect)
    inspector.save(params.inspect.model, extra={"held_out": stats})
    return stats


def pretrain_curve_stage(params: Params) -> dict:
    """Prompt fidelity of every pretraining snapshot, written to ``pretrain.curve`` (``make pretrain`` runs it last).

    Reads the EMA snapshots pretraining left in its work folder and the inspector in
    ``inspect.model``; the curve (a DVC plot) says whether more pretraining would help.
    """
    from datasetdm.evaluate.backbone import fidelity_curve
    from datasetdm.evaluate.inspector import Inspector

    rows = fidelity_curve(params, Inspector.load(params.inspect.model))
    write_json(params.pretrain.curve, rows)
    return {"snapshots": len(rows), "last": rows[-1] if rows else None}


def inspect_stage(params: Params) -> dict:
    """Stage ``inspect``: audit the backbone and the export with the inspector; write ``inspect.out``.

    Reads the backbone, ``inspect.model``, the held-out real set and ``export.out``:
    prompt fidelity (does an image show what its prompt says), label agreement between
    the decoder's labels and the inspector's, Fréchet distance to real images; a grid of
    captioned samples goes to ``inspect.grid``.
    """
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


def baseline_stage(params: Params) -> dict:
    """Stage ``baseline``: train the (a) arm of the downstream audit (K real images alone) and write its per-seed
    results to ``downstream.baseline``, which ``downstream`` reuses while the real sets and recipe stay the same."""
    cfg, classes = params.downstream, params.world.classes
    train_dir, test_dir = real_set_split_dirs(params.real.dir)
    real = from_labelled(load_real_set(train_dir, classes))
    key = baseline_key(train_dir, test_dir, classes, cfg)
    baseline = train_baseline(real, load_real_set(test_dir, classes), classes, cfg=cfg, key=key)
    write_json(cfg.baseline, baseline)
    return {"baseline": cfg.baseline}


def downstream_stage(params: Params) -> dict:
    """Stage ``downstream``: the uplift a synthetic set gives; write ``downstream.out`` and ``downstream.plot``.

    Reads the labelled and held-out sets in ``real.dir`` and ``export.out``; trains one
    small model per task on real + synthetic data (and on synthetic alone with
    ``downstream.synthetic_arm``) and scores each on held-out real images, the measure of
    whether the factory's output is worth using.
    The real-only models come from ``downstream.baseline`` when it was made from the same
    real sets and recipe (the ``baseline`` stage), and are trained here otherwise.
    """
    cfg, classes = params.downstream, params.world.classes
    train_dir, test_dir = real_set_split_dirs(params.real.dir)
    real = from_labelled(load_real_set(train_dir, classes))
    synthetic = from_export(params.export.out)
    test = load_real_set(test_dir, classes)
    known = read_baseline(cfg.baseline, baseline_key(train_dir, test_dir, classes, cfg))
    results = uplift_table(
        real,
        synthetic,
        test,
        classes,
        cfg=cfg,
        known=None if known is None else {"real": known},
        synthetic_arm=cfg.synthetic_arm,
    )
    write_json(cfg.out, results["metrics"])
    write_json(cfg.plot, results["plot"])
    return results["metrics"]


def uplift_part_path(params: Params, model: str) -> Path:
    """Where ``make uplift`` keeps one downstream model's rows (``downstream.uplift_parts/<model>.json``)."""
    return Path(params.downstream.uplift_parts) / f"{model}.json"


def fixed_arms_path(params: Params, model: str) -> Path:
    """Where ``make uplift`` keeps one model's (a) and ceiling arms."""
    return Path(params.downstream.uplift_parts) / "fixed" / f"{model}.json"


def uplift_model_stage(params: Params, model: str) -> dict:
    """Stage ``uplift-<model>``: one downstream model's rows of the uplift table over ``downstream.uplift_seeds``
    seeds with the fully supervised ceiling row, trained ``downstream.uplift_steps.<model>`` steps.

    Each model is its own DVC stage because each takes most of an hour on 2 cores: a change
    to one task's steps retrains that task only, and the arms that never read the export
    come from ``fixed_arms_path`` while the real sets, recipe and code are the same
    (``_fixed_arms``), so a new export retrains the synthetic arms alone.
    """
    cfg = params.downstream
    train_dir, test_dir = real_set_split_dirs(params.real.dir)
    real = from_labelled(load_real_set(train_dir, params.world.classes))
    test = load_real_set(test_dir, params.world.classes)
    known = _fixed_arms(params, model, real, test)
    results = uplift_table(
        real,
        from_export(params.export.out),
        test,
        params.world.classes,
        cfg=cfg,
        seeds=cfg.uplift_seeds,
        known=known,
        num_ceiling=cfg.ceiling_images,
        steps=_model_steps(params, model),
        tasks=(model,),
    )
    write_json(uplift_part_path(params, model), results["metrics"])
    return results["metrics"]


def _model_steps(params: Params, model: str) -> dict[str, int]:
    """``{model: downstream.uplift_steps.<model>}``: one model's steps only, the one steps setting its stage lists."""
    return {model: getattr(params.downstream.uplift_steps, model)}


def _fixed_arms(params: Params, model: str, real: ArraySet, test: list[LabelledImage]) -> dict[str, dict]:
    """One model's (a) and ceiling arms: stored ones made from the same inputs, else trained now and stored
    before the synthetic arms start, so a run stopped later keeps them.

    The ceiling's labelled images are rendered from their own seed range, never the
    held-out test images, and written and read as a COCO set as any labelled set is.
    """
    cfg, classes = params.downstream, params.world.classes
    train_dir, test_dir = real_set_split_dirs(params.real.dir)
    path = fixed_arms_path(params, model)
    key = uplift_fixed_key(train_dir, test_dir, classes, cfg, params.world, model)
    known = read_fixed_arms(path, key)
    if known is not None:
        return known
    arms: dict[str, list[ArraySet]] = {"real": [real]}
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.ceiling_images:
            write_real_set(params.world, Path(tmp) / "ceiling", cfg.ceiling_images, cfg.ceiling_seed)
            arms["ceiling"] = [from_labelled(load_real_set(Path(tmp) / "ceiling", classes))]
        steps = _model_steps(params, model)
        scores = score_arms(arms, test, classes, cfg=cfg, seeds=cfg.uplift_seeds, steps=steps, tasks=(model,))
    known = {name: {task: runs[name] for task, runs in scores.items() if name in runs} for name in arms}
    write_json(path, {"key": key, "arms": known})
    return known


def uplift_stage(params: Params) -> dict:
    """Stage ``uplift``: the models' rows (``uplift-<model>``) joined into ``downstream.uplift_out``
    (``make uplift``), refusing a part made with other seeds or steps than ``params.yaml`` says."""
    cfg, metrics = params.downstream, {}
    for model in TASKS:
        path = uplift_part_path(params, model)
        part = _read_json(path)
        want = {"seeds": cfg.uplift_seeds, "steps": _model_steps(params, model)}
        for task, entry in part.items():
            for key, value in want.items():
                if entry.get(key) != value:
                    raise DatasetDMError(
                        path, f"{task}.{key}", f"is {entry.get(key)}, params.yaml says {value}; run dvc repro uplift"
                    )
        metrics.update(part)
    write_json(cfg.uplift_out, metrics)
    return metrics


def rounds_stage(params: Params) -> dict:
    """Stage ``rounds``: make regeneration rounds 1..``steer.round`` in ``steer.out``; score them into
    ``steer.metrics`` and ``steer.plot``.

    Reads rounds 0..r-1 and the K labelled images to plan round r (``datasetdm.rounds``:
    steered or uniform), never the held-out set; a sealed round is reused, never rewritten.
    Each new round's export is loaded into FiftyOne as its own dataset (curated beside it),
    then every round is scored on the held-out set (``rounds_heldout``; figures of
    unchanged rounds are reused).
    """
    from datasetdm.provenance import repo_provenance
    from datasetdm.rounds import make_rounds, round_dir
    from datasetdm.rounds_heldout import evaluate_rounds

    if params.steer.round == 0:
        logger.info("steer.round is 0: no regeneration rounds to make")
    backbone = load_backbone(params)
    decoder = load_decoder(params, backbone)
    provenance = repo_provenance(".", deps=(params.generate.out, params.filter.out))
    seals = make_rounds(params, backbone, decoder, provenance=provenance)
    # the index of the rounds made: also what DVC finds as the output when no round is asked for
    write_json(Path(params.steer.out) / "index.json", {"rounds": seals})
    versions = {}
    for seal in seals:
        d = round_dir(params, seal["round"])
        if not (d / "curated" / "curation.json").is_file():
            from datasetdm.curate import curate

            curate(d / "export", dataclasses.replace(params.curate, out=str(d / "curated")))
        versions[seal["round"]] = json.loads((d / "curated" / "curation.json").read_text()).get("fiftyone_dataset")
    previous = _read_json(Path(params.steer.metrics)) if Path(params.steer.metrics).is_file() else None
    result = evaluate_rounds(params, seals, previous)
    result["metrics"]["fiftyone_datasets"] = {f"round_{r}": name for r, name in versions.items()}
    write_json(params.steer.metrics, result["metrics"])
    write_json(params.steer.plot, result["plot"])
    return {"rounds": len(seals), "last": result["metrics"]["last"]}


def steering_stage(params: Params) -> dict:
    """Stage ``steering``: steered vs uniform rounds over ``steer.experiment_seeds`` seeds (``make steering``);
    ``steer.experiment_metrics`` and ``steer.experiment_plot``."""
    from datasetdm.steering_experiment import run_experiment, write_experiment

    backbone = load_backbone(params)
    result = run_experiment(params, backbone, load_decoder(params, backbone))
    write_experiment(params, result)
    return result["metrics"]


def report_stage(params: Params) -> dict:
    """Stage ``report``: a markdown run report at ``report.out``: what was made, how good the annotator is, where
    things are.

    Reads the dataset card in ``export.out`` and ``evaluate.out`` (both required), and
    ``downstream.out`` and ``inspect.out`` when they exist (the report is written without them too), and
    the generated records, filter decisions and prompts for "where the synthetic data is weak"
    (``datasetdm.steering``); the cost table comes from ``.datasetdm/cost/`` beside the params file.
    The export is checked against its card's hashes first: the report links its grid and quotes its counts.
    """
    card = verify_export(params.export.out)
    metrics = _read_json(Path(params.evaluate.out))
    downstream = _read_json(Path(params.downstream.out)) if Path(params.downstream.out).is_file() else None
    backbone = _read_json(Path(params.inspect.out)) if Path(params.inspect.out).is_file() else None
    for path, found in ((params.downstream.out, downstream), (params.inspect.out, backbone)):
        if found is None:
            logger.info("%s not found: the report leaves its section out", path)
    weakness = _weakness(params)
    costs = read_costs(Path(params.source).parent) if Path(params.source).is_file() else {}
    costs = {stage: costs[stage] for stage in STAGES if stage in costs}  # in pipeline order
    text = render_report(
        card, metrics, params, downstream=downstream, backbone=backbone, costs=costs, weakness=weakness
    )
    write_text(params.report.out, text)
    return {"report": params.report.out}


def _weakness(params: Params) -> dict | None:
    """Per-class and per-pair weakness of this run's synthetic data (``datasetdm.steering``), if its inputs exist."""
    from datasetdm.steering import prompt_shapes, weakness_signals

    if not (Path(params.filter.out).is_file() and Path(params.prompts.out).is_file()):
        return None
    decisions = _read_json(Path(params.filter.out)).get("samples", [])
    shapes_of = prompt_shapes(_read_json(Path(params.prompts.out)).get("prompts", []))
    return weakness_signals(read_records(params.generate.out), decisions, shapes_of)


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
    "baseline": baseline_stage,
    "downstream": downstream_stage,
    **{f"uplift-{model}": functools.partial(uplift_model_stage, model=model) for model in TASKS},
    "uplift": uplift_stage,
    "rounds": rounds_stage,
    "steering": steering_stage,
    "report": report_stage,
}


def summary(result: dict) -> str:
    return json.dumps(result, sort_keys=True)
