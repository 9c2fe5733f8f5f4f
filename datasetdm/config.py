"""Typed settings, parsed once from ``params.yaml``.

Every stage receives one of these frozen dataclasses and nothing reads YAML or the
environment for settings anywhere else. The parser is strict on purpose: an unknown
key, a wrong type or an out-of-range value is a ``DatasetDMError`` naming the file and
the dotted key, because a silently ignored setting is worse than a crash.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from datasetdm.backbones import check_kind
from datasetdm.errors import DatasetDMError
from datasetdm.strict_yaml import load_yaml

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")


@dataclass(frozen=True)
class WorldConfig:
    """The procedural shapes world: what can appear in an image."""

    image_size: int = 64
    classes: tuple[str, ...] = ("circle", "square", "triangle", "star")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    max_objects: int = 3
    min_size: float = 0.16  # object radius as a fraction of the image side
    max_size: float = 0.28


@dataclass(frozen=True)
class RealConfig:
    """The labelled "real" sets: K few-shot training images and a held-out test set."""

    dir: str = "data/real"
    num_train: int = 20
    num_test: int = 200
    train_seed: int = 1000
    test_seed: int = 900000


@dataclass(frozen=True)
class BackboneConfig:
    """Which text-to-image model generates images and provides features."""

    kind: str = "stable-diffusion"  # a name in the backbone registry (datasetdm/backbones/__init__.py)
    # A local diffusers Stable Diffusion pipeline folder, or a hub id already in the HF
    # cache. The default is the embedded miniature SD trained on the shapes world.
    model: str = "datasetdm/assets/mini-sd"
    steps: int = 20
    guidance_scale: float = 3.0
    feature_timestep: int = 100  # t at which features are read, for real and generated images
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    channels_last: bool = False  # channels-last memory format for UNet and VAE (faster on GPUs)
    compile: bool = False  # torch.compile the UNet (slow first batch)


@dataclass(frozen=True)
class VAEPretrainConfig:
    """Stage 1 of ``make pretrain``: the AutoencoderKL (downsampling x4, 4 latent channels).

    Trained alone first, as SD's VAE was, so the UNet learns on fixed latents; the loss
    adds an image-gradient term to L1 because edges are what the labels depend on.
    """

    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    kl_weight: float = 1e-6
    edge_weight: float = 1.0
    # Then the decoder alone, on the frozen encoder's latents (as SD's ft-MSE VAE decoder
    # was made): sharper edges without moving the latent space the UNet learns.
    decoder_steps: int = 3000
    decoder_lr: float = 5e-4
    # Then a second decoder pass from those weights (fresh optimizer, its own cosine): a larger
    # batch and edges weighted more. The codec bounds what any generated image can show.
    decoder_sharpen_steps: int = 8000
    decoder_sharpen_lr: float = 1e-3
    decoder_sharpen_batch_size: int = 32
    decoder_sharpen_edge_weight: float = 2.0


@dataclass(frozen=True)
class PretrainConfig:
    """Training the embedded miniature Stable Diffusion on the shapes world (``make pretrain``)."""

    out: str = "models/mini-sd"
    curve: str = "metrics/pretrain_curve.json"  # prompt fidelity of each snapshot (make pretrain; DVC plot)
    # The backbone learns every shape the world can draw, including ones the labelled
    # set never shows (open-vocabulary annotation needs the generator to know them).
    classes: tuple[str, ...] = SHAPES
    pool_size: int = 16000
    # UNet + text encoder (stage 2). A step count, not a time budget, so the shipped
    # checkpoint is reproducible from params.yaml.
    steps: int = 7000
    batch_size: int = 32
    lr: float = 1e-3
    # The learning rate follows warm restarts (SGDR): a cosine over each cycle of
    # ``cycle_steps``, each restart peaking at ``restart_decay`` times the last. The state
    # at step s then does not depend on the total, so a finished run can be taken further
    # by raising ``steps`` and resuming its checkpoint, with the weights of an unbroken run.
    cycle_steps: int = 7000
    restart_decay: float = 0.5
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023): faster convergence
    seed: int = 0
    checkpoint_every: int = 1000  # resumable checkpoints + an EMA snapshot for the fidelity curve
    # architecture
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    # Attention at the latent's full resolution (16x16) too; its cost and why it pays: mini_sd_configs.
    full_res_attention: bool = True
    attention_head_dim: int = 8
    text_dim: int = 64
    text_layers: int = 2
    max_length: int = 32  # tokens the CLIP text encoder reads (SD: 77)
    vae: VAEPretrainConfig = field(default_factory=VAEPretrainConfig)


@dataclass(frozen=True)
class DecoderConfig:
    """The perception decoder (P-Decoder) trained on K labelled real images."""

    out: str = "models/decoder"
    heads: tuple[str, ...] = ("semantic", "depth", "keypoints")
    channels: int = 64
    image_skip: bool = True
    colour_jitter: bool = True  # shuffle RGB of the decoder's image input in training
    # Which named class an object pixel is, where a prompt names several: the strongest cross-attention
    # map there ("attention"; k-fold over the K images 0.69 -> 0.85 mIoU) or the decoder's own argmax.
    class_source: Literal["attention", "decoder"] = "attention"
    depth_coords: bool = True  # join pixel coordinates to the depth head's input (CoordConv; decoder/heads.py)
    rotated_object_depth: bool = True  # rotated views keep their objects' depth targets (decoder/train.py)
    # background pixels' depth labels: the K images' mean background surface, not the head (decoder/heads.py)
    depth_background_prior: bool = True
    depth_head_background: bool = True  # the depth head also learns the background's depth
    views: int = 8  # dihedral views of each labelled image: 1 (as is), 2 (+ flip) or 8 (+ rotations)
    steps: int = 400
    batch_size: int = 8
    lr: float = 2e-3
    seed: int = 0


@dataclass(frozen=True)
class PromptsConfig:
    """Prompt expansion: classes x colours x counts x templates."""

    out: str = "data/prompts.json"
    num_prompts: int = 200
    max_objects: int = 2
    # "{objects}" is replaced by the caption; the embedded backbone knows only world words.
    templates: tuple[str, ...] = ("{objects}",)
    seed: int = 0


@dataclass(frozen=True)
class GenerateConfig:
    out: str = "data/generated"
    num_samples: int = 2000
    batch_size: int = 16
    shard_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class FilterConfig:
    out: str = "data/filtered.json"
    min_score: float = 0.5


@dataclass(frozen=True)
class ExportConfig:
    out: str = "data/export"
    grid_samples: int = 16


@dataclass(frozen=True)
class CurateConfig:
    """Curation in FiftyOne: tag low-quality and near-duplicate samples, export the rest."""

    out: str = "data/curated"
    min_quality: float = 0.55  # filter score below this: tagged "low_quality"
    # Near duplicates: cosine distance between the backbone's pooled features (``Features.pooled``,
    # saved at generation) below this; 16x16 thumbnails for an export without them.
    duplicate_threshold: float = 0.02
    dataset_prefix: str = "datasetdm"  # FiftyOne dataset name: <prefix>-<card sha256[:12]>


@dataclass(frozen=True)
class EvaluateConfig:
    out: str = "metrics/decoder.json"
    # Zero-shot: classes the backbone knows but the labelled set never shows. The
    # real-data stage renders a test set with them; evaluate reports seen/unseen mIoU.
    unseen_classes: tuple[str, ...] = ("hexagon",)
    num_zero_shot: int = 100
    zero_shot_seed: int = 800000
    # The filter measured on regenerated known layouts (evaluate/regenerated.py): how
    # many scenes, from which seed, noised to which fraction of the schedule.
    num_regenerated: int = 100
    regenerated_seed: int = 700000
    regenerate_strength: float = 0.6


@dataclass(frozen=True)
class InspectConfig:
    """The inspector that audits the backbone and the export (``datasetdm.evaluate.inspector``).

    It is trained on rendered scenes from its own seed range and feeds nothing but
    ``metrics/backbone.json``: no training, filtering or prompt choice reads it.
    """

    out: str = "metrics/backbone.json"
    grid: str = "reports/fidelity_grid.png"  # generated samples captioned with what the inspector read
    model: str = "datasetdm/assets/inspector"  # shipped trained (make inspector)
    classes: tuple[str, ...] = SHAPES
    train_images: int = 4000
    steps: int = 1500
    batch_size: int = 32
    lr: float = 0.003
    width: int = 16
    min_area: int = 12  # pieces smaller than this are not read as objects
    seed: int = 5_000_000
    num_test: int = 300
    num_fidelity: int = 100  # generated images per group (single object, two objects)
    fidelity_seed: int = 600_000
    num_frechet: int = 500  # exported images compared with the held-out real images
    num_codec: int = 200  # rendered scenes through the backbone's VAE and back
    codec_seed: int = 650_000


@dataclass(frozen=True)
class TaskSteps:
    """Training steps of each downstream model in ``make uplift``: every arm of a task trains
    until more steps no longer help on a validation set of its own (``scripts/downstream_steps.py``)."""

    semantic: int = 300
    depth: int = 300
    keypoints: int = 300


@dataclass(frozen=True)
class DownstreamConfig:
    """Downstream uplift: one small model per task trained on (a) the K real images, (b) the
    synthetic export, (c) both; all evaluated on the held-out real set."""

    out: str = "metrics/downstream.json"
    plot: str = "metrics/downstream_plot.json"
    baseline: str = "metrics/baseline.json"  # the (a) arm's results, trained once per real set and recipe
    steps: int = 300
    batch_size: int = 32
    lr: float = 0.003
    width: int = 16
    seed: int = 0
    colour_jitter: bool = True
    seeds: int = 1  # runs per arm (seed, seed + 1, ...): fields <metric>_mean / _std
    # make run's audit also trains (b), the synthetic set alone. Off by default: (c) vs (a) is
    # the question make run answers, and (b) costs a third of its time; make uplift always trains (b).
    synthetic_arm: bool = False
    # The 3-seed table with the fully supervised ceiling (make uplift; not part of make run).
    uplift_out: str = "metrics/uplift.json"
    uplift_parts: str = "metrics/uplift"  # one file per downstream model, each its own DVC stage
    uplift_seeds: int = 3
    uplift_steps: TaskSteps = field(default_factory=TaskSteps)  # per task; make run's quick audit uses ``steps``
    ceiling_images: int = 2000  # labelled real images for the ceiling row (own seed range)
    ceiling_seed: int = 2_000_000


@dataclass(frozen=True)
class SteerConfig:
    """Regeneration rounds (``python -m datasetdm rounds``; not part of ``make run``).

    Round r appends ``budget`` samples beside rounds 0..r-1 (round 0 is ``generate.out``),
    allotted over the prompt pool in proportion to measured weakness (``steered``) or
    evenly (``uniform``, the comparison arm); ``floor`` of every round is always spread
    evenly, so no class, colour or pairing starves."""

    out: str = "data/rounds"
    metrics: str = "metrics/rounds.json"
    plot: str = "metrics/rounds_plot.json"
    round: int = 0  # rounds to have made; 0 = none (the plain run makes none)
    mode: Literal["steered", "uniform"] = "steered"
    budget: int = 400  # samples per round
    floor: float = 0.3  # share of a round spread evenly over the prompt pool
    # steered only: images drawn per slot of the weakest prompt, the filter's best kept (1: one draw
    # per slot, steering by quantity alone); weaker prompts get more (``steering.candidate_counts``)
    candidates: int = 1
    # candidates > 1: rank a slot's candidates by the filter's score times their shape fidelity (each
    # object's outline against the K labelled images', ``shape_prior``); false: by the score alone.
    # Off by default: measured, it did not help (make steering-scarce CANDIDATES=3 SHAPE=1; README)
    shape_check: bool = False
    seed: int = 1  # round r's sample seeds and its validation model's seed derive from (seed, r)
    # What the validation IoU per class is measured on (never the held-out set):
    # "synthetic": a model trained on the synthetic rounds alone, scored on all K labelled images;
    # "kfold": the real + synthetic model itself, k-fold over the K labelled images (``folds`` models).
    validation: Literal["synthetic", "kfold"] = "synthetic"
    folds: int = 4
    # The steering experiment (make steering): steered vs uniform rounds over seeds.
    experiment_out: str = "data/steering"
    experiment_metrics: str = "metrics/steering.json"
    experiment_plot: str = "metrics/steering_plot.json"
    experiment_rounds: int = 2
    experiment_seeds: int = 3


@dataclass(frozen=True)
class ReportConfig:
    out: str = "reports/report.md"


@dataclass(frozen=True)
class Params:
    world: WorldConfig = field(default_factory=WorldConfig)
    real: RealConfig = field(default_factory=RealConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    source: str = "params.yaml"  # where these were read from, for error messages

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


# Range checks: dotted key -> (predicate, what it must be).
_POSITIVE = (lambda v: v > 0, "must be > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_CHECKS: dict[str, tuple[Any, str]] = {
    "world.image_size": (lambda v: v >= 16 and v % 16 == 0, "must be a multiple of 16, at least 16"),
    "world.max_objects": (lambda v: 1 <= v <= 6, "must be between 1 and 6"),
    "world.min_size": (lambda v: 0.02 <= v <= 0.5, "must be between 0.02 and 0.5"),
    "world.max_size": (lambda v: 0.02 <= v <= 0.5, "must be between 0.02 and 0.5"),
    "world.classes": (lambda v: len(v) > 0 and len(set(v)) == len(v), "must be a non-empty list without repeats"),
    "world.colours": (lambda v: len(v) > 0 and len(set(v)) == len(v), "must be a non-empty list without repeats"),
    "real.num_train": _POSITIVE,
    "real.num_test": _POSITIVE,
    "backbone.steps": _POSITIVE,
    "backbone.guidance_scale": _NON_NEGATIVE,
    "backbone.feature_timestep": (lambda v: 0 <= v < 1000, "must be in [0, 1000)"),
    "pretrain.steps": _POSITIVE,
    "pretrain.batch_size": _POSITIVE,
    "pretrain.lr": _POSITIVE,
    "pretrain.cycle_steps": _POSITIVE,
    "pretrain.restart_decay": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "pretrain.caption_dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "pretrain.pool_size": _POSITIVE,
    "pretrain.ema_decay": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "pretrain.layers_per_block": _POSITIVE,
    "pretrain.block_out_channels": (
        lambda v: len(v) > 0 and all(c > 0 for c in v),
        "must be a non-empty list of positive widths",
    ),
    "pretrain.text_dim": _POSITIVE,
    "pretrain.text_layers": _POSITIVE,
    "inspect.train_images": _POSITIVE,
    "downstream.seeds": _POSITIVE,
    "downstream.uplift_seeds": _POSITIVE,
    "downstream.uplift_steps.semantic": _POSITIVE,
    "downstream.uplift_steps.depth": _POSITIVE,
    "downstream.uplift_steps.keypoints": _POSITIVE,
    "downstream.ceiling_images": (lambda v: v >= 0, "must be >= 0"),
    "inspect.steps": _POSITIVE,
    "inspect.batch_size": _POSITIVE,
    "inspect.lr": _POSITIVE,
    "inspect.width": _POSITIVE,
    "inspect.num_test": _POSITIVE,
    "inspect.num_fidelity": _POSITIVE,
    "inspect.num_frechet": _POSITIVE,
    "inspect.num_codec": _POSITIVE,
    "pretrain.checkpoint_every": _POSITIVE,
    "pretrain.max_length": (lambda v: v >= 8, "must be at least 8 tokens"),
    "pretrain.min_snr_gamma": _POSITIVE,
    "pretrain.vae.steps": _POSITIVE,
    "pretrain.vae.batch_size": _POSITIVE,
    "pretrain.vae.lr": _POSITIVE,
    "pretrain.vae.block_out_channels": (
        lambda v: len(v) == 3 and all(c > 0 for c in v),
        "must be three positive widths (downsampling x4)",
    ),
    "pretrain.vae.layers_per_block": _POSITIVE,
    "pretrain.vae.kl_weight": (lambda v: v >= 0, "must be >= 0"),
    "pretrain.vae.edge_weight": (lambda v: v >= 0, "must be >= 0"),
    "pretrain.vae.decoder_steps": (lambda v: v >= 0, "must be >= 0"),
    "pretrain.vae.decoder_lr": _POSITIVE,
    "pretrain.vae.decoder_sharpen_steps": (lambda v: v >= 0, "must be >= 0"),
    "pretrain.vae.decoder_sharpen_lr": _POSITIVE,
    "pretrain.vae.decoder_sharpen_batch_size": _POSITIVE,
    "pretrain.vae.decoder_sharpen_edge_weight": (lambda v: v >= 0, "must be >= 0"),
    "decoder.heads": (
        lambda v: "semantic" in v and set(v) <= {"semantic", "depth", "keypoints"} and len(set(v)) == len(v),
        "must list semantic and any of depth, keypoints, without repeats",
    ),
    "decoder.channels": _POSITIVE,
    "evaluate.num_zero_shot": _POSITIVE,
    "evaluate.num_regenerated": (lambda v: v >= 0, "must be >= 0 (0 skips the measurement)"),
    "evaluate.regenerate_strength": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "downstream.steps": _POSITIVE,
    "downstream.batch_size": (lambda v: v >= 3, "must be >= 3 (a batch mixes sources)"),
    "downstream.lr": _POSITIVE,
    "downstream.width": _POSITIVE,
    "decoder.views": (lambda v: v in (1, 2, 8), "must be 1, 2 or 8"),
    "decoder.steps": _POSITIVE,
    "decoder.batch_size": _POSITIVE,
    "decoder.lr": _POSITIVE,
    "prompts.num_prompts": _POSITIVE,
    "prompts.max_objects": (lambda v: 1 <= v <= 6, "must be between 1 and 6"),
    "generate.num_samples": _POSITIVE,
    "generate.batch_size": _POSITIVE,
    "generate.shard_size": _POSITIVE,
    "filter.min_score": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "export.grid_samples": _NON_NEGATIVE,
    "steer.round": _NON_NEGATIVE,
    "steer.budget": _POSITIVE,
    "steer.experiment_rounds": _POSITIVE,
    "steer.experiment_seeds": _POSITIVE,
    "steer.floor": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "steer.candidates": (lambda v: 1 <= v <= 8, "must be between 1 and 8"),
    "steer.folds": (lambda v: v >= 2, "must be at least 2"),
    "curate.min_quality": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "curate.duplicate_threshold": (lambda v: 0 <= v <= 2, "must be in [0, 2] (cosine distance)"),
}


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raise ``DatasetDMError`` on any problem."""
    raw = load_yaml(path)  # strict: a key given twice is refused, not silently overwritten
    return params_from_dict(raw if raw is not None else {}, source=str(path))


