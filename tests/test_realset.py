"""Labelled sets: what is written reads back exactly; what is malformed fails in one line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image
from pycocotools.coco import COCO

import datasetdm.realset as realset
from datasetdm.config import WorldConfig
from datasetdm.errors import DatasetDMError
from datasetdm.io import sha256_dir
from datasetdm.realset import load_real_set, real_set_split_dirs, write_real_set
from datasetdm.worlds.shapes import render_scene

WORLD = WorldConfig(image_size=32)
SEED = 7
NUM = 4


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One set written once; tests that alter it work on a copy."""
    out = tmp_path_factory.mktemp("real") / "train"
    write_real_set(WORLD, out, num=NUM, seed=SEED)
    return out


@pytest.fixture
def set_copy(written: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(written, tmp_path / "train"))


def test_round_trip_equals_rendered_scenes(written: Path) -> None:
    loaded = load_real_set(written, WORLD.classes)
    assert len(loaded) == NUM
    for i, item in enumerate(loaded):
        scene = render_scene(WORLD, SEED + i)
        keep = [k for k, m in enumerate(scene.instances) if m.any()]
        assert item.id == i and item.file_name == f"images/{i:06d}.png"
        assert item.caption == scene.caption
        assert np.array_equal(item.image, scene.image)
        assert np.array_equal(item.semantic, scene.semantic)
        assert np.array_equal(item.instance_masks, scene.instances[keep])
        assert item.instance_classes == [scene.objects[k].shape for k in keep]
        assert item.depth is not None and item.depth.dtype == np.float32
        assert np.abs(item.depth - scene.depth).max() <= 0.001
        assert len(item.keypoints) == len(keep)
        for kps, k in zip(item.keypoints, keep):
            assert kps.dtype == np.float32 and np.array_equal(kps, scene.keypoints[k])


def test_pycocotools_reads_the_annotations(written: Path) -> None:
    coco = COCO(str(written / "annotations.json"))
    loaded = load_real_set(written, WORLD.classes)
    for item in loaded:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[item.id]))
        assert len(anns) == len(item.instance_masks)
        for ann, mask, name in zip(anns, item.instance_masks, item.instance_classes):
            assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
            assert coco.loadCats(ann["category_id"])[0]["name"] == name
            assert ann["area"] == mask.sum() and ann["num_keypoints"] == int(
                (np.array(ann["keypoints"][2::3]) > 0).sum()
            )
    cat = coco.loadCats(coco.getCatIds(catNms=["star"]))[0]
    assert cat["keypoints"][0] == "centre" and cat["skeleton"] == [[1, k] for k in range(2, 7)]
    info = json.loads((written / "annotations.json").read_text())["info"]
    assert info["depth_scale"] == 1000 and info["world"]["image_size"] == 32


def test_mask_and_depth_pngs(written: Path) -> None:
    scene = render_scene(WORLD, SEED)
    with Image.open(written / "masks" / "000000.png") as mask:
        assert mask.mode == "P"
        palette = mask.getpalette()
        assert palette[:3] == [0, 0, 0] and palette[3:6] == [128, 0, 0] and palette[765:768] == [224, 224, 192]
        assert np.array_equal(np.asarray(mask), scene.semantic)
    with Image.open(written / "depth" / "000000.png") as depth:
        assert depth.mode == "I;16"
        assert np.array_equal(np.asarray(depth), np.round(scene.depth.astype(np.float64) * 1000).astype(np.uint16))


def test_fully_occluded_instance_is_left_out(tmp_path: Path) -> None:
    # Big objects and many of them: seed 3 hides one completely.
    world = WorldConfig(image_size=32, max_objects=6, min_size=0.4, max_size=0.5)
    scene = render_scene(world, 3)
    hidden = [k for k, m in enumerate(scene.instances) if not m.any()]
    assert hidden
    write_real_set(world, tmp_path / "s", num=1, seed=3)
    (item,) = load_real_set(tmp_path / "s", world.classes)
    assert len(item.instance_masks) == len(scene.objects) - len(hidden)
    assert item.caption == scene.caption  # still names the hidden object


