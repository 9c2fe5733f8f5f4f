"""Curation in FiftyOne: browse an export, tag what should not ship, export the rest.

An exported dataset (``data/export``) is loaded into a *persistent* FiftyOne dataset,
one per export version (named from the dataset card's hash, so two versions never
overwrite each other and the app can show any of them), with

* ``ground_truth``: the COCO annotations as detections with masks (FiftyOne's COCO
  importer, RLE decoded by FiftyOne),
* ``semantic``: the VOC mask as a FiftyOne segmentation (class ids, with mask targets),
* ``depth``: the depth PNG as a FiftyOne heatmap in metres (if the export has depth),
* ``keypoints``: each instance's COCO keypoints as a FiftyOne keypoint (missing points
  NaN, as FiftyOne wants), if the export has keypoints,
* ``quality``, ``prompt``, ``seed``, ``sample_id``: from the export's image entries,
* ``decoder``: the decoder's class distribution over the pixels it calls objects, as a
  classification with logits, and ``hardness``: FiftyOne Brain's entropy of it,
* ``uniqueness``: FiftyOne Brain's uniqueness over the embeddings below,
* a similarity index (brain key ``similarity``): "sort by similarity" in the app.

The embeddings are the factory's own: the backbone's pooled UNet features of each image,
saved at generation (``embeddings.npy`` in the export). Nothing can be downloaded here,
and the model that drew the images is the one that knows what is in them; an export
without them (made by hand) falls back to 16x16 thumbnails.

Samples whose filter score is below ``curate.min_quality`` are tagged ``low_quality``;
FiftyOne Brain's near-duplicate search tags all but the first of each group
``duplicate``. The curated export in ``curate.out`` has the export's layout
(``images/``, ``masks/``, ``depth/``, ``annotations.json``, ``embeddings.npy``) without the
tagged samples, plus ``curation.json`` (counts, thresholds, the FiftyOne dataset name,
what was dropped). FiftyOne reads its database settings from its own ``FIFTYONE_*``
environment variables.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datasetdm.config import CurateConfig
from datasetdm.errors import DatasetDMError
from datasetdm.export.verify import CURATION, export_files, verify_export
from datasetdm.io import atomic_path, sha256_file, write_json
from datasetdm.realset import DEPTH_SCALE

logger = logging.getLogger(__name__)
LOW_QUALITY = "low_quality"
DUPLICATE = "duplicate"
THUMBNAIL = 16
EMBEDDINGS = "embeddings.npy"
SIMILARITY = "similarity"  # brain key of the similarity index


def dataset_name(export_dir: str | Path, prefix: str) -> str:
    """``<prefix>-<sha256 of dataset.json, 12 hex>``: one FiftyOne dataset per export version."""
    card = Path(export_dir) / "dataset.json"
    if not card.is_file():
        raise DatasetDMError(card, None, "not found; run the export stage")
    return f"{prefix}-{sha256_file(card)[:12]}"


def thumbnail_embeddings(paths: list[str]) -> np.ndarray:
    """(N, 3*16*16) float32, each row mean-centred and unit length (cosine-ready)."""
    rows = []
    for p in paths:
        with Image.open(p) as im:
            small = np.asarray(im.convert("RGB").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR), np.float32)
        v = small.ravel() / 255.0
        v = v - v.mean()
        rows.append(v / max(float(np.linalg.norm(v)), 1e-8))
    return np.stack(rows) if rows else np.zeros((0, 3 * THUMBNAIL**2), np.float32)


def model_embeddings(export_dir: str | Path, sample_ids: list[str]) -> np.ndarray | None:
    """The export's embeddings (float32) for ``sample_ids`` in that order, or None if it has none."""
    export_dir = Path(export_dir)
    file = export_dir / EMBEDDINGS
    if not file.is_file():
        return None
    images = json.loads((export_dir / "annotations.json").read_text())["images"]
    try:
        array = np.load(file, allow_pickle=False).astype(np.float32)
    except (OSError, ValueError) as e:
        raise DatasetDMError(file, None, f"not a readable .npy array ({e}); run the export stage") from None
    if array.ndim != 2 or len(array) != len(images):
        raise DatasetDMError(file, "shape", f"{array.shape} but annotations.json has {len(images)} images")
    row = {im["sample_id"]: i for i, im in enumerate(images)}
    return array[[row[s] for s in sample_ids]]


