"""Labelled "real" image sets in COCO layout: the K-shot training set and the test set.

DatasetDM trains its perception decoder on a handful of labelled images and scores it
on a held-out set. Here both are rendered from the shapes world, but users may bring
their own labelled set instead, so the layout is plain COCO that other tools read::

    <set>/annotations.json   COCO: images, categories, annotations (RLE, keypoints)
    <set>/images/000000.png  RGB
    <set>/masks/000000.png   semantic mask, VOC-style palette PNG (for people and tools)
    <set>/depth/000000.png   16-bit greyscale, millimetres (``info.depth_scale``)

The reader is therefore a boundary: every problem in a set is raised once as a
one-line ``DatasetDMError`` naming the file and the field, never as a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from datasetdm.config import WorldConfig
from datasetdm.errors import DatasetDMError
from datasetdm.export.voc import voc_palette
from datasetdm.io import atomic_path
from datasetdm.worlds.shapes import KEYPOINT_NAMES, render_scene

logger = logging.getLogger(__name__)

DEPTH_SCALE = 1000  # depth PNGs are uint16 millimetres; also recorded as info.depth_scale
ANNOTATIONS = "annotations.json"
# COCO's compressed RLE alphabet. pycocotools reads outside it without bounds checks
# (a non-ASCII character corrupts the heap), so strings are checked before decoding.
_RLE_ALPHABET = frozenset(chr(c) for c in range(48, 112))
# How far a user's derived fields may stray from what the masks say. Boxes drawn by
# tools and polygon rasterisation disagree by a pixel or so; more is a labelling error.
BBOX_IMAGE_TOLERANCE = 1.0  # px a bbox may reach past the image border
BBOX_MASK_TOLERANCE = 2.0  # px any bbox edge may sit from the mask's own box
AREA_TOLERANCE = 0.05  # relative difference allowed between area and the mask's pixel count ...
AREA_MIN_TOLERANCE = 2.0  # ... or this many pixels, whichever is larger (small objects)


def depth_to_png(metres: np.ndarray) -> np.ndarray:
    """Metres -> uint16 depth-PNG units (``DEPTH_SCALE`` per metre), rounded and clipped to 16 bits.

    The real sets and the generated samples both store depth this way.
    """
    return np.clip(np.round(np.asarray(metres, dtype=np.float64) * DEPTH_SCALE), 0, 65535).astype(np.uint16)


@dataclass
class LabelledImage:
    """One labelled image, as the decoder's training and evaluation code consume it."""

    id: int
    file_name: str  # relative to the set dir, e.g. "images/000000.png"
    image: np.ndarray  # uint8 (H, W, 3)
    caption: str
    semantic: np.ndarray  # uint8 (H, W): 0 background, 1 + classes.index(name)
    instance_masks: np.ndarray  # bool (N, H, W)
    instance_classes: list[str]  # category name per instance
    depth: np.ndarray | None  # float32 metres (H, W), None if the set has no depth
    keypoints: list[np.ndarray]  # per instance (K, 3) float32 x, y, v (COCO visibility)


def real_set_split_dirs(real_dir: str | Path) -> tuple[Path, Path]:
    """The (train, test) set directories under ``real.dir``; one place decides the names."""
    real_dir = Path(real_dir)
    return real_dir / "train", real_dir / "test"


# ---------------------------------------------------------------------------- writing


