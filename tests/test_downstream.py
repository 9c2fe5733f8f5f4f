"""Downstream uplift machinery: training sets from real labels and from an export, one small model per task."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datasetdm import stages
from datasetdm.config import DownstreamConfig, WorldConfig
from datasetdm.downstream.data import from_export, from_labelled
from datasetdm.downstream.evaluate import evaluate_model
from datasetdm.downstream.models import _batch, task_loss, train_model
from datasetdm.downstream.uplift import uplift_table
from datasetdm.errors import DatasetDMError
from datasetdm.realset import load_real_set, write_real_set
from datasetdm.report import render_report

WORLD = WorldConfig(image_size=32, classes=("circle", "square"), colours=("red", "blue"), max_objects=2)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    write_real_set(WORLD, root / "train", 48, seed=1)
    write_real_set(WORLD, root / "test", 16, seed=500)
    return load_real_set(root / "train", WORLD.classes), load_real_set(root / "test", WORLD.classes)


def test_real_labels_give_every_target(sets):
    train, _ = sets
    data = from_labelled(train)
    assert data.images.shape == (48, 32, 32, 3) and data.semantic.shape == (48, 32, 32)
    assert data.depth.shape == (48, 32, 32) and float(data.depth.min()) > 0
    assert data.heatmaps.shape == (48, 2, 32, 32) and data.heatmaps.max() == pytest.approx(1.0)


def test_each_task_model_learns(sets):
    """A few dozen steps beat an untrained model on held-out images (semantic, depth) or lower the loss (keypoints)."""
    train, test = sets
    data = from_labelled(train)
    untrained = {
        t: evaluate_model(
            t,
            train_model(t, [data], num_labels=3, steps=1, batch_size=8, lr=0.0, seed=0, width=8),
            test,
            WORLD.classes,
        )
        for t in ("semantic", "depth")
    }
    trained = {
        t: evaluate_model(
            t,
            train_model(t, [data], num_labels=3, steps=60, batch_size=8, lr=0.01, seed=0, width=8),
            test,
            WORLD.classes,
        )
        for t in ("semantic", "depth")
    }
    assert trained["semantic"]["mIoU"] > untrained["semantic"]["mIoU"] + 0.2
    assert 0 <= trained["semantic"]["instances"]["AP"] <= 1
    assert trained["depth"]["abs_rel"] < untrained["depth"]["abs_rel"] - 0.2
    rng = np.random.default_rng(5)
    x, targets = _batch("keypoints", data, np.arange(16), rng)
    before = task_loss(
        "keypoints",
        train_model("keypoints", [data], num_labels=3, steps=1, batch_size=8, lr=0.0, seed=0, width=8)(x),
        targets,
        3,
    )
    model = train_model("keypoints", [data], num_labels=3, steps=60, batch_size=8, lr=0.01, seed=0, width=8)
    with torch.no_grad():
        after = task_loss("keypoints", model(x), targets, 3)
    assert torch.isfinite(after) and after < before
    kp = evaluate_model("keypoints", model, test, WORLD.classes)
    assert kp["num_instances"] > 0 and 0 <= kp["AP"] <= 1


def test_depth_views_never_rotate(sets):
    """Depth batches use flips only: the top row (far ground) stays the top row."""
    data = from_labelled(sets[0])
    _, targets = _batch("depth", data, np.arange(8), np.random.default_rng(0))
    top, bottom = targets["depth"][:, 0].mean(), targets["depth"][:, -1].mean()
    assert top > bottom


@pytest.fixture
def exported(tiny_params):
    for stage in ("real-data", "train-decoder", "expand-prompts", "generate", "filter", "export"):
        stages.STAGES[stage](tiny_params)
    return tiny_params


def test_export_gives_depth_and_keypoint_targets(exported):
    data = from_export(exported.export.out)
    n = len(data)
    assert n == 6 and data.depth.shape == (n, 32, 32) and bool((data.depth > 0).all())
    assert data.heatmaps.shape == (n, 2, 32, 32)


def _real_test_cfg(p):
    """The K real images as arrays, the held-out set and a tiny downstream recipe."""
    train_dir, test_dir = stages.real_set_split_dirs(p.real.dir)
    real = from_labelled(load_real_set(train_dir, p.world.classes))
    return real, load_real_set(test_dir, p.world.classes), DownstreamConfig(steps=3, batch_size=4, width=8)


def test_uplift_table_covers_every_task(exported):
    p = exported
    real, test, cfg = _real_test_cfg(p)
    table = uplift_table(real, from_export(p.export.out), test, p.world.classes, cfg=cfg)
    assert set(table["metrics"]) == {"semantic", "instances", "depth", "keypoints"}
    assert {"mIoU_real", "mIoU_synthetic", "mIoU_real+synthetic", "uplift"} <= set(table["metrics"]["semantic"])
    assert {"abs_rel_real", "abs_rel_real+synthetic", "abs_rel_reduction"} <= set(table["metrics"]["depth"])
    assert len(table["plot"]) == 12 and {r["training data"] for r in table["plot"]} == {
        "real",
        "synthetic",
        "real+synthetic",
    }
    # A synthetic set without depth (a decoder without the depth head) leaves depth real-only.
    no_depth = dataclasses.replace(from_export(p.export.out), depth=None)
    partial = uplift_table(real, no_depth, test, p.world.classes, cfg=cfg)["metrics"]["depth"]
    assert "abs_rel_real" in partial and "abs_rel_synthetic" not in partial and "abs_rel_reduction" not in partial


def test_seeds_give_mean_and_std_and_the_ceiling_row_what_it_recovers(exported):
    p = exported
    real, test, cfg = _real_test_cfg(p)
    synthetic = from_export(p.export.out)
    table = uplift_table(real, synthetic, test, p.world.classes, cfg=cfg, seeds=2, ceiling=synthetic)["metrics"]
    sem = table["semantic"]
    assert sem["seeds"] == 2 and sem["num_ceiling"] == len(synthetic)
    for arm in ("real", "synthetic", "real+synthetic", "ceiling"):
        assert sem[f"mIoU_{arm}"] == sem[f"mIoU_{arm}_mean"] and sem[f"mIoU_{arm}_std"] >= 0
    assert sem["uplift_mean"] == pytest.approx(sem["mIoU_real+synthetic"] - sem["mIoU_real"])
    assert "gap_recovered" in sem and "abs_rel_reduction_std" in table["depth"]
    one = uplift_table(real, synthetic, test, p.world.classes, cfg=cfg, seeds=1)["metrics"]["semantic"]
    assert one["mIoU_real_std"] == 0.0 and "mIoU_ceiling" not in one


def test_uplift_stages_write_one_part_per_model_and_join_them(exported):
    """Each model's stage writes its own rows; ``uplift`` joins them and refuses a part made with other steps."""
    p = dataclasses.replace(
        exported,
        downstream=dataclasses.replace(
            exported.downstream, steps=2, batch_size=4, width=8, uplift_seeds=2, ceiling_images=6
        ),
    )
    parts = {model: stages.STAGES[f"uplift-{model}"](p) for model in ("semantic", "depth", "keypoints")}
    assert set(parts["semantic"]) == {"semantic", "instances"} and set(parts["depth"]) == {"depth"}
    assert parts["depth"]["depth"]["steps"] == {"depth": 2}  # conftest's uplift_steps: its own model's only
    metrics = stages.STAGES["uplift"](p)
    written = json.loads(Path(p.downstream.uplift_out).read_text())
    assert written == json.loads(json.dumps(metrics)) and list(written) == [
        "semantic",
        "instances",
        "depth",
        "keypoints",
    ]
    assert written["semantic"]["num_ceiling"] == 6 and written["semantic"]["seeds"] == 2
    assert written["keypoints"] == json.loads(json.dumps(parts["keypoints"]["keypoints"]))
    # params.yaml now asks for more depth steps than the depth part was trained with: one line, no table written
    longer = dataclasses.replace(p.downstream, uplift_steps=dataclasses.replace(p.downstream.uplift_steps, depth=5))
    Path(p.downstream.uplift_out).unlink()
    with pytest.raises(DatasetDMError) as e:
        stages.STAGES["uplift"](dataclasses.replace(p, downstream=longer))
    assert "depth.json" in str(e.value) and "depth.steps" in str(e.value) and "\n" not in str(e.value)
    assert not Path(p.downstream.uplift_out).exists()