def load_export(export_dir: str | Path, name: str, overwrite: bool = True):
    """Load ``export_dir`` into the persistent FiftyOne dataset ``name`` and return it."""
    import fiftyone as fo

    export_dir = Path(export_dir).resolve()
    ann_file = export_dir / "annotations.json"
    if not ann_file.is_file():
        raise DatasetDMError(ann_file, None, "not found; run the export stage")
    coco = json.loads(ann_file.read_text())
    if name in fo.list_datasets():
        if not overwrite:
            logger.info("FiftyOne dataset %s exists: reused", name)
            return fo.load_dataset(name)
        logger.info("FiftyOne dataset %s exists: replaced by a fresh load of %s", name, export_dir)
        fo.delete_dataset(name)
    ds = fo.Dataset.from_dir(
        dataset_type=fo.types.COCODetectionDataset,
        data_path=str(export_dir),
        labels_path=str(ann_file),
        label_types=["segmentations"],
        label_field="ground_truth",
        name=name,
        progress=False,
    )
    ds.persistent = True
    classes = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    ds.default_mask_targets = {0: "background", **{i: c for i, c in enumerate(classes, start=1)}}
    ds.info = {"source": str(export_dir), "classes": classes, **coco.get("info", {})}
    ds.save()
    entries = {str(export_dir / im["file_name"]): im for im in coco["images"]}
    scale = float(coco.get("info", {}).get("depth_scale", DEPTH_SCALE))
    keypoints: dict[int, list] = {}
    for ann in coco["annotations"]:
        if "keypoints" in ann:
            keypoints.setdefault(ann["image_id"], []).append(ann)
    for sample in ds.iter_samples(autosave=True, progress=False):
        im = entries[sample.filepath]
        if im.get("depth_file"):
            with Image.open(export_dir / im["depth_file"]) as d:
                metres = np.asarray(d, dtype=np.float32) / scale
            sample["depth"] = fo.Heatmap(map=metres, range=[0.0, float(metres.max()) or 1.0])
        if im["id"] in keypoints:
            sample["keypoints"] = fo.Keypoints(
                keypoints=[_keypoint(a, classes, im["width"], im["height"]) for a in keypoints[im["id"]]]
            )
        with Image.open(export_dir / "masks" / f"{im['sample_id']}.png") as m:
            mask = np.asarray(m, dtype=np.uint8)  # palette PNG: the indices are the class ids
        sample["semantic"] = fo.Segmentation(mask=mask)
        if im.get("class_probs"):
            sample["decoder"] = _decoder_classification(im["class_probs"], classes)
        sample["quality"] = float(im["score"]) if im.get("score") is not None else None
        sample["prompt"] = im["prompt"]
        sample["seed"] = int(im["seed"])
        sample["sample_id"] = im["sample_id"]
    return ds


def _keypoint(ann: dict, classes: list[str], width: int, height: int):
    """A COCO keypoint annotation as a FiftyOne Keypoint (relative coordinates, NaN where v = 0)."""
    import fiftyone as fo

    kps = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
    points = [(x / width, y / height) if v > 0 else (float("nan"), float("nan")) for x, y, v in kps]
    return fo.Keypoint(label=classes[ann["category_id"] - 1], points=points)


def _decoder_classification(probs: list[float], classes: list[str]):
    """The decoder's object-pixel class distribution as a FiftyOne classification with logits.

    Label: the most probable object class; logits: log-probabilities over background and
    the classes, whose softmax is the distribution again, so FiftyOne's hardness (the
    entropy of that softmax) is the entropy of what the decoder said.
    """
    import fiftyone as fo

    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-6, 1.0)
    return fo.Classification(
        label=classes[int(np.argmax(p[1:]))], confidence=float(p[1:].max()), logits=np.log(p / p.sum())
    )