def write_real_set(world: WorldConfig, out_dir: str | Path, num: int, seed: int) -> None:
    """Render ``num`` scenes (seeds ``seed .. seed+num-1``) and write them as one COCO set.

    The whole directory is built beside ``out_dir`` and renamed over it at the end, so a
    crash leaves the previous set (or nothing) in place, never a half-written one.
    Instances that are fully occluded have no pixels to annotate and are left out of
    ``annotations``; the caption still names them, because it describes the scene.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    categories = [
        {
            "id": 1 + k,
            "name": name,
            "supercategory": "shape",
            "keypoints": list(KEYPOINT_NAMES[name]),
            # Star-shaped: every keypoint hangs off the centre (1-based, as COCO wants).
            "skeleton": [[1, j] for j in range(2, len(KEYPOINT_NAMES[name]) + 1)],
        }
        for k, name in enumerate(world.classes)
    ]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    occluded = 0
    palette = voc_palette()
    with atomic_path(out_dir) as tmp:
        for sub in ("images", "masks", "depth"):
            (tmp / sub).mkdir(parents=True)
        for i in range(num):
            scene = render_scene(world, seed + i)
            name = f"{i:06d}.png"
            height, width = scene.semantic.shape
            # Files go straight into the temporary directory: its rename is the atomic step.
            Image.fromarray(scene.image).save(tmp / "images" / name)
            mask = Image.frombytes("P", (width, height), np.ascontiguousarray(scene.semantic).tobytes())
            mask.putpalette(palette)
            mask.save(tmp / "masks" / name)
            Image.frombytes("I;16", (width, height), depth_to_png(scene.depth).astype("<u2").tobytes()).save(
                tmp / "depth" / name
            )
            images.append(
                {
                    "id": i,
                    "file_name": f"images/{name}",
                    "width": width,
                    "height": height,
                    "caption": scene.caption,
                    "depth_file": f"depth/{name}",
                }
            )
            for obj, visible, kps in zip(scene.objects, scene.instances, scene.keypoints):
                if not visible.any():
                    occluded += 1
                    continue
                rle = mask_util.encode(np.asfortranarray(visible.astype(np.uint8)))
                annotations.append(
                    {
                        "id": len(annotations) + 1,  # COCOeval treats id 0 as "unmatched"
                        "image_id": i,
                        "category_id": 1 + world.classes.index(obj.shape),
                        "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                        "area": float(mask_util.area(rle)),
                        "bbox": [float(v) for v in mask_util.toBbox(rle)],
                        "iscrowd": 0,
                        "keypoints": [float(v) for v in kps.reshape(-1)],
                        "num_keypoints": int((kps[:, 2] > 0).sum()),
                        "depth": float(obj.depth),
                    }
                )
        if occluded:
            logger.info("%s: %d fully occluded instances left out of the annotations", out_dir, occluded)
        coco = {
            "info": {
                "description": "datasetdm labelled set rendered from the shapes world",
                "depth_scale": DEPTH_SCALE,
                "world": dataclasses.asdict(world),
                "seed": seed,
                "num_images": num,
            },
            "images": images,
            "categories": categories,
            "annotations": annotations,
        }
        (tmp / ANNOTATIONS).write_text(json.dumps(coco, indent=1) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------- reading


def load_real_set(set_dir: str | Path, classes: tuple[str, ...]) -> list[LabelledImage]:
    """Read and validate a COCO-layout labelled set; raise ``DatasetDMError`` on any problem.

    ``classes`` fixes the semantic ids (``1 + classes.index(name)``), whatever category
    ids the file uses, so a user's set lines up with the world the decoder was built
    for. Semantic masks are composed from the instance masks in annotation order (later
    instances win where they overlap). ``iscrowd`` is not interpreted. ``bbox``, ``area``
    and ``num_keypoints`` are optional, but where given must agree with the image, the
    masks and the keypoints (see the tolerances above); image files, image ids and
    annotation ids must each be unique.
    """
    set_dir = Path(set_dir)
    if not set_dir.is_dir():
        raise DatasetDMError(set_dir, None, "labelled set directory not found")
    src = set_dir / ANNOTATIONS
    coco = _read_json(src)
    images, categories, annotations = _check_structure(src, coco)
    _check_unique_file_names(src, images)
    cat_by_id = _check_categories(src, categories, classes)
    anns_by_image = _check_references(src, annotations, images, cat_by_id)

    pixels = [_read_image(src, set_dir, i, entry) for i, entry in enumerate(images)]
    for i, entry in enumerate(images):
        if "caption" not in entry:
            raise DatasetDMError(src, f"images[{i}].caption", "missing (every image needs its caption)")
        if not isinstance(entry["caption"], str):
            raise DatasetDMError(
                src, f"images[{i}].caption", f"must be a string, got {type(entry['caption']).__name__}"
            )
    masks: dict[int, np.ndarray] = {}
    for i, entry in enumerate(images):
        height, width = pixels[i].shape[:2]
        for j in anns_by_image[entry["id"]]:
            masks[j] = _decode_segmentation(
                src, f"annotations[{j}].segmentation", annotations[j]["segmentation"], height=height, width=width
            )
    for i, entry in enumerate(images):
        height, width = pixels[i].shape[:2]
        for key, actual in (("width", width), ("height", height)):
            if entry[key] != actual:
                raise DatasetDMError(
                    src, f"images[{i}].{key}", f"is {entry[key]} but {entry['file_name']} is {width}x{height} (WxH)"
                )
    if not images:
        raise DatasetDMError(src, "images", "empty: the set has no images")
    for i, entry in enumerate(images):
        height, width = pixels[i].shape[:2]
        for j in anns_by_image[entry["id"]]:
            _check_annotation_agrees(src, j, annotations[j], masks[j], width=width, height=height)

    depth_scale = _depth_scale(src, coco)
    out = []
    for i, entry in enumerate(images):
        height, width = pixels[i].shape[:2]
        ids = anns_by_image[entry["id"]]
        inst = np.stack([masks[j] for j in ids]) if ids else np.zeros((0, height, width), dtype=bool)
        names = [cat_by_id[annotations[j]["category_id"]]["name"] for j in ids]
        semantic = np.zeros((height, width), dtype=np.uint8)
        for mask, name in zip(inst, names):
            semantic[mask] = 1 + classes.index(name)
        out.append(
            LabelledImage(
                id=entry["id"],
                file_name=entry["file_name"],
                image=pixels[i],
                caption=entry["caption"],
                semantic=semantic,
                instance_masks=inst,
                instance_classes=names,
                depth=_read_depth(src, set_dir, i, entry, height=height, width=width, scale=depth_scale),
                keypoints=[_keypoints(annotations[j], cat_by_id[annotations[j]["category_id"]]) for j in ids],
            )
        )
    return out


def _read_json(src: Path) -> Any:
    if not src.is_file():
        raise DatasetDMError(src, None, "file not found")
    try:
        return json.loads(src.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DatasetDMError(src, None, "not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DatasetDMError(src, f"line {e.lineno}", f"not valid JSON ({e.msg}, column {e.colno})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _entries_with_unique_ids(
    src: Path, coco: dict[str, Any], section: str, noun: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``section[i]``, entry) for each entry of a COCO list, checking it is an object with a new integer id."""
    seen: set[int] = set()
    for i, entry in enumerate(coco[section]):
        where = f"{section}[{i}]"
        if not isinstance(entry, dict):
            raise DatasetDMError(src, where, f"must be an object, got {type(entry).__name__}")
        entry_id = _require(src, entry, "id", where, check=_is_int, what="an integer")
        if entry_id in seen:
            raise DatasetDMError(src, f"{where}.id", f"duplicate {noun} id {entry_id}")
        seen.add(entry_id)
        yield where, entry