def test_uplift_trains_the_arms_that_never_read_the_export_once(exported, caplog):
    """(a) and the ceiling are stored beside a model's rows; reusing them gives the table byte for byte."""
    p = dataclasses.replace(
        exported,
        downstream=dataclasses.replace(
            exported.downstream, steps=2, batch_size=4, width=8, uplift_seeds=2, ceiling_images=6
        ),
    )
    fixed, part = stages.fixed_arms_path(p, "semantic"), stages.uplift_part_path(p, "semantic")
    fixed.unlink(missing_ok=True)
    stages.STAGES["uplift-semantic"](p)
    trained = part.read_bytes()
    stored = json.loads(fixed.read_text())
    assert list(stored["arms"]) == ["real", "ceiling"] and len(stored["arms"]["ceiling"]["semantic"]) == 2
    assert stored["key"]["recipe"]["steps"] == 3 and stored["key"]["ceiling"]["images"] == 6  # uplift_steps.semantic
    with caplog.at_level("INFO", logger="datasetdm.downstream.baseline"):
        stages.STAGES["uplift-semantic"](p)
    assert "reused" in caplog.text and part.read_bytes() == trained
    table = json.loads(trained)["semantic"]
    assert table["num_ceiling"] == 6 and list(k for k in table if k.endswith("_std")) == [
        "mIoU_real_std",
        "mIoU_synthetic_std",
        "mIoU_real+synthetic_std",
        "mIoU_ceiling_std",
        "uplift_std",
    ]
    # other seeds: the stored arms are not used, and the file then holds the new ones
    caplog.clear()
    one_seed = dataclasses.replace(p, downstream=dataclasses.replace(p.downstream, uplift_seeds=1))
    with caplog.at_level("INFO", logger="datasetdm.downstream.baseline"):
        stages.STAGES["uplift-semantic"](one_seed)
    assert "differ in seeds" in caplog.text and len(json.loads(fixed.read_text())["arms"]["real"]["semantic"]) == 1
    fixed.write_text('{"key": {}}')
    with pytest.raises(DatasetDMError) as e:
        stages.STAGES["uplift-semantic"](p)
    assert str(fixed) in str(e.value) and "arms" in str(e.value) and "\n" not in str(e.value)


