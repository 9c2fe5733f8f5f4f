"""The export stage: a filtered generated set becomes a self-describing dataset.

Reads what generation and filtering left on disk, checks it against the generation
manifest (every shard's content hash, every record's fields, every mask's labels),
and writes ``out_dir`` as one unit::

    images/<id>.png      RGB, byte-for-byte the generated image
    masks/<id>.png       VOC palette PNG, pixel value = category id
    depth/<id>.png       16-bit PNG, millimetres (card: depth_scale), if the decoder has a depth head
    annotations.json     COCO (image entries also carry prompt, seed, score; keypoints
                         per instance if the decoder has a keypoint head)
    embeddings.npy       (N, D) float16, row i = images[i] of annotations.json: the backbone's
                         pooled features of each image (curation's similarity search), if the
                         generated shards carry them
    dataset.json         the dataset card (see ``card.py``)
    grid.png             the first ``grid_samples`` kept samples, if any

The directory is built under a temporary name and renamed into place, so a failure
at any point leaves the previous export exactly as it was. Every problem with the
inputs is a ``DatasetDMError`` naming the file and field.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from datasetdm.errors import DatasetDMError
from datasetdm.export.card import build_card
from datasetdm.export.coco import semantic_to_coco_annotations, write_coco
from datasetdm.export.grid import sample_grid
from datasetdm.export.voc import save_voc_mask
from datasetdm.io import atomic_path, sha256_dir, sha256_file, write_json
from datasetdm.keypoints import CHANNELS
from datasetdm.realset import DEPTH_SCALE

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RECORDS = "records.json"
EMBEDDINGS = "embeddings.npy"
# Fields every generation record must carry, with their JSON types.
RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "prompt": str,
    "seed": int,
    "image": str,
    "semantic": str,
    "backbone": str,
    "decoder": str,
    "scheduler": str,
    "steps": int,
    "guidance_scale": (int, float),
}
# Sample ids and shard names become file and folder names in the export: only plain
# names (no separators, no "..", no leading dot, no control characters) may.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Fields that must be the same for every record of one generated set.
PROVENANCE = ("backbone", "decoder", "scheduler", "steps", "guidance_scale")


@dataclass(frozen=True)
class Sample:
    """One generated record, located on disk, with its filtering decision."""

    record: dict[str, Any]
    shard: str
    records_file: Path
    field: str  # e.g. "[3]", the record's place in records_file, for error messages
    row: int  # the record's index in records_file (and its row of the shard's embeddings.npy)
    score: float | None = None
    kept: bool = False

    @property
    def id(self) -> str:
        return self.record["id"]

    def path(self, key: str) -> Path:
        return self.records_file.parent / self.record[key]


def export_dataset(
    gen_dir: str | Path,
    filtered_json: str | Path,
    out_dir: str | Path,
    *,
    params_dict: dict[str, Any],
    grid_samples: int,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export the kept samples of ``gen_dir`` to ``out_dir``; return the dataset card."""
    if grid_samples < 0:
        raise ValueError(f"grid_samples must be >= 0, got {grid_samples}")
    gen_dir, out_dir = Path(gen_dir), Path(out_dir)
    manifest_file = gen_dir / MANIFEST
    manifest = _read_manifest(manifest_file)
    classes = manifest["classes"]
    samples = _read_shards(gen_dir, manifest, manifest_file)
    min_score, samples = _apply_filter(Path(filtered_json), samples, manifest_file=manifest_file)
    kept = [s for s in samples if s.kept]
    logger.info(
        "exporting %d of %d generated samples (filter.min_score %s) to %s", len(kept), len(samples), min_score, out_dir
    )

    has_keypoints = any("keypoints" in s.record for s in kept)
    with atomic_path(out_dir) as tmp:
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks").mkdir()
        images, annotations, label_counts, grid = [], [], [], []
        for n, s in enumerate(kept, start=1):
            image, semantic = _read_pair(s, len(classes), manifest["image_size"])
            # The generated PNG is copied, not re-encoded, so exported pixels and bytes
            # are exactly the ones the shard hash vouched for.
            shutil.copyfile(s.path("image"), tmp / "images" / f"{s.id}.png")
            save_voc_mask(tmp / "masks" / f"{s.id}.png", semantic)
            h, w = semantic.shape
            entry = {
                "id": n,
                "file_name": f"images/{s.id}.png",
                "width": w,
                "height": h,
                "prompt": s.record["prompt"],
                "seed": s.record["seed"],
                "score": s.score,
                "sample_id": s.id,
                "shard": s.shard,
            }
            if "class_probs" in s.record:
                entry["class_probs"] = _read_class_probs(s, len(classes))
            if "depth" in s.record:
                _check_depth(s, semantic.shape)
                (tmp / "depth").mkdir(exist_ok=True)
                shutil.copyfile(s.path("depth"), tmp / "depth" / f"{s.id}.png")
                entry["depth_file"] = f"depth/{s.id}.png"
            images.append(entry)
            peaks = _read_peaks(s) if "keypoints" in s.record else None
            annotations += semantic_to_coco_annotations(
                semantic, image_id=n, classes=classes, start_ann_id=len(annotations) + 1, peaks=peaks
            )
            label_counts.append(np.bincount(semantic.ravel(), minlength=1 + len(classes)))
            if len(grid) < grid_samples:
                grid.append((image, semantic, s.record["prompt"], s.score))
        # No date in "info": the same inputs must give the same bytes (DVC hashes outputs).
        info = {
            "description": "datasetdm synthetic dataset",
            "contributor": "datasetdm",
            "version": "1",
            "backbone": manifest["backbone"],
            "decoder": manifest["decoder"],
            "min_score": min_score,
            "depth_scale": DEPTH_SCALE,
        }
        write_coco(tmp / "annotations.json", images, annotations, classes, info=info, keypoints=has_keypoints)
        files = {
            "annotations.json": sha256_file(tmp / "annotations.json"),
            "images": sha256_dir(tmp / "images"),
            "masks": sha256_dir(tmp / "masks"),
        }
        if (tmp / "depth").is_dir():
            files["depth"] = sha256_dir(tmp / "depth")
        embeddings = _read_embeddings(kept)
        if embeddings is not None:
            np.save(tmp / EMBEDDINGS, embeddings)
            files[EMBEDDINGS] = sha256_file(tmp / EMBEDDINGS)
        if grid:
            sample_grid(grid, tmp / "grid.png", classes=classes)
            files["grid.png"] = sha256_file(tmp / "grid.png")
        card = build_card(
            classes=classes,
            image_size=manifest["image_size"],
            generated=[s.record for s in samples],
            kept=[{"id": s.id, "score": s.score} for s in kept],
            label_counts=label_counts,
            min_score=min_score,
            params=params_dict,
            backbone=manifest["backbone"],
            decoder=manifest["decoder"],
            files=files,
            provenance=provenance,
        )
        write_json(tmp / "dataset.json", card)
    return card