def _require(src: Path, obj: dict[str, Any], key: str, where: str, *, check: Any, what: str) -> Any:
    if key not in obj:
        raise DatasetDMError(src, f"{where}.{key}", "missing")
    if not check(obj[key]):
        raise DatasetDMError(src, f"{where}.{key}", f"must be {what}, got {obj[key]!r}")
    return obj[key]


def _check_structure(src: Path, coco: Any) -> tuple[list[dict], list[dict], list[dict]]:
    """Check that the file is a COCO dict whose entries have the fields we rely on."""
    if not isinstance(coco, dict):
        raise DatasetDMError(
            src,
            "(top level)",
            f"must be a COCO object with images, annotations and categories, got a JSON {type(coco).__name__}",
        )
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise DatasetDMError(src, key, "missing (a COCO file needs images, annotations and categories)")
        if not isinstance(coco[key], list):
            raise DatasetDMError(src, key, f"must be a list, got {type(coco[key]).__name__}")
    positive = lambda v: _is_int(v) and v > 0  # noqa: E731
    non_empty_str = lambda v: isinstance(v, str) and bool(v)  # noqa: E731
    for where, entry in _entries_with_unique_ids(src, coco, "images", "image"):
        _require(src, entry, "file_name", where, check=non_empty_str, what="a non-empty string")
        _require(src, entry, "width", where, check=positive, what="a positive integer")
        _require(src, entry, "height", where, check=positive, what="a positive integer")
    for where, cat in _entries_with_unique_ids(src, coco, "categories", "category"):
        _require(src, cat, "name", where, check=non_empty_str, what="a non-empty string")
        if "keypoints" in cat:
            _require(
                src,
                cat,
                "keypoints",
                where,
                check=lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
                what="a list of names",
            )
    for where, ann in _entries_with_unique_ids(src, coco, "annotations", "annotation"):
        _require(src, ann, "image_id", where, check=_is_int, what="an integer")
        _require(src, ann, "category_id", where, check=_is_int, what="an integer")
        _require(
            src,
            ann,
            "segmentation",
            where,
            check=lambda v: isinstance(v, (dict, list)),
            what="an RLE object or a list of polygons",
        )
        if "keypoints" in ann:
            _require(
                src,
                ann,
                "keypoints",
                where,
                check=lambda v: isinstance(v, list) and len(v) % 3 == 0 and all(map(_is_number, v)),
                what="a flat list of numbers x, y, v",
            )
        _check_optional_geometry(src, ann, where)
    return coco["images"], coco["categories"], coco["annotations"]