def test_downstream_reuses_the_baseline_only_for_the_same_real_sets_and_recipe(exported, caplog):
    """The (a) arm from the baseline stage gives the downstream table byte for byte what training it there gives."""
    p = dataclasses.replace(
        exported, downstream=dataclasses.replace(exported.downstream, steps=3, batch_size=4, width=8)
    )
    baseline, out = Path(p.downstream.baseline), Path(p.downstream.out)
    baseline.unlink(missing_ok=True)
    stages.STAGES["downstream"](p)  # no baseline: the real-only arm is trained in the stage
    trained = out.read_bytes()
    stages.STAGES["baseline"](p)
    stored = json.loads(baseline.read_text())
    assert stored["key"]["recipe"]["steps"] == 3 and set(stored["real"]) == {"semantic", "depth", "keypoints"}
    with caplog.at_level("INFO", logger="datasetdm.downstream.baseline"):
        stages.STAGES["downstream"](p)
    assert "reused" in caplog.text and out.read_bytes() == trained
    # another recipe: the stored arm is not used, the stage trains its own
    caplog.clear()
    other = dataclasses.replace(p, downstream=dataclasses.replace(p.downstream, steps=4))
    with caplog.at_level("INFO", logger="datasetdm.downstream.baseline"):
        stages.STAGES["downstream"](other)
    assert "differ in recipe" in caplog.text
    # a damaged file is one line naming it
    baseline.write_text("{not json")
    with pytest.raises(DatasetDMError) as e:
        stages.STAGES["downstream"](p)
    assert str(baseline) in str(e.value) and "\n" not in str(e.value)


def test_export_without_card_is_one_line(tmp_path):
    with pytest.raises(DatasetDMError) as e:
        from_export(tmp_path)
    assert "dataset.json" in str(e.value) and "\n" not in str(e.value)


def test_make_runs_audit_trains_b_only_when_asked_and_the_report_shows_what_was_trained(exported):
    """``downstream.synthetic_arm`` off (make run's default): (a) and (c) and the uplift, no (b) row or column;
    on: (b) too, with the same (a) and (c) results (every arm trains from its own seed)."""
    quick = dataclasses.replace(exported.downstream, steps=3, batch_size=4, width=8)
    out = Path(exported.downstream.out)
    tables, reports = {}, {}
    for synthetic_arm in (False, True):
        p = dataclasses.replace(exported, downstream=dataclasses.replace(quick, synthetic_arm=synthetic_arm))
        stages.STAGES["downstream"](p)
        tables[synthetic_arm] = json.loads(out.read_text())
        reports[synthetic_arm] = render_report({}, {}, p, downstream=tables[synthetic_arm])
    without, with_b = tables[False], tables[True]

    def of_b(key: str) -> bool:  # mIoU_synthetic, abs_rel_synthetic_std, ... (not num_synthetic, the set's size)
        return "_synthetic" in key and key != "num_synthetic"

    assert not any(of_b(key) for row in without.values() for key in row) and without["semantic"]["num_synthetic"]
    assert {"mIoU_synthetic", "uplift"} <= set(with_b["semantic"]) and "abs_rel_reduction" in without["depth"]
    for task, row in without.items():
        assert {k: v for k, v in with_b[task].items() if not of_b(k)} == row
    assert "(b) synthetic" not in reports[False] and "| (a) real | (c) real + synthetic |" in reports[False]
    assert "| (a) real | (b) synthetic | (c) real + synthetic |" in reports[True]
