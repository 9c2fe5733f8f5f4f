"""The export stage: a filtered generated set becomes a self-describing dataset.

Reads what generation and filtering left on disk, checks it against the generation
manifest (every shard's content hash, every record's fields, every mask's labels),
and writes ``out_dir`` as one unit::

    images/<id>.png      RGB, byte-for-byte the generated image
    masks/<id>.png       VOC palette PNG, pixel value = category id
    depth/<id>.png       16-bit PNG, millimetres (card: depth_scale), if the decoder has a depth head
    annotations.json     COCO (image entries also carry prompt, seed, score; keypoints
                         per instance if the decoder has a keypoint head)
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
    min_score, samples = _apply_filter(Path(filtered_json), samples)
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
            samples.append(Sample(record, name, records_file, f"[{j}]"))
    return samples


def _apply_filter(path: Path, samples: list[Sample]) -> tuple[float | None, list[Sample]]:
    """Attach filtered.json's score and decision to every sample.

    filtered.json must cover exactly the generated samples: an unknown or missing
    sample means it was computed from a different generation run.
    """
    data = _read_json(path, "not found; run the filter stage")
    if not isinstance(data, dict):
        raise DatasetDMError(path, None, "must be a JSON object")
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
        decided[key] = Sample(s.record, s.shard, s.records_file, s.field, score, kept)
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