def test_other_segmentation_encodings_and_no_depth(set_copy: Path) -> None:
    ann_path = set_copy / "annotations.json"
    coco = json.loads(ann_path.read_text())
    del coco["info"]
    for entry in coco["images"]:
        del entry["depth_file"]
    first = [a for a in coco["annotations"] if a["image_id"] == 0]
    # Uncompressed RLE is column-major: 10 background pixels, then 5 foreground.
    first[0]["segmentation"] = {"size": [32, 32], "counts": [10, 5, 32 * 32 - 15]}
    for key in ("keypoints", "num_keypoints", "bbox", "area"):  # all optional
        first[0].pop(key)
    assert len(first) >= 2  # seed 7's first scene has three objects
    first[1]["segmentation"] = [[4, 4, 12, 4, 12, 12, 4, 12]]
    first[1].update(bbox=[4, 4, 8, 8], area=64)
    ann_path.write_text(json.dumps(coco))
    item = load_real_set(set_copy, WORLD.classes)[0]
    assert item.depth is None
    expected = np.zeros((32, 32), dtype=bool)
    expected[10:15, 0] = True
    assert np.array_equal(item.instance_masks[0], expected)
    assert not item.keypoints[0][:, 2].any()  # no keypoints given: all unlabelled
    square = item.instance_masks[1]
    assert square[5:12, 5:12].all() and square.sum() < 100 and not square[:3].any()


def test_categories_map_by_name_not_id(set_copy: Path) -> None:
    ann_path = set_copy / "annotations.json"
    coco = json.loads(ann_path.read_text())
    for cat in coco["categories"]:
        cat["id"] += 100
    for ann in coco["annotations"]:
        ann["category_id"] += 100
    ann_path.write_text(json.dumps(coco))
    reordered = tuple(reversed(WORLD.classes))
    for item in load_real_set(set_copy, reordered):
        expected = np.zeros_like(item.semantic)
        for mask, name in zip(item.instance_masks, item.instance_classes):
            expected[mask] = 1 + reordered.index(name)
        assert np.array_equal(item.semantic, expected)


def test_short_compressed_rle_never_yields_garbage(set_copy: Path) -> None:
    # pycocotools leaves the pixels past a too-short RLE uninitialised; the loader must
    # either reject the mask or (if that memory happens to be zero) read zero padding.
    ann_path = set_copy / "annotations.json"
    coco = json.loads(ann_path.read_text())
    short = mask_util.encode(np.asfortranarray(np.ones((16, 16), dtype=np.uint8)))["counts"].decode("ascii")
    coco["annotations"][0]["segmentation"] = {"size": [32, 32], "counts": short}
    del coco["annotations"][0]["bbox"], coco["annotations"][0]["area"]  # this test is about the RLE alone
    ann_path.write_text(json.dumps(coco))
    try:
        item = load_real_set(set_copy, WORLD.classes)[0]
    except DatasetDMError as e:
        assert e.field == "annotations[0].segmentation" and "invalid RLE" in e.message
    else:
        expected = np.zeros(32 * 32, dtype=bool)
        expected[:256] = True
        assert np.array_equal(item.instance_masks[0], expected.reshape(32, 32, order="F"))


def test_split_dirs() -> None:
    assert real_set_split_dirs("data/real") == (Path("data/real/train"), Path("data/real/test"))