def _check_optional_geometry(src: Path, ann: dict[str, Any], where: str) -> None:
    """Type-check ``bbox``, ``area`` and ``num_keypoints`` where given.

    The loader reads the masks and keypoints, not these, so they may be absent; where
    given, ``_check_annotation_agrees`` holds them to the masks and keypoints.
    """
    if "bbox" in ann:
        _require(
            src,
            ann,
            "bbox",
            where,
            check=lambda v: (
                isinstance(v, list) and len(v) == 4 and all(map(_is_number, v)) and v[2] >= 0 and v[3] >= 0
            ),
            what="[x, y, width, height] numbers with width, height >= 0",
        )
    if "area" in ann:
        _require(src, ann, "area", where, check=lambda v: _is_number(v) and v >= 0, what="a number >= 0")
    if "num_keypoints" in ann:
        _require(src, ann, "num_keypoints", where, check=lambda v: _is_int(v) and v >= 0, what="an integer >= 0")


def _check_unique_file_names(src: Path, images: list[dict]) -> None:
    """Two image entries naming one file would train on the same pixels twice under two sets of labels."""
    seen: dict[str, int] = {}
    for i, entry in enumerate(images):
        name = posixpath.normpath(entry["file_name"])  # "images/./a.png" is "images/a.png"
        if name in seen:
            raise DatasetDMError(
                src, f"images[{i}].file_name", f"{entry['file_name']} is also the file of images[{seen[name]}]"
            )
        seen[name] = i


def _check_categories(src: Path, categories: list[dict], classes: tuple[str, ...]) -> dict[int, dict]:
    for i, cat in enumerate(categories):
        if cat["name"] not in classes:
            raise DatasetDMError(
                src, f"categories[{i}].name", f"unknown category {cat['name']!r} (known: {', '.join(classes)})"
            )
    return {cat["id"]: cat for cat in categories}


def _check_references(
    src: Path, annotations: list[dict], images: list[dict], cat_by_id: dict[int, dict]
) -> dict[int, list[int]]:
    """Check every annotation points at a real category and image; group them by image."""
    by_image: dict[int, list[int]] = {entry["id"]: [] for entry in images}
    for j, ann in enumerate(annotations):
        cat = cat_by_id.get(ann["category_id"])
        if cat is None:
            raise DatasetDMError(src, f"annotations[{j}].category_id", f"unknown category id {ann['category_id']}")
        if ann["image_id"] not in by_image:
            raise DatasetDMError(src, f"annotations[{j}].image_id", f"unknown image id {ann['image_id']}")
        if "keypoints" in ann and "keypoints" in cat and len(ann["keypoints"]) != 3 * len(cat["keypoints"]):
            raise DatasetDMError(
                src,
                _ann_field(j, ann, "keypoints"),
                f"has {len(ann['keypoints']) // 3} points "
                f"but category {cat['name']!r} declares {len(cat['keypoints'])}",
            )
        by_image[ann["image_id"]].append(j)
    return by_image


