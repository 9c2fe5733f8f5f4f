"""Export stage: real files, real pycocotools, a tiny fake generated set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from datasetdm.errors import DatasetDMError
from datasetdm.export.coco import load_coco_masks, semantic_to_coco_annotations
from datasetdm.export.dataset import export_dataset
from datasetdm.export.grid import GAP, PAD, overlay
from datasetdm.export.voc import voc_palette
from datasetdm.io import sha256_dir, sha256_file

CLASSES = ["circle", "square", "triangle"]
SIZE = 32
DROPPED = ("shard-00000", "000001")


def _semantic(rng: np.random.Generator) -> np.ndarray:
    """A few overlapping rectangles of random classes on background."""
    sem = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for _ in range(rng.integers(1, 4)):
        y, x = rng.integers(0, SIZE - 4, size=2)
        h, w = rng.integers(3, 16, size=2)
        sem[y : y + h, x : x + w] = rng.integers(1, len(CLASSES) + 1)
    return sem


def _rehash(gen: Path) -> None:
    """Reseal a hand-edited generated set: shard hashes in the manifest, the manifest's in the decisions."""
    manifest = json.loads((gen / "manifest.json").read_text())
    for shard in manifest["shards"]:
        shard["sha256"] = sha256_dir(gen / shard["name"])
    (gen / "manifest.json").write_text(json.dumps(manifest))
    filtered = gen.parent / "filtered.json"
    filtered.write_text(json.dumps({**json.loads(filtered.read_text()), "generation_manifest": _manifest_hash(gen)}))


def _manifest_hash(gen: Path) -> str:
    return sha256_file(gen / "manifest.json")


@pytest.fixture
def gen(tmp_path: Path) -> dict:
    """2 shards x 3 samples, a manifest with true hashes, a filter dropping one sample."""
    rng = np.random.default_rng(0)
    gen_dir = tmp_path / "generated"
    truth, filtered = {}, []
    shards = []
    for k in range(2):
        name = f"shard-{k:05d}"
        (gen_dir / name / "images").mkdir(parents=True)
        (gen_dir / name / "semantic").mkdir()
        records = []
        for j in range(3):
            sid = f"{3 * k + j:06d}"
            image = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
            sem = _semantic(rng)
            Image.fromarray(image).save(gen_dir / name / "images" / f"{sid}.png")
            Image.fromarray(sem).save(gen_dir / name / "semantic" / f"{sid}.png")
            truth[sid] = (image, sem)
            records.append(
                {
                    "id": sid,
                    "prompt": f"a red circle and two blue squares number {sid}",
                    "seed": 100 + 3 * k + j,
                    "image": f"images/{sid}.png",
                    "semantic": f"semantic/{sid}.png",
                    "backbone": "b" * 64,
                    "decoder": "d" * 64,
                    "scheduler": "DDIMScheduler",
                    "steps": 20,
                    "guidance_scale": 3.0,
                }
            )
            filtered.append(
                {
                    "id": sid,
                    "shard": name,
                    "score": round(0.5 + 0.05 * (3 * k + j), 3),
                    "components": {"confidence": 0.9},
                    "kept": (name, sid) != DROPPED,
                }
            )
        (gen_dir / name / "records.json").write_text(json.dumps(records))
        shards.append({"name": name, "sha256": sha256_dir(gen_dir / name), "num_samples": 3})
    manifest = {
        "classes": CLASSES,
        "image_size": SIZE,
        "backbone": "b" * 64,
        "decoder": "d" * 64,
        "shards": shards,
        "params": {"generate": {"seed": 0}},
    }
    (gen_dir / "manifest.json").write_text(json.dumps(manifest))
    filtered_json = tmp_path / "filtered.json"
    filtered_json.write_text(
        json.dumps({"generation_manifest": _manifest_hash(gen_dir), "min_score": 0.5, "samples": filtered})
    )
    return {"gen": gen_dir, "filtered": filtered_json, "out": tmp_path / "export", "truth": truth}