def test_failed_write_leaves_previous_set_intact(
    written: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = Path(shutil.copytree(written, tmp_path / "real" / "train"))
    before = sha256_dir(out)
    calls = []

    def render_then_fail(world: WorldConfig, seed: int) -> Any:
        calls.append(seed)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return render_scene(world, seed)

    monkeypatch.setattr(realset, "render_scene", render_then_fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_real_set(WORLD, out, num=NUM, seed=123)
    assert sha256_dir(out) == before
    assert [p.name for p in out.parent.iterdir()] == ["train"]  # no temporary left behind


def test_write_replaces_existing_set(written: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(written, tmp_path / "train"))
    write_real_set(WORLD, out, num=2, seed=500)
    loaded = load_real_set(out, WORLD.classes)
    assert len(loaded) == 2 and loaded[0].caption == render_scene(WORLD, 500).caption
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]


# --------------------------------------------------------------------- malformed sets


def _edit(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(set_dir: Path) -> None:
        path = set_dir / "annotations.json"
        coco = json.loads(path.read_text())
        change(coco)
        path.write_text(json.dumps(coco, indent=1))

    return apply


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda set_dir: (set_dir / name).write_bytes(data)


def _small_rle(coco: dict[str, Any]) -> None:
    rle = mask_util.encode(np.asfortranarray(np.ones((16, 16), dtype=np.uint8)))
    coco["annotations"][0]["segmentation"] = {"size": [16, 16], "counts": rle["counts"].decode("ascii")}


def _long_rle(coco: dict[str, Any]) -> None:
    """Counts of a 64x64 mask under a 32x32 size: more pixels than the mask holds."""
    rle = mask_util.encode(np.asfortranarray(np.ones((64, 64), dtype=np.uint8)))
    coco["annotations"][0]["segmentation"] = {"size": [32, 32], "counts": rle["counts"].decode("ascii")}


def _small_depth(set_dir: Path) -> None:
    Image.frombytes("I;16", (16, 16), np.zeros((16, 16), "<u2").tobytes()).save(set_dir / "depth" / "000000.png")


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set coco[a][i][b] for path "a.i.b"."""
    *parents, last = path.split(".")

    def change(coco: dict[str, Any]) -> None:
        obj: Any = coco
        for p in parents:
            obj = obj[int(p)] if p.isdigit() else obj[p]
        obj[int(last) if last.isdigit() else last] = value

    return change


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    *parents, last = path.split(".")

    def change(coco: dict[str, Any]) -> None:
        obj: Any = coco
        for p in parents:
            obj = obj[int(p)] if p.isdigit() else obj[p]
        del obj[last]

    return change


def _empty(coco: dict[str, Any]) -> None:
    coco["images"], coco["annotations"] = [], []


def _nudge_bbox(right: float) -> Callable[[dict[str, Any]], None]:
    """Move annotation 0's right edge ``right`` px inwards (it stays inside the image)."""

    def change(coco: dict[str, Any]) -> None:
        x, y, w, h = coco["annotations"][0]["bbox"]
        assert w > right  # the first object of seed 7 is wider than any nudge here
        coco["annotations"][0]["bbox"] = [x, y, w - right, h]

    return change


def _scale_area(factor: float, extra: float) -> Callable[[dict[str, Any]], None]:
    def change(coco: dict[str, Any]) -> None:
        coco["annotations"][0]["area"] = coco["annotations"][0]["area"] * factor + extra

    return change


def _relabel_one_keypoint(coco: dict[str, Any]) -> None:
    """Mark one labelled keypoint unlabelled without updating num_keypoints."""
    kps = coco["annotations"][0]["keypoints"]
    k = next(i for i in range(2, len(kps), 3) if kps[i] > 0)
    kps[k] = 0


ANN = "annotations.json"
# (id, how to break the set, file named in the message, field named, words in the message)
MALFORMED = [
    ("missing dir", shutil.rmtree, "train", "", "directory not found"),
    ("missing annotations", lambda d: (d / "annotations.json").unlink(), ANN, "", "file not found"),
    ("invalid json", _write("annotations.json", b'{"images": [\n  {"id": 0,,}\n'), ANN, "line 2", "not valid JSON"),
    ("not utf-8", _write("annotations.json", b'{"images": "\xff"}'), ANN, "", "UTF-8"),
    ("json list", _write("annotations.json", b"[]"), ANN, "(top level)", "list"),
    ("missing categories", _edit(_drop("categories")), ANN, "categories", "missing"),
    ("images not a list", _edit(_set("images", {})), ANN, "images", "must be a list"),
    ("image id not int", _edit(_set("images.1.id", "1")), ANN, "images[1].id", "integer"),
    ("duplicate image id", _edit(_set("images.1.id", 0)), ANN, "images[1].id", "duplicate"),
    ("bad keypoints", _edit(_set("annotations.0.keypoints", [1, 2])), ANN, "annotations[0].keypoints", "numbers"),
    (
        "unknown category name",
        _edit(_set("categories.1.name", "hexagon")),
        ANN,
        "categories[1].name",
        "known: circle, square",
    ),
    (
        "unknown category id",
        _edit(_set("annotations.0.category_id", 9)),
        ANN,
        "annotations[0].category_id",
        "unknown category id 9",
    ),
    (
        "unknown image id",
        _edit(_set("annotations.0.image_id", 99)),
        ANN,
        "annotations[0].image_id",
        "unknown image id 99",
    ),
    (
        "keypoint count",
        _edit(_set("annotations.0.keypoints", [1.0, 2.0, 2] * 9)),
        ANN,
        "annotations[0] (id 1).keypoints",
        "declares",
    ),
    ("corrupt image", _write("images/000001.png", b"not a png at all"), ANN, "images[1].file_name", "000001.png"),
    ("missing image", lambda d: (d / "images" / "000002.png").unlink(), ANN, "images[2].file_name", "not found"),
    ("missing caption", _edit(_drop("images.0.caption")), ANN, "images[0].caption", "missing"),
    ("mask size", _edit(_small_rle), ANN, "annotations[0].segmentation", "16x16 differs from image size 32x32"),
    (
        "rle garbage",
        _edit(_set("annotations.0.segmentation.counts", "\u00e9\u00e9")),
        ANN,
        "annotations[0].segmentation",
        "alphabet",
    ),
    ("rle too long", _edit(_long_rle), ANN, "annotations[0].segmentation", "invalid RLE"),
    (
        "uncompressed rle short",
        _edit(_set("annotations.0.segmentation.counts", [3, 4])),
        ANN,
        "annotations[0].segmentation",
        "summing to 1024",
    ),
    (
        "bad polygon",
        _edit(_set("annotations.0.segmentation", [[1, 2, 3, 4]])),
        ANN,
        "annotations[0].segmentation",
        "polygons",
    ),
    ("width", _edit(_set("images.0.width", 64)), ANN, "images[0].width", "is 64"),
    ("empty set", _edit(_empty), ANN, "images", "no images"),
    ("depth size", _small_depth, ANN, "images[0].depth_file", "differs"),
    ("depth missing", lambda d: (d / "depth" / "000003.png").unlink(), ANN, "images[3].depth_file", "not found"),
    ("depth scale", _edit(_set("info.depth_scale", 0)), ANN, "info.depth_scale", "positive"),
    # -- internal consistency: each field agrees with the image, the masks and the other entries
    (
        "duplicate file name",
        _edit(_set("images.2.file_name", "images/./000000.png")),
        ANN,
        "images[2].file_name",
        "also the file of images[0]",
    ),
    ("duplicate annotation id", _edit(_set("annotations.1.id", 1)), ANN, "annotations[1].id", "duplicate annotation"),
    ("bbox not 4 numbers", _edit(_set("annotations.0.bbox", [1, 2, 3])), ANN, "annotations[0].bbox", "[x, y, width"),
    (
        "bbox past the image",
        _edit(_set("annotations.0.bbox", [30, 0, 10, 10])),
        ANN,
        "annotations[0] (id 1).bbox",
        "[30, 0, 10, 10] extends past the image (32x32, WxH)",
    ),
    (
        "bbox off its mask",
        _edit(_nudge_bbox(3)),
        ANN,
        "annotations[0] (id 1).bbox",
        "differs from the segmentation's own box",
    ),
    ("area off its mask", _edit(_scale_area(1.2, 3)), ANN, "annotations[0] (id 1).area", "by more than 5% or 2 px"),
    ("area negative", _edit(_set("annotations.0.area", -1)), ANN, "annotations[0].area", ">= 0"),
    (
        "num_keypoints off",
        _edit(_relabel_one_keypoint),
        ANN,
        "annotations[0] (id 1).num_keypoints",
        "keypoints label",
    ),
]


@pytest.mark.parametrize(
    ("breaker", "file", "field", "words"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_set_is_one_line_error(
    set_copy: Path, breaker: Callable[[Path], None], file: str, field: str, words: str
) -> None:
    breaker(set_copy)
    with pytest.raises(DatasetDMError) as caught:
        load_real_set(set_copy, ("circle", "square", "triangle", "star"))
    message = str(caught.value)
    assert "\n" not in message
    assert file in (caught.value.file or "") and message.startswith(str(set_copy))
    assert (caught.value.field or "") == field
    assert words in message


def test_derived_fields_within_tolerance_load(set_copy: Path) -> None:
    """A box edge or an area 2 px off its mask is how tools round; only more is refused."""
    _edit(_nudge_bbox(2))(set_copy)
    _edit(_scale_area(1.0, 2))(set_copy)
    assert len(load_real_set(set_copy, WORLD.classes)) == NUM