def _ann_field(j: int, ann: dict[str, Any], key: str) -> str:
    """``annotations[j] (id N).key``: the index finds the entry in the file, the id in other tools."""
    return f"annotations[{j}] (id {ann['id']}).{key}"


def _fmt(values: Any) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def _check_annotation_agrees(
    src: Path, j: int, ann: dict[str, Any], mask: np.ndarray, *, width: int, height: int
) -> None:
    """Check an annotation's derived fields against its image and its own mask and keypoints.

    A set whose boxes or areas disagree with its masks was edited by hand or converted
    badly; training on it would teach the decoder whichever of the two the code reads,
    and COCOeval would score against the other. ``mask`` is bool (H, W) of the image.
    """
    if "bbox" in ann:
        _check_bbox(src, j, ann, mask, width=width, height=height)
    if "area" in ann:
        _check_area(src, j, ann, int(mask.sum()))
    if "num_keypoints" in ann:
        labelled = int((np.asarray(ann.get("keypoints", []), dtype=np.float64)[2::3] > 0).sum())
        if ann["num_keypoints"] != labelled:
            raise DatasetDMError(
                src,
                _ann_field(j, ann, "num_keypoints"),
                f"is {ann['num_keypoints']} but keypoints label {labelled} points (v > 0)",
            )


def _check_bbox(src: Path, j: int, ann: dict[str, Any], mask: np.ndarray, *, width: int, height: int) -> None:
    """The box lies in the image (``BBOX_IMAGE_TOLERANCE``) and on the mask's own box (``BBOX_MASK_TOLERANCE``)."""
    x, y, w, h = (float(v) for v in ann["bbox"])
    tol = BBOX_IMAGE_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise DatasetDMError(
            src, _ann_field(j, ann, "bbox"), f"{_fmt(ann['bbox'])} extends past the image ({width}x{height}, WxH)"
        )
    ys, xs = np.nonzero(mask)
    if not len(xs):  # a polygon too thin to cover a pixel has no box of its own to compare with
        return
    own = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))  # x0, y0, x1, y1
    if max(abs(a - b) for a, b in zip((x, y, x + w, y + h), own)) > BBOX_MASK_TOLERANCE:
        raise DatasetDMError(
            src,
            _ann_field(j, ann, "bbox"),
            f"{_fmt(ann['bbox'])} differs from the segmentation's own box "
            f"{_fmt((own[0], own[1], own[2] - own[0], own[3] - own[1]))} by more than {BBOX_MASK_TOLERANCE:g} px",
        )


def _check_area(src: Path, j: int, ann: dict[str, Any], pixels: int) -> None:
    """``area`` is the mask's pixel count, within ``AREA_TOLERANCE`` (relative) or ``AREA_MIN_TOLERANCE`` px.

    COCO's own files store exactly the mask's pixel count (pycocotools' ``area``); the
    tolerance is for converters that measure the polygon outline instead.
    """
    allowed = max(AREA_MIN_TOLERANCE, AREA_TOLERANCE * pixels)
    if abs(ann["area"] - pixels) > allowed:
        raise DatasetDMError(
            src,
            _ann_field(j, ann, "area"),
            f"{ann['area']:g} differs from the segmentation's {pixels} pixels "
            f"by more than {AREA_TOLERANCE:.0%} or {AREA_MIN_TOLERANCE:g} px",
        )