def _read_json(path: Path, missing: str) -> Any:
    if not path.is_file():
        raise DatasetDMError(path, None, missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetDMError(path, f"line {e.lineno}", f"not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise DatasetDMError(path, None, "not UTF-8 text") from None


def _need(obj: Any, key: str, kind: type | tuple[type, ...], file: Path, *, field: str) -> Any:
    """``obj[key]`` if present and of JSON type ``kind`` (a bool is not a number)."""
    if not isinstance(obj, dict) or key not in obj:
        raise DatasetDMError(file, field, "missing")
    value = obj[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DatasetDMError(file, field, f"must be {names}, got {value!r}")
    return value


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest = _read_json(path, "not found; run the generate stage")
    if not isinstance(manifest, dict):
        raise DatasetDMError(path, None, "must be a JSON object")
    classes = _need(manifest, "classes", list, path, field="classes")
    if not classes or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise DatasetDMError(path, "classes", "must be a non-empty list of distinct names")
    if len(classes) > 254:  # mask pixels are uint8 and 255 is VOC's boundary colour
        raise DatasetDMError(path, "classes", f"at most 254 classes fit a uint8 mask, got {len(classes)}")
    if _need(manifest, "image_size", int, path, field="image_size") <= 0:
        raise DatasetDMError(path, "image_size", "must be > 0")
    for key in ("backbone", "decoder"):
        _need(manifest, key, str, path, field=key)
    shards = _need(manifest, "shards", list, path, field="shards")
    for i, shard in enumerate(shards):
        name = _need(shard, "name", str, path, field=f"shards[{i}].name")
        if not SAFE_NAME.fullmatch(name):
            raise DatasetDMError(path, f"shards[{i}].name", f"must be a plain folder name, got {name!r}")
        _need(shard, "sha256", str, path, field=f"shards[{i}].sha256")
        _need(shard, "num_samples", int, path, field=f"shards[{i}].num_samples")
    return manifest


def _read_shards(gen_dir: Path, manifest: dict[str, Any], manifest_file: Path) -> list[Sample]:
    """Every record of every shard, after checking each shard's hash and each record."""
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    for i, shard in enumerate(manifest["shards"]):
        name, shard_dir = shard["name"], gen_dir / shard["name"]
        if not shard_dir.is_dir():
            raise DatasetDMError(manifest_file, f"shards[{i}].sha256", f"shard {name} is missing from {gen_dir}")
        if sha256_dir(shard_dir) != shard["sha256"]:
            raise DatasetDMError(
                manifest_file,
                f"shards[{i}].sha256",
                f"shard {name} does not match its recorded hash (files changed or missing); re-run generate",
            )
        records_file = shard_dir / RECORDS
        records = _read_json(records_file, "not found")
        if not isinstance(records, list):
            raise DatasetDMError(records_file, None, "must be a JSON list of records")
        if len(records) != shard["num_samples"]:
            raise DatasetDMError(
                manifest_file,
                f"shards[{i}].num_samples",
                f"says {shard['num_samples']} but {name}/{RECORDS} has {len(records)} records",
            )
        for j, record in enumerate(records):
            for key, kind in RECORD_FIELDS.items():
                _need(record, key, kind, records_file, field=f"[{j}].{key}")
            if "depth" in record:
                _need(record, "depth", str, records_file, field=f"[{j}].depth")
            for key in ("image", "semantic", "depth"):
                if key not in record:
                    continue
                rel = PurePosixPath(record[key])
                if rel.is_absolute() or ".." in rel.parts:
                    raise DatasetDMError(
                        records_file, f"[{j}].{key}", f"must be a path inside the shard, got {record[key]!r}"
                    )
            for key in ("backbone", "decoder"):
                if record[key] != manifest[key]:
                    raise DatasetDMError(
                        records_file, f"[{j}].{key}", f"{record[key]} differs from the manifest's {manifest[key]}"
                    )
            first = samples[0].record if samples else record
            for key in PROVENANCE:
                if record[key] != first[key]:
                    raise DatasetDMError(
                        records_file,
                        f"[{j}].{key}",
                        f"{record[key]!r} differs from {first[key]!r} in other records; "
                        "one export holds one generation run",
                    )
            if record["id"] in seen:
                raise DatasetDMError(
                    records_file, f"[{j}].id", f"{record['id']!r} also appears in shard {seen[record['id']]}"
                )
            if not SAFE_NAME.fullmatch(record["id"]):
                raise DatasetDMError(
                    records_file,
                    f"[{j}].id",
                    f"must be a plain file name (letters, digits, '.', '_', '-'), got {record['id']!r}",
                )
            seen[record["id"]] = name
            samples.append(Sample(record, name, records_file, f"[{j}]", j))
    return samples


def _apply_filter(
    path: Path, samples: list[Sample], *, manifest_file: Path | None = None
) -> tuple[float | None, list[Sample]]:
    """Attach filtered.json's score and decision to every sample.

    The decisions must have been made for this generation run: filtered.json records
    the sha256 of the manifest.json it was computed under (``generation_manifest``),
    checked against ``manifest_file`` (by default the manifest beside the samples'
    shards). Matching sample ids are not enough: generate rerun with another seed
    keeps every id and changes every pixel. The decisions must also cover exactly the
    generated samples: an unknown or missing sample means another run too.

    No self-hash of the decisions is kept: it could only catch an edit of
    filtered.json itself, which nothing but the filter stage writes, whose every
    entry is checked here (type, coverage) and whose effect the card records (each
    kept sample and its score); and a hash stored beside what it vouches for is
    rewritten by whoever edits on purpose. Stale decisions are what slip through
    silently, and the manifest hash catches those.
    """
    data = _read_json(path, "not found; run the filter stage")
    if not isinstance(data, dict):
        raise DatasetDMError(path, None, "must be a JSON object")
    _check_generation_manifest(path, data, manifest_file or _manifest_of(samples))
    min_score = data.get("min_score")
    if min_score is not None and (isinstance(min_score, bool) or not isinstance(min_score, (int, float))):
        raise DatasetDMError(path, "min_score", f"must be a number, got {min_score!r}")
    entries = _need(data, "samples", list, path, field="samples")
    by_key = {(s.shard, s.id): s for s in samples}
    decided: dict[tuple[str, str], Sample] = {}
    for i, entry in enumerate(entries):
        key = (
            _need(entry, "shard", str, path, field=f"samples[{i}].shard"),
            _need(entry, "id", str, path, field=f"samples[{i}].id"),
        )
        score = float(_need(entry, "score", (int, float), path, field=f"samples[{i}].score"))
        kept = _need(entry, "kept", bool, path, field=f"samples[{i}].kept")
        if key not in by_key:
            raise DatasetDMError(
                path, f"samples[{i}]", f"sample {key[1]} of {key[0]} is not in the generated set; re-run filter"
            )
        if key in decided:
            raise DatasetDMError(path, f"samples[{i}]", f"sample {key[1]} of {key[0]} is listed twice")
        s = by_key[key]
        decided[key] = Sample(s.record, s.shard, s.records_file, s.field, s.row, score, kept)
    missing = [k for k in by_key if k not in decided]
    if missing:
        raise DatasetDMError(
            path,
            "samples",
            f"has no decision for sample {missing[0][1]} of {missing[0][0]} ({len(missing)} missing); re-run filter",
        )
    return (float(min_score) if min_score is not None else None), [decided[(s.shard, s.id)] for s in samples]


def _read_pair(s: Sample, num_classes: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The sample's image (HxWx3 uint8) and semantic mask (HxW uint8), validated."""
    image = _read_png(s, "image", ("RGB",))
    semantic = _read_png(s, "semantic", ("L",))
    image_file, semantic_file = s.path("image"), s.path("semantic")
    if image.shape[:2] != (image_size, image_size):
        raise DatasetDMError(
            image_file, "size", f"{image.shape[1]}x{image.shape[0]} but the manifest's image_size is {image_size}"
        )
    if semantic.shape != image.shape[:2]:
        raise DatasetDMError(
            semantic_file,
            "size",
            f"{semantic.shape[1]}x{semantic.shape[0]} but its image {s.record['image']} "
            f"is {image.shape[1]}x{image.shape[0]}",
        )
    top = int(semantic.max())
    if top > num_classes:
        raise DatasetDMError(
            semantic_file,
            "pixel values",
            f"class index {top} but the manifest lists {num_classes} classes (max index {num_classes})",
        )
    return image, semantic


def _check_depth(s: Sample, shape: tuple[int, ...]) -> None:
    """The sample's depth PNG must be a 16-bit greyscale image of the mask's size."""
    depth = _read_png(s, "depth", ("I;16", "I"), "a 16-bit greyscale PNG")
    if depth.shape != shape:
        raise DatasetDMError(
            s.path("depth"), "size", f"{depth.shape[1]}x{depth.shape[0]} but its mask is {shape[1]}x{shape[0]}"
        )


def _read_peaks(s: Sample) -> list[np.ndarray]:
    """The record's keypoint peaks, ``{"centre": [[x, y, score], ...], "corner": [...]}``, as two (N, 3) arrays."""
    value = s.record["keypoints"]
    out = []
    for name in CHANNELS:
        peaks = value.get(name) if isinstance(value, dict) else None
        if not isinstance(peaks, list) or not all(
            isinstance(p, list)
            and len(p) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
            for p in peaks
        ):
            raise DatasetDMError(
                s.records_file, f"{s.field}.keypoints.{name}", "must be a list of [x, y, score] numbers"
            )
        out.append(np.asarray(peaks, dtype=np.float32).reshape(-1, 3))
    return out


def _read_png(s: Sample, key: str, modes: tuple[str, ...], expected: str | None = None) -> np.ndarray:
    """The record's ``key`` PNG as an array (uint8 for RGB and L), if its mode is one of ``modes``."""
    path = s.path(key)
    if not path.is_file():
        raise DatasetDMError(s.records_file, f"{s.field}.{key}", f"{s.record[key]} not found in shard {s.shard}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in modes:
                raise DatasetDMError(path, "mode", f"must be {expected or f'a {modes[0]} image'}, got {im.mode}")
            return np.asarray(im).copy()
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetDMError(path, None, f"not a readable image ({e})") from None


def _read_class_probs(s: Sample, num_classes: int) -> list[float]:
    """The record's ``class_probs``: 1 + K probabilities (background first), validated, to 4 places.

    Four places are plenty for a hardness score and keep ``annotations.json`` the same
    across batch sizes, where CPU kernels move the probabilities in their last bits.
    """
    value = s.record["class_probs"]
    if (
        not isinstance(value, list)
        or len(value) != 1 + num_classes
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in value)
    ):
        raise DatasetDMError(
            s.records_file, f"{s.field}.class_probs", f"must be {1 + num_classes} probabilities (background first)"
        )
    return [round(float(v), 4) for v in value]


def _read_embeddings(kept: list[Sample]) -> np.ndarray | None:
    """The kept samples' rows of their shards' ``embeddings.npy``, in export order.

    None when the shards carry no embeddings (curation then falls back to thumbnails);
    all or none, since one export holds one generation run.
    """
    shards: dict[Path, np.ndarray] = {}
    rows = []
    for s in kept:
        file = s.records_file.parent / EMBEDDINGS
        if file not in shards:
            if not file.is_file():
                if shards:
                    raise DatasetDMError(file, None, "missing, but other shards of this run have embeddings")
                return None
            try:
                shards[file] = np.load(file, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DatasetDMError(file, None, f"not a readable .npy array ({e})") from None
            array = shards[file]
            if array.ndim != 2 or array.dtype != np.float16 or rows and array.shape[1] != rows[0].shape[0]:
                raise DatasetDMError(file, "shape", f"must be (records, D) float16, got {array.shape} {array.dtype}")
        array = shards[file]
        if s.row >= len(array):
            raise DatasetDMError(file, "shape", f"{len(array)} rows but {s.records_file.name} has record {s.field}")
        rows.append(array[s.row])
    return np.stack(rows) if rows else None


def _manifest_of(samples: list[Sample]) -> Path | None:
    """The manifest.json of the generated set ``samples`` were read from (shards sit beside it), if any sample."""
    return samples[0].records_file.parent.parent / MANIFEST if samples else None


def _check_generation_manifest(path: Path, data: dict[str, Any], manifest_file: Path | None) -> None:
    """Stop unless filtered.json (``path``, parsed as ``data``) was computed under ``manifest_file``.

    Costs one read of manifest.json (a few kB per thousand samples).
    """
    recorded = data.get("generation_manifest")
    if recorded is None:
        raise DatasetDMError(
            path, "generation_manifest", "missing, so these decisions name no generation run; run the filter stage"
        )
    if not isinstance(recorded, str):
        raise DatasetDMError(path, "generation_manifest", f"must be the sha256 of manifest.json, got {recorded!r}")
    if manifest_file is None:
        logger.info("%s: no generated samples, so no manifest to check the decisions against", path)
        return
    if sha256_file(manifest_file) != recorded:
        raise DatasetDMError(
            path,
            "generation_manifest",
            f"these decisions were made for another generation run than {manifest_file} (its sha256 differs); "
            "run the filter stage",
        )
