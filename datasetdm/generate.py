"""Annotated generation: images from prompts, labelled by the P-Decoder on the fly.

Samples are planned up front (sample i gets prompt ``i mod P`` and its own seed), then
generated in batches and written in shards. Each shard directory is written to a
temporary name and renamed when complete, and a shard already on disk with the same
plan is reused, so an interrupted run resumes where it stopped and never leaves a
half-written shard. The manifest, written last, lists every shard with its hash.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasetdm.backbones.base import Backbone
from datasetdm.config import BackboneConfig, GenerateConfig
from datasetdm.decoder.inputs import class_attention, prompt_classes
from datasetdm.decoder.model import PDecoder
from datasetdm.decoder.train import predict
from datasetdm.errors import DatasetDMError
from datasetdm.filtering import LABEL_CLEANING, clean_labels, quality_components
from datasetdm.io import atomic_path, remove_temporaries, save_png, sha256_dir, write_json
from datasetdm.keypoints import CHANNELS, find_peaks
from datasetdm.realset import depth_to_png

logger = logging.getLogger(__name__)
SAFE_SHARD = re.compile(r"shard-\d{5}")
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
MANIFEST_ENTRY = ("name", "sha256", "num_samples")  # what the manifest records of each shard


@dataclass(frozen=True)
class PlannedSample:
    index: int
    prompt: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.index:06d}"


def plan_samples(prompts: list[str], cfg: GenerateConfig) -> list[PlannedSample]:
    """Sample i: prompt i mod P, seed derived from (generate.seed, i) only."""
    if not prompts:
        raise DatasetDMError(None, "prompts", "no prompts to generate from")
    return [PlannedSample(i, prompts[i % len(prompts)], cfg.seed * 1_000_003 + i) for i in range(cfg.num_samples)]


def load_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DatasetDMError(path, None, "prompts file not found; run the expand-prompts stage")
    try:
        data = json.loads(path.read_text())
        prompts = [str(r["prompt"]) for r in data["prompts"]]
    except json.JSONDecodeError as e:
        raise DatasetDMError(path, f"line {e.lineno}", f"not valid JSON ({e.msg})") from None
    except (KeyError, TypeError):
        raise DatasetDMError(path, "prompts", 'expected {"prompts": [{"prompt": ...}, ...]}') from None
    return prompts


def check_prompts(prompts: list[str], backbone: Backbone, classes: tuple[str, ...], source: str) -> None:
    """Every prompt must encode and name at least one class the decoder labels."""
    if not prompts:
        raise DatasetDMError(source, "prompts", "empty: no prompts to generate from")
    for i, p in enumerate(prompts):
        try:
            backbone.validate_prompt(p)
        except DatasetDMError as e:
            raise DatasetDMError(source, f"prompts[{i}]", e.message) from None
        if not prompt_classes(p, backbone, classes):
            raise DatasetDMError(
                source, f"prompts[{i}]", f"{p!r} names no class the decoder labels (classes: {', '.join(classes)})"
            )


def generate(
    backbone: Backbone,
    decoder: PDecoder,
    prompts: list[str],
    *,
    gen: GenerateConfig,
    bb: BackboneConfig,
    out_dir: str | Path,
    prompts_source: str = "prompts",
) -> dict:
    """Generate ``gen.num_samples`` annotated samples into ``out_dir``; return the manifest (``write_manifest``'s).

    The single-process run of exactly what an orchestrator does across workers:
    ``generate_shard`` for every shard of ``shard_plan``, then ``write_manifest``.
    """
    out_dir = Path(out_dir)
    # 1. Check inputs: every prompt encodes and names a class the decoder labels.
    classes = tuple(decoder.config["classes"])
    check_prompts(prompts, backbone, classes, prompts_source)
    # 2. Plan: which samples go to which shard.
    shards = shard_plan(prompts, gen)
    # 3. Unseal: shards whose files changed since the last seal are remade; no manifest
    #    may vouch for the folder while its shards change.
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_changed_shards(out_dir)
    _discard_leftovers(out_dir)
    # 4. Make (or reuse) each shard.
    entries = []
    with tqdm(total=gen.num_samples, desc="generate", unit="img", mininterval=2) as bar:
        for k, shard in enumerate(shards):
            entries.append(generate_shard(backbone, decoder, prompts, gen=gen, bb=bb, out_dir=out_dir, k=k))
            bar.update(len(shard))
    # 5. Seal: the manifest over every shard, stale shards gone.
    return write_manifest(
        out_dir,
        entries,
        classes=classes,
        image_size=backbone.image_size,
        provenance=generation_provenance(backbone, decoder, bb),
    )


def _discard_leftovers(out_dir: Path) -> None:
    """Make ``out_dir`` say "incomplete" until a new manifest is written.

    The manifest is the seal of a finished run: it goes first, so a run killed from
    here on leaves no manifest that could vouch for shards it was replacing or
    removing, and the temporaries of a previously killed run go with it.
    """
    if (out_dir / MANIFEST).is_file():
        logger.info("%s: manifest removed until this run seals the folder again", out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    removed = remove_temporaries(out_dir, "shard-*") + remove_temporaries(out_dir, MANIFEST)
    if removed:
        logger.info("%s: discarded %d leftover temporaries of a killed run", out_dir, len(removed))


def _shard_matches(shard_dir: Path, shard: list[PlannedSample], provenance: dict) -> bool:
    """Whether ``shard_dir`` already holds exactly this plan, made by the same models.

    Anything unreadable or unexpected (a hand-edited or foreign folder) means "no":
    the shard is then made again, never trusted and never a traceback.
    """
    records_file = shard_dir / "records.json"
    if not records_file.is_file():
        return False
    try:
        records = json.loads(records_file.read_text())
        want = [(s.id, s.prompt, s.seed) for s in shard]
        have = [(r.get("id"), r.get("prompt"), r.get("seed")) for r in records]
        same_models = all(r.get(k) == v for r in records for k, v in provenance.items())
        return (
            want == have
            and same_models
            and (shard_dir / EMBEDDINGS).is_file()
            and all(
                (shard_dir / r[key]).is_file() for r in records for key in ("image", "semantic", "depth") if key in r
            )
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # JSONDecodeError is a ValueError
        return False


@dataclass
class AnnotatedBatch:
    """One generated batch with every annotation the decoder's heads give.

    ``depth`` is uint16 millimetres (``DEPTH_SCALE`` units per metre, as the real sets)
    and ``keypoints`` the heatmap peaks per sample (``{"centre": [[x, y, score], ...],
    "corner": [...]}``); both are None when the decoder lacks that head. Peaks are
    grouped into per-instance COCO keypoints at export, where instances are made.
    """

    pixels: np.ndarray  # (B, H, W, 3) uint8
    labels: np.ndarray  # (B, H, W) uint8
    quality: list[dict[str, float]]
    embeddings: np.ndarray  # (B, D) float16, ``Features.pooled``
    class_probs: np.ndarray  # (B, 1 + K) float, see ``object_class_probs``
    depth: np.ndarray | None = None  # (B, H, W) uint16 mm
    keypoints: list[dict[str, list[list[float]]]] | None = None


def annotate_batch(
    backbone: Backbone,
    decoder: PDecoder,
    prompts: list[str],
    seeds: list[int],
    *,
    classes: tuple[str, ...],
    bb: BackboneConfig,
    init_images: torch.Tensor | None = None,
    strength: float = 1.0,
) -> AnnotatedBatch:
    """Generate one batch and annotate it with every head of the decoder.

    This is all the work per sample that the factory adds to plain sampling; the
    capture-overhead benchmark times exactly this function. ``init_images`` and
    ``strength`` regenerate given images instead (img2img; the filter's measurement
    on known layouts uses it).
    """
    images, features = backbone.sample(
        prompts,
        seeds,
        steps=bb.steps,
        guidance_scale=bb.guidance_scale,
        capture_timestep=bb.feature_timestep,
        init_images=init_images,
        strength=strength,
    )
    assert features is not None
    device = next(decoder.parameters()).device
    images, features = images.to(device), features.to(device)
    attention = class_attention(features, backbone, classes)
    out = predict(decoder, backbone, features, images, classes=classes, attention=attention)
    probs = out["semantic"]
    named = [[classes.index(c) for c in prompt_classes(p, backbone, classes)] for p in prompts]
    quality = quality_components(probs, attention, named)
    labels = np.stack([clean_labels(x) for x in out["labels"].to(torch.uint8).cpu().numpy()])
    pixels = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    embeddings = features.pooled().cpu().numpy().astype(np.float16)
    batch = AnnotatedBatch(pixels, labels, quality, embeddings, object_class_probs(probs))
    if "depth" in out:
        depth = decoder.depth_labels(out["depth"], torch.from_numpy(labels).to(out["depth"].device))
        batch.depth = depth_to_png(depth.cpu().numpy())
    if "keypoints" in out:
        batch.keypoints = [
            {name: np.round(p.astype(np.float64), 3).tolist() for name, p in zip(CHANNELS, find_peaks(h))}
            for h in out["keypoints"].cpu().numpy()
        ]
    return batch


def object_class_probs(probs: torch.Tensor) -> np.ndarray:
    """(B, 1 + K): the decoder's class distribution averaged over the pixels it calls objects.

    Curation reads its entropy as the sample's hardness (FiftyOne Brain): high where
    the decoder hesitates between classes or between object and background. Averaging
    over object pixels only keeps a small object's doubt from drowning in background;
    an image with no object pixels averages over all of them.
    """
    objects = (probs.argmax(1, keepdim=True) > 0).to(probs.dtype)
    objects = torch.where(objects.sum(dim=(2, 3), keepdim=True) > 0, objects, torch.ones_like(objects))
    mean = (probs * objects).sum(dim=(2, 3)) / objects.sum(dim=(2, 3))
    return mean.double().cpu().numpy()


def _write_shard(
    shard_dir: Path,
    shard: list[PlannedSample],
    *,
    backbone: Backbone,
    decoder: PDecoder,
    gen: GenerateConfig,
    bb: BackboneConfig,
    provenance: dict,
) -> None:
    """Generate ``shard`` and write it to ``shard_dir`` atomically (images, label PNGs, ``records.json``)."""
    name = shard_dir.name
    classes = tuple(decoder.config["classes"])
    records, embeddings = [], []
    # This shard is about to change, so no manifest may vouch for the folder any more;
    # a killed earlier attempt at this shard may have left its temporary behind.
    (shard_dir.parent / MANIFEST).unlink(missing_ok=True)
    if remove_temporaries(shard_dir.parent, name):
        logger.info("%s: discarded the temporary of an earlier, killed attempt", name)
    with atomic_path(shard_dir) as tmp:
        (tmp / "images").mkdir(parents=True)
        (tmp / "semantic").mkdir()
        for start in range(0, len(shard), gen.batch_size):
            batch = shard[start : start + gen.batch_size]
            made = annotate_batch(
                backbone, decoder, [s.prompt for s in batch], [s.seed for s in batch], classes=classes, bb=bb
            )
            for j, s in enumerate(batch):
                save_png(tmp / "images" / f"{s.id}.png", made.pixels[j])
                save_png(tmp / "semantic" / f"{s.id}.png", made.labels[j])
                record = {
                    "id": s.id,
                    "shard": name,
                    "prompt": s.prompt,
                    "seed": s.seed,
                    "image": f"images/{s.id}.png",
                    "semantic": f"semantic/{s.id}.png",
                }
                if made.depth is not None:
                    (tmp / "depth").mkdir(exist_ok=True)
                    save_png(tmp / "depth" / f"{s.id}.png", made.depth[j])
                    record["depth"] = f"depth/{s.id}.png"
                if made.keypoints is not None:
                    record["keypoints"] = made.keypoints[j]
                record["class_probs"] = np.round(made.class_probs[j], 6).tolist()
                records.append(
                    {**record, **provenance, "quality": {k: round(v, 6) for k, v in made.quality[j].items()}}
                )
            embeddings.append(made.embeddings)
        # Row i is records[i]: the backbone's pooled view of each image, for curation.
        np.save(tmp / EMBEDDINGS, np.concatenate(embeddings))
        write_json(tmp / "records.json", records)


def read_records(gen_dir: str | Path) -> list[dict]:
    """All sample records of a generated set, in sample order (filtering reads these).

    Each shard is checked against the hash the manifest recorded when it was made, so
    a shard edited after generation stops the reader instead of flowing on.
    """
    gen_dir = Path(gen_dir)
    manifest_file = gen_dir / MANIFEST
    if not manifest_file.is_file():
        raise DatasetDMError(manifest_file, None, "not found; run the generate stage")
    try:
        manifest = json.loads(manifest_file.read_text())
        records = []
        for i, shard in enumerate(manifest["shards"]):
            verify_shard(gen_dir, shard, field=f"shards[{i}].sha256")
            file = gen_dir / shard["name"] / "records.json"
            try:
                records += json.loads(file.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise DatasetDMError(file, None, f"unreadable ({e})") from None
    except json.JSONDecodeError as e:
        raise DatasetDMError(manifest_file, f"line {e.lineno}", f"not valid JSON ({e.msg})") from None
    except (KeyError, TypeError):
        raise DatasetDMError(manifest_file, "shards", "malformed manifest") from None
    return records


def verify_shard(gen_dir: Path, shard: dict, *, field: str) -> None:
    """Stop with one line if a shard's files are not the ones its manifest entry hashed."""
    shard_dir = gen_dir / shard["name"]
    if not shard_dir.is_dir() or sha256_dir(shard_dir) != shard["sha256"]:
        raise DatasetDMError(
            shard_dir,
            field,
            "its files changed (or went missing) since generation; run the generate stage to remake it",
        )


def remove_changed_shards(out_dir: Path) -> list[str]:
    """Delete the shards whose files no longer match the last manifest, so they are remade.

    A shard is otherwise reused when its records name the planned samples and models;
    an image or mask edited by hand would pass that test, its hash does not.
    """
    try:
        shards = json.loads((out_dir / MANIFEST).read_text())["shards"]
        recorded = {s["name"]: s["sha256"] for s in shards}
    except (OSError, ValueError, KeyError, TypeError):
        return []  # no seal (first run, or a killed one): shards are judged by their records
    removed = []
    for name, digest in recorded.items():
        shard_dir = out_dir / name
        if SAFE_SHARD.fullmatch(name) and shard_dir.is_dir() and sha256_dir(shard_dir) != digest:
            shutil.rmtree(shard_dir)
            removed.append(name)
            logger.info("%s: files changed since generation: removed, to be made again", name)
    return removed


# Sharded generation: each shard is an independent unit of work that any worker can
# make (a sample's pixels depend only on its prompt and seed), and the manifest is
# written once every shard exists. ``generate`` above calls these same functions in one
# process, and an orchestrator maps ``generate_shard`` over workers, so both give
# byte-identical shards and manifests.


def shard_plan(prompts: list[str], gen: GenerateConfig) -> list[list[PlannedSample]]:
    """The plan cut into shards of ``gen.shard_size`` samples, in sample order."""
    plan = plan_samples(prompts, gen)
    return [plan[i : i + gen.shard_size] for i in range(0, len(plan), gen.shard_size)]


def generation_provenance(backbone: Backbone, decoder: PDecoder, bb: BackboneConfig) -> dict:
    """What every record and the manifest carry about the models and sampler."""
    return {
        "backbone": backbone.fingerprint(),
        "decoder": decoder.fingerprint(),
        "scheduler": "DDIMScheduler",
        "steps": bb.steps,
        "guidance_scale": bb.guidance_scale,
        "feature_timestep": bb.feature_timestep,
        "label_cleaning": list(LABEL_CLEANING),
    }


def generate_shard(
    backbone: Backbone,
    decoder: PDecoder,
    prompts: list[str],
    *,
    gen: GenerateConfig,
    bb: BackboneConfig,
    out_dir: str | Path,
    k: int,
) -> dict:
    """Make shard ``k`` of the plan in ``out_dir`` (reused if already complete); return its manifest entry."""
    shards = shard_plan(prompts, gen)
    if not 0 <= k < len(shards):
        raise DatasetDMError(None, "shard", f"shard {k} does not exist (the plan has {len(shards)} shards)")
    provenance = generation_provenance(backbone, decoder, bb)
    shard_dir = Path(out_dir) / f"shard-{k:05d}"
    made = 0
    if _shard_matches(shard_dir, shards[k], provenance):
        logger.info("%s: reused (same samples, same models)", shard_dir.name)
    else:
        logger.info("%s: %s", shard_dir.name, "rebuilt (plan or models changed)" if shard_dir.exists() else "made")
        _write_shard(shard_dir, shards[k], backbone=backbone, decoder=decoder, gen=gen, bb=bb, provenance=provenance)
        made = len(shards[k])
    return {"name": shard_dir.name, "sha256": sha256_dir(shard_dir), "num_samples": len(shards[k]), "made": made}


def write_manifest(
    out_dir: str | Path, entries: list[dict], *, classes: tuple[str, ...], image_size: int, provenance: dict
) -> dict:
    """Write the manifest over ``entries`` (in shard order) and drop shards not listed.

    Returns the manifest as written plus ``made``: how many of its samples the entries say
    were made by this run rather than reused (what a run's images per hour may count).
    The count is never written: the manifest is the same bytes however a run got there.
    """
    out_dir = Path(out_dir)
    names = {e["name"] for e in entries}
    _discard_leftovers(out_dir)
    for stale in sorted(out_dir.glob("shard-*")):
        if stale.name not in names:
            logger.info("%s: removed (not in this plan)", stale.name)
            shutil.rmtree(stale)
    manifest = {
        "classes": list(classes),
        "image_size": image_size,
        **provenance,
        "num_samples": sum(e["num_samples"] for e in entries),
        "shards": [{key: e[key] for key in MANIFEST_ENTRY} for e in entries],
    }
    write_json(out_dir / MANIFEST, manifest)
    return {**manifest, "made": sum(e.get("made", 0) for e in entries)}