def _read_image(src: Path, set_dir: Path, i: int, entry: dict[str, Any]) -> np.ndarray:
    field = f"images[{i}].file_name"
    path = set_dir / entry["file_name"]
    if not path.is_file():
        raise DatasetDMError(src, field, f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            try:
                rgb = im.convert("RGB")
            except (OSError, ValueError) as e:
                raise DatasetDMError(
                    src, field, f"{entry['file_name']} (mode {mode}) cannot be converted to RGB ({e})"
                ) from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise DatasetDMError(src, field, f"{entry['file_name']} is not a readable image ({e})") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def _decode_segmentation(src: Path, field: str, seg: Any, *, height: int, width: int) -> np.ndarray:
    """Decode an RLE (compressed or not) or polygon segmentation to a bool (H, W) mask."""
    if isinstance(seg, list):
        if not seg or not all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(_is_number, p)) for p in seg
        ):
            raise DatasetDMError(
                src, field, "polygons must be a non-empty list of [x1, y1, x2, y2, ...] lists with at least 3 points"
            )
        return mask_util.decode(mask_util.merge(mask_util.frPyObjects(seg, height, width))).astype(bool)
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(s) and s >= 0 for s in size)):
        raise DatasetDMError(src, field, f"RLE size must be [height, width], got {size!r}")
    if size != [height, width]:
        raise DatasetDMError(
            src, field, f"mask size {size[0]}x{size[1]} differs from image size {height}x{width} (HxW)"
        )
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
            raise DatasetDMError(
                src, field, f"uncompressed RLE counts must be non-negative integers summing to {height * width}"
            )
        rle = mask_util.frPyObjects({"size": size, "counts": counts}, height, width)
    elif isinstance(counts, str):
        if not set(counts) <= _RLE_ALPHABET:
            raise DatasetDMError(src, field, "RLE counts contain characters outside COCO's RLE alphabet")
        rle = {"size": size, "counts": counts.encode("ascii")}
    else:
        raise DatasetDMError(
            src, field, f"RLE counts must be a string or a list of integers, got {type(counts).__name__}"
        )
    try:
        mask = mask_util.decode(rle)
    except ValueError as e:
        raise DatasetDMError(src, field, f"invalid RLE ({e})") from None
    # pycocotools leaves pixels past a too-short RLE uninitialised: catch that here.
    if mask.max(initial=0) > 1 or int(mask.sum()) != int(mask_util.area(rle)):
        raise DatasetDMError(src, field, f"invalid RLE (counts do not cover {height}x{width} pixels)")
    return mask.astype(bool)


def _depth_scale(src: Path, coco: dict[str, Any]) -> float:
    info = coco.get("info", {})
    if not isinstance(info, dict):
        raise DatasetDMError(src, "info", f"must be an object, got {type(info).__name__}")
    scale = info.get("depth_scale", DEPTH_SCALE)
    if not _is_number(scale) or scale <= 0:
        raise DatasetDMError(src, "info.depth_scale", f"must be a positive number, got {scale!r}")
    return float(scale)


def _read_depth(
    src: Path, set_dir: Path, i: int, entry: dict[str, Any], *, height: int, width: int, scale: float
) -> np.ndarray | None:
    if entry.get("depth_file") is None:
        return None
    field = f"images[{i}].depth_file"
    if not isinstance(entry["depth_file"], str) or not entry["depth_file"]:
        raise DatasetDMError(src, field, f"must be a non-empty string, got {entry['depth_file']!r}")
    path = set_dir / entry["depth_file"]
    if not path.is_file():
        raise DatasetDMError(src, field, f"depth file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            mode, size, raw = im.mode, im.size, np.asarray(im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetDMError(src, field, f"{entry['depth_file']} is not a readable image ({e})") from None
    # Older Pillows open 16-bit greyscale PNGs as "I". 8-bit depth is refused on purpose.
    if mode not in ("I;16", "I;16B", "I"):
        raise DatasetDMError(src, field, f"{entry['depth_file']} must be a 16-bit greyscale PNG, got mode {mode}")
    if size != (width, height):
        raise DatasetDMError(
            src, field, f"depth size {size[0]}x{size[1]} differs from image size {width}x{height} (WxH)"
        )
    return (raw.astype(np.float32) / np.float32(scale)).astype(np.float32)


def _keypoints(ann: dict[str, Any], cat: dict[str, Any]) -> np.ndarray:
    """(K, 3) float32; an annotation without keypoints gets all-unlabelled (v=0) points."""
    if "keypoints" in ann:
        return np.asarray(ann["keypoints"], dtype=np.float32).reshape(-1, 3)
    return np.zeros((len(cat.get("keypoints", [])), 3), dtype=np.float32)