def params_from_dict(raw: Any, source: str = "params.yaml") -> Params:
    """Build ``Params`` from a plain mapping (as parsed YAML), validating every key."""
    params = _build(Params, raw, prefix="", source=source)
    params = dataclasses.replace(params, source=source)
    _check_cross_fields(params)
    return params


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise DatasetDMError(
            source, prefix.rstrip(".") or "(top level)", f"must be a mapping, got {type(raw).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise DatasetDMError(source, key, f"unknown key (expected one of: {', '.join(fields)})")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        values[name] = _coerce(hints[name], value, key, source)
        if key in _CHECKS:
            ok, what = _CHECKS[key]
            if not ok(values[name]):
                raise DatasetDMError(source, key, f"{what}, got {value!r}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{key}.", source=source)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise DatasetDMError(source, key, f"must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if not isinstance(value, list):
            raise DatasetDMError(source, key, f"must be a list, got {type(value).__name__}")
        return tuple(_coerce(item, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type {hint}")
    if hint is bool:
        if not isinstance(value, bool):
            raise DatasetDMError(source, key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DatasetDMError(source, key, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DatasetDMError(source, key, f"must be a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .inf / .nan pass every range check written as a comparison
            raise DatasetDMError(source, key, f"must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise DatasetDMError(source, key, f"must be a non-empty string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint}")


def _check_cross_fields(p: Params) -> None:
    s = p.source
    for i, c in enumerate(p.world.classes):
        if c not in SHAPES:
            raise DatasetDMError(s, f"world.classes[{i}]", f"unknown class {c!r} (known: {', '.join(SHAPES)})")
    for i, c in enumerate(p.world.colours):
        if c not in COLOURS:
            raise DatasetDMError(s, f"world.colours[{i}]", f"unknown colour {c!r} (known: {', '.join(COLOURS)})")
    for i, c in enumerate(p.pretrain.classes):
        if c not in SHAPES:
            raise DatasetDMError(s, f"pretrain.classes[{i}]", f"unknown class {c!r} (known: {', '.join(SHAPES)})")
    for i, c in enumerate(p.inspect.classes):
        if c not in SHAPES:
            raise DatasetDMError(s, f"inspect.classes[{i}]", f"unknown class {c!r} (known: {', '.join(SHAPES)})")
    for i, c in enumerate(p.evaluate.unseen_classes):
        if c not in SHAPES:
            raise DatasetDMError(
                s, f"evaluate.unseen_classes[{i}]", f"unknown class {c!r} (known: {', '.join(SHAPES)})"
            )
        if c in p.world.classes:
            raise DatasetDMError(s, f"evaluate.unseen_classes[{i}]", f"{c!r} is in world.classes, so it is not unseen")
    # GroupNorm in the UNet and the VAE works in groups of 16 channels; heads split the width.
    for section, widths in (
        ("pretrain", p.pretrain.block_out_channels),
        ("pretrain.vae", p.pretrain.vae.block_out_channels),
    ):
        for i, w in enumerate(widths):
            if w % 16:
                raise DatasetDMError(
                    s, f"{section}.block_out_channels[{i}]", f"must be a multiple of 16 (GroupNorm groups), got {w}"
                )
    if p.pretrain.text_dim % 4:
        raise DatasetDMError(
            s, "pretrain.text_dim", f"must be a multiple of 4 (attention heads), got {p.pretrain.text_dim}"
        )
    if p.world.min_size > p.world.max_size:
        raise DatasetDMError(s, "world.min_size", "must not exceed world.max_size")
    for i, t in enumerate(p.prompts.templates):
        if "{objects}" not in t:
            raise DatasetDMError(s, f"prompts.templates[{i}]", "must contain {objects}")
    if p.prompts.max_objects > p.world.max_objects:
        raise DatasetDMError(s, "prompts.max_objects", "must not exceed world.max_objects")
    check_kind(p.backbone.kind, s)
    if not p.backbone.model:
        raise DatasetDMError(
            s, "backbone.model", "needs a model: a local diffusers pipeline folder or a cached hub id"
        )