def _export(g: dict, grid_samples: int = 5) -> dict:
    return export_dataset(
        g["gen"],
        g["filtered"],
        g["out"],
        params_dict={"export": {"grid_samples": grid_samples}},
        grid_samples=grid_samples,
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_round_trips_through_coco_and_voc(gen: dict) -> None:
    card = _export(gen)
    out = gen["out"]
    kept = sorted(sid for sid in gen["truth"] if sid != DROPPED[1])

    assert card["counts"] == {"generated": 6, "kept": 5, "dropped": 1}
    assert json.loads((out / "dataset.json").read_text()) == card
    assert sorted(p.stem for p in (out / "images").iterdir()) == kept
    assert sorted(p.stem for p in (out / "masks").iterdir()) == kept

    coco = COCO(str(out / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES
    for info in coco.loadImgs(coco.getImgIds()):
        sid = Path(info["file_name"]).stem
        image, sem = gen["truth"][sid]
        rebuilt = np.zeros_like(sem)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=info["id"]))
        assert {a["category_id"] for a in anns} == set(np.unique(sem).tolist()) - {
            0
        }  # one or more instances per class
        for ann in anns:
            rebuilt[coco.annToMask(ann) > 0] = ann["category_id"]
        np.testing.assert_array_equal(rebuilt, sem)
        assert (info["width"], info["height"]) == (SIZE, SIZE)
        assert info["prompt"].endswith(sid) and info["seed"] == 100 + int(sid) and info["score"] > 0
        np.testing.assert_array_equal(np.asarray(Image.open(out / info["file_name"])), image)
    assert sorted(Path(f).stem for f in load_coco_masks(out / "annotations.json")) == kept

    for sid in kept:
        with Image.open(out / "masks" / f"{sid}.png") as mask:
            assert mask.mode == "P"
            assert mask.getpalette()[:30] == voc_palette()[:30]
            np.testing.assert_array_equal(np.asarray(mask), gen["truth"][sid][1])

    masks = [gen["truth"][sid][1] for sid in kept]
    for k, name in enumerate(CLASSES, start=1):
        assert card["class_histogram"][name]["images"] == sum(int((m == k).any()) for m in masks)
        assert card["class_histogram"][name]["pixel_fraction"] == pytest.approx(
            sum(int((m == k).sum()) for m in masks) / (len(masks) * SIZE * SIZE), abs=1e-6
        )
    assert card["models"] == {"backbone": "b" * 64, "decoder": "d" * 64}
    assert card["reproduce"] == {
        "scheduler": "DDIMScheduler",
        "steps": 20,
        "guidance_scale": 3.0,
        "feature_timestep": None,
        "label_cleaning": None,
        "seeds": {"min": 100, "max": 105},
        "prompts": 6,
    }
    assert card["params"] == {"export": {"grid_samples": 5}}
    assert set(card["files"]) == {"annotations.json", "images", "masks", "grid.png"}

    with Image.open(out / "grid.png") as grid:
        # 5 samples on 4 columns: 2 rows of cells, each cell two 3x-upscaled panels
        assert grid.width == PAD + 4 * (2 * SIZE * 3 + GAP + PAD)
        assert grid.height > PAD + 2 * (SIZE * 3 + PAD)


def test_export_is_deterministic_and_skips_grid_at_zero(gen: dict) -> None:
    card = _export(gen, 0)
    first = _snapshot(gen["out"])
    assert "grid.png" not in first and "grid.png" not in card["files"]
    assert _export(gen, 0) == card
    assert _snapshot(gen["out"]) == first


def test_tampered_shard_is_refused(gen: dict) -> None:
    image = gen["gen"] / "shard-00001" / "images" / "000004.png"
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF
    image.write_bytes(bytes(data))
    with pytest.raises(DatasetDMError, match=r"shards\[1\]\.sha256: shard shard-00001 does not match"):
        _export(gen)
    assert not gen["out"].exists()


def test_failed_export_leaves_previous_export_untouched(gen: dict) -> None:
    _export(gen)
    before = _snapshot(gen["out"])
    # A mask that fails only after writing has begun: hashes match, labels do not.
    Image.fromarray(np.full((SIZE, SIZE), 9, np.uint8)).save(gen["gen"] / "shard-00001" / "semantic" / "000005.png")
    _rehash(gen["gen"])
    with pytest.raises(DatasetDMError, match=r"000005\.png: pixel values: class index 9"):
        _export(gen)
    assert _snapshot(gen["out"]) == before
    assert sorted(p.name for p in gen["out"].parent.iterdir()) == ["export", "filtered.json", "generated"]


def _bad_json(path_in_gen: str):
    def corrupt(g: dict) -> Path:
        path = g["filtered"] if path_in_gen == "filtered.json" else g["gen"] / path_in_gen
        path.write_text('{"classes": [')
        return path

    return corrupt


def _missing_image(g: dict) -> Path:
    (g["gen"] / "shard-00000" / "images" / "000002.png").unlink()
    return g["gen"] / "shard-00000" / "records.json"


def _small_mask(g: dict) -> Path:
    path = g["gen"] / "shard-00000" / "semantic" / "000000.png"
    Image.fromarray(np.zeros((SIZE // 2, SIZE // 2), np.uint8)).save(path)
    return path


def _class_out_of_range(g: dict) -> Path:
    path = g["gen"] / "shard-00000" / "semantic" / "000000.png"
    Image.fromarray(np.full((SIZE, SIZE), len(CLASSES) + 1, np.uint8)).save(path)
    return path


def _unknown_sample(g: dict) -> Path:
    data = json.loads(g["filtered"].read_text())
    data["samples"][0]["id"] = "999999"
    g["filtered"].write_text(json.dumps(data))
    return g["filtered"]


def _decisions_for_another_run(g: dict) -> Path:
    """Generation rerun (here: its manifest rewritten) after filtering: same ids, other run."""
    manifest = json.loads((g["gen"] / "manifest.json").read_text())
    manifest["params"]["generate"]["seed"] = 1
    (g["gen"] / "manifest.json").write_text(json.dumps(manifest))
    return g["filtered"]


def _decisions_unsealed(g: dict) -> Path:
    data = json.loads(g["filtered"].read_text())
    del data["generation_manifest"]
    g["filtered"].write_text(json.dumps(data))
    return g["filtered"]


def _record_extra(g: dict, **fields) -> Path:
    """Add ``fields`` to the first record of shard-00000; return its records.json."""
    records_file = g["gen"] / "shard-00000" / "records.json"
    records = json.loads(records_file.read_text())
    records[0].update(fields)
    records_file.write_text(json.dumps(records))
    return records_file


def _depth_png(array: np.ndarray):
    def corrupt(g: dict) -> Path:
        (g["gen"] / "shard-00000" / "depth").mkdir()
        path = g["gen"] / "shard-00000" / "depth" / "000000.png"
        Image.fromarray(array).save(path)
        _record_extra(g, depth="depth/000000.png")
        return path

    return corrupt


def _missing_depth(g: dict) -> Path:
    return _record_extra(g, depth="depth/000000.png")


def _bad_peaks(g: dict) -> Path:
    return _record_extra(g, keypoints={"centre": [[1, 2]], "corner": []})


@pytest.mark.parametrize(
    ("corrupt", "field"),
    [
        (_depth_png(np.full((SIZE, SIZE), 7, np.uint8)), "mode"),
        (_depth_png(np.full((SIZE // 2, SIZE), 3000, np.uint16)), "size"),
        (_missing_depth, r"\[0\]\.depth"),
        (_bad_peaks, r"\[0\]\.keypoints\.centre"),
        (_bad_json("manifest.json"), "line 1"),
        (_bad_json("shard-00000/records.json"), "line 1"),
        (_bad_json("filtered.json"), "line 1"),
        (_missing_image, r"\[2\]\.image"),
        (_small_mask, "size"),
        (_class_out_of_range, "pixel values"),
        (_unknown_sample, r"samples\[0\]"),
        (_decisions_for_another_run, "generation_manifest"),
        (_decisions_unsealed, "generation_manifest"),
    ],
)
def test_malformed_inputs_name_file_and_field_and_write_nothing(gen: dict, corrupt, field: str) -> None:
    path = corrupt(gen)
    if gen["gen"] in path.parents and path.parent != gen["gen"]:
        _rehash(gen["gen"])  # so the error is about the content, not the shard hash
    with pytest.raises(DatasetDMError) as err:
        _export(gen)
    assert err.value.file == str(path)
    assert err.value.field is not None and re.fullmatch(field, err.value.field)
    assert str(err.value).startswith(f"{path}: {err.value.field}: ") and "\n" not in str(err.value)
    assert not gen["out"].exists()


def test_coco_annotations_area_bbox_and_order() -> None:
    sem = np.zeros((6, 8), np.uint8)
    sem[1:3, 2:6] = 2
    sem[4, 0] = 3
    anns = semantic_to_coco_annotations(sem, image_id=7, classes=CLASSES, start_ann_id=10)
    assert [(a["id"], a["category_id"], a["area"], a["bbox"]) for a in anns] == [
        (10, 2, 8.0, [2.0, 1.0, 4.0, 2.0]),
        (11, 3, 1.0, [0.0, 4.0, 1.0, 1.0]),
    ]
    assert all(a["image_id"] == 7 and a["iscrowd"] == 0 and isinstance(a["segmentation"]["counts"], str) for a in anns)
    with pytest.raises(ValueError):
        semantic_to_coco_annotations(np.full((2, 2), 4, np.uint8), image_id=1, classes=CLASSES, start_ann_id=1)


def test_each_separate_object_is_its_own_instance() -> None:
    sem = np.zeros((8, 8), np.uint8)
    sem[0:2, 0:2] = 1
    sem[5:8, 5:8] = 1  # a second object of the same class
    sem[2, 2] = 1  # touches the first diagonally: same object
    anns = semantic_to_coco_annotations(sem, image_id=1, classes=CLASSES, start_ann_id=1)
    assert [(a["category_id"], a["area"]) for a in anns] == [(1, 5.0), (1, 9.0)]


def test_voc_palette_and_overlay() -> None:
    pal = voc_palette()
    assert len(pal) == 768
    assert pal[0:3] == [0, 0, 0] and pal[3:6] == [128, 0, 0] and pal[6:9] == [0, 128, 0]
    assert pal[-3:] == [224, 224, 192]
    image = np.full((8, 8, 3), 200, np.uint8)
    sem = np.zeros((8, 8), np.uint8)
    sem[2:6, 2:6] = 1
    out = overlay(image, sem)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert (out[sem == 0] == 200).all()
    assert out[3, 3].tolist() == [164, 100, 100]  # inside: blended with (128, 0, 0)
    assert out[2, 2].tolist() == [224, 224, 192]  # edge: VOC boundary colour