def tag_samples(ds, cfg: CurateConfig, embeddings: np.ndarray | None = None) -> dict[str, int]:
    """Index, score and tag: similarity, uniqueness, hardness; low-quality and duplicate tags.

    ``embeddings``: one row per sample in ``sample_id`` order (``model_embeddings``); the
    16x16 thumbnails when None.
    """
    import fiftyone.brain as fob
    from fiftyone import ViewField as F

    ds.untag_samples([LOW_QUALITY, DUPLICATE])
    if len(ds) == 0:
        return {LOW_QUALITY: 0, DUPLICATE: 0}
    ds = ds.sort_by("sample_id")
    if embeddings is None:
        logger.info("the export has no %s: similarity from 16x16 thumbnails", EMBEDDINGS)
        embeddings = thumbnail_embeddings(ds.values("filepath"))
    if ds.has_field("decoder"):
        fob.compute_hardness(ds, "decoder", progress=False)
    if len(ds) > 1:
        fob.compute_similarity(
            ds, embeddings=embeddings, brain_key=SIMILARITY, backend="sklearn", metric="cosine", progress=False
        )
        fob.compute_uniqueness(ds, embeddings=embeddings, progress=False)
        index = fob.compute_near_duplicates(
            ds, embeddings=embeddings, threshold=cfg.duplicate_threshold, progress=False
        )
        duplicate_ids = list(index.duplicate_ids)
    else:
        ds.set_values("uniqueness", [1.0])
        duplicate_ids = []
    ds.select(duplicate_ids).tag_samples(DUPLICATE)
    ds.match(F("quality") < cfg.min_quality).tag_samples(LOW_QUALITY)
    counts = ds.count_sample_tags()
    logger.info(
        "tagged %d of %d samples %s (quality < %g) and %d %s (cosine distance < %g)",
        counts.get(LOW_QUALITY, 0),
        len(ds),
        LOW_QUALITY,
        cfg.min_quality,
        counts.get(DUPLICATE, 0),
        DUPLICATE,
        cfg.duplicate_threshold,
    )
    return counts


def write_curated(ds, export_dir: str | Path, out_dir: str | Path, cfg: CurateConfig) -> dict[str, Any]:
    """Write the untagged samples of ``ds`` in the export's layout; return the summary."""
    export_dir = Path(export_dir)
    coco = json.loads((export_dir / "annotations.json").read_text())
    tagged = ds.match_tags([LOW_QUALITY, DUPLICATE])
    dropped = {sid: tags for sid, tags in zip(tagged.values("sample_id"), tagged.values("tags"))}
    keep_images = [im for im in coco["images"] if im["sample_id"] not in dropped]
    keep_ids = {im["id"] for im in keep_images}
    summary = {
        "fiftyone_dataset": ds.name,
        "source": str(export_dir),
        "thresholds": {"min_quality": cfg.min_quality, "duplicate_threshold": cfg.duplicate_threshold},
        "counts": {
            "exported": len(coco["images"]),
            "curated": len(keep_images),
            LOW_QUALITY: sum(LOW_QUALITY in t for t in dropped.values()),
            DUPLICATE: sum(DUPLICATE in t for t in dropped.values()),
        },
        "dropped": {sid: sorted(t) for sid, t in sorted(dropped.items())},
    }
    with atomic_path(out_dir) as tmp:
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks").mkdir()
        for im in keep_images:
            shutil.copyfile(export_dir / im["file_name"], tmp / im["file_name"])
            mask = f"masks/{im['sample_id']}.png"
            shutil.copyfile(export_dir / mask, tmp / mask)
            if im.get("depth_file"):
                (tmp / "depth").mkdir(exist_ok=True)
                shutil.copyfile(export_dir / im["depth_file"], tmp / im["depth_file"])
        write_json(
            tmp / "annotations.json",
            {
                **coco,
                "images": keep_images,
                "annotations": [a for a in coco["annotations"] if a["image_id"] in keep_ids],
            },
        )
        if (export_dir / EMBEDDINGS).is_file():
            np.save(
                tmp / EMBEDDINGS,
                model_embeddings(export_dir, [im["sample_id"] for im in keep_images]).astype(np.float16),
            )
        summary["files"] = export_files(tmp, record_file=CURATION)
        write_json(tmp / CURATION, summary)
    return summary


def curate(export_dir: str | Path, cfg: CurateConfig) -> dict[str, Any]:
    """Load, tag and write the curated export; the stage function."""
    verify_export(export_dir)
    ds = load_export(export_dir, dataset_name(export_dir, cfg.dataset_prefix))
    tag_samples(ds, cfg, model_embeddings(export_dir, ds.sort_by("sample_id").values("sample_id")))
    return write_curated(ds, export_dir, cfg.out, cfg)
