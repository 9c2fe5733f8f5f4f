"""The factory end to end on tiny models, through the two real orchestrators users run.

Slow (a minute or two each): a real Prefect flow run against a real (temporary)
Prefect server, and a real DVC pipeline in a temporary repo.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from pycocotools.coco import COCO

from tests.dvc_repo import make_tiny_repo, run

pytestmark = pytest.mark.slow


def check_export(root: Path, num_samples: int) -> None:
    """What a user reads from an export: COCO that loads, masks, card, grid."""
    export = root / "data/export"
    coco = COCO(str(export / "annotations.json"))
    card = json.loads((export / "dataset.json").read_text())
    assert len(coco.imgs) == card["counts"]["kept"] <= card["counts"]["generated"] == num_samples
    for ann in coco.loadAnns(coco.getAnnIds())[:5]:
        assert coco.annToMask(ann).sum() > 0
    assert (export / "grid.png").stat().st_size > 0
    metrics = json.loads((root / "metrics/decoder.json").read_text())
    assert 0.0 <= metrics["semantic"]["mIoU"] <= 1.0
    audit = json.loads((root / "metrics/backbone.json").read_text())
    assert {"single_object", "two_objects"} <= set(audit["prompt_fidelity"]) and 0 <= audit["label_agreement"][
        "mIoU"
    ] <= 1
    assert audit["frechet"] >= 0 and (root / "reports/fidelity_grid.png").stat().st_size > 0
    report = (root / "reports/report.md").read_text()
    assert (
        report.startswith("#")
        and card["models"]["backbone"][:12] in report
        and f"{metrics['semantic']['mIoU']:.3f}" in report
        and f"mIoU {audit['codec']['inspector_mIoU_reconstructed']:.3f}" in report  # the VAE round trip
    )


def test_dvc_and_prefect_share_one_graph_and_one_notion_of_done(tmp_path, monkeypatch):
    """`dvc repro`, then the Prefect flow: every stage skipped; one param set through the
    flow reruns exactly the stages `dvc repro` reruns for it, and DVC then sees all done."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.factory import factory

    root, raw = make_tiny_repo(tmp_path)
    run(root, "dvc", "init", "--no-scm", "-q")
    run(root, "dvc", "repro", "curate", "report")
    check_export(root, 6)
    lock = (root / "dvc.lock").read_bytes()
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    with prefect_test_harness(server_startup_timeout=120):
        state = factory(str(root), return_state=True)
        assert state.is_completed(), state
        summary = state.result()
        assert {s for s, r in summary["stages"].items() if r["ran"]} == set(), summary["stages"]
        assert "uplift" not in summary["stages"] and len(summary["stages"]) == 12
        assert (root / "dvc.lock").read_bytes() == lock
        assert 0 <= summary["decoder_mIoU"] <= 1

        # One param through the flow (as `dvc exp run -S`): only the stages reading it run.
        state = factory(str(root), set_params=["generate.num_samples=5"], return_state=True)
        summary = state.result()
    assert summary["set_params"] == {"generate.num_samples": 5}
    assert {s for s, r in summary["stages"].items() if r["ran"]} == {
        "generate",
        "filter",
        "export",
        "curate",
        "inspect",
        "downstream",
        "report",
    }, summary["stages"]
    check_export(root, 5)
    assert stages_run(run(root, "dvc", "repro", "curate", "report")) == set()  # DVC agrees: all done


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_dvc_repro_rebuilds_only_what_changed(tmp_path):
    root, raw = make_tiny_repo(tmp_path)
    run(root, "dvc", "init", "--no-scm", "-q")
    run(root, "dvc", "config", "core.analytics", "false")

    first = run(root, "dvc", "repro")
    assert {
        "real-data",
        "train-decoder",
        "expand-prompts",
        "generate",
        "filter",
        "export",
        "curate",
        "evaluate",
        "inspect",
        "baseline",
        "downstream",
        "uplift-model@semantic",
        "uplift-model@depth",
        "uplift-model@keypoints",
        "uplift",
        "rounds",
        "steering",
        "report",
    } <= stages_run(first)
    check_export(root, 6)

    again = run(root, "dvc", "repro")
    assert stages_run(again) == set(), again

    # One audit model's steps: only that model's uplift stage (and the stages reading all of
    # `downstream`) are stale, not the other two models' hour-long stages.
    raw["downstream"]["uplift_steps"]["depth"] += 1
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    stale = set(json.loads(run(root, "dvc", "status", "--json")))
    assert "uplift-model@depth" in stale and not stale & {"uplift-model@semantic", "uplift-model@keypoints"}, stale
    assert not stale & {"baseline", "downstream", "generate"}, stale
    raw["downstream"]["uplift_steps"]["depth"] -= 1

    raw["generate"]["num_samples"] = 5
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    fixed = {m: (root / "metrics/uplift/fixed" / f"{m}.json").stat().st_mtime_ns for m in ("semantic", "depth")}
    third = run(root, "dvc", "repro")
    assert stages_run(third) == {
        "generate",
        "filter",
        "export",
        "curate",
        "inspect",
        "downstream",
        "uplift-model@semantic",
        "uplift-model@depth",
        "uplift-model@keypoints",
        "uplift",
        "rounds",
        "steering",
        "report",
    }, third
    check_export(root, 5)
    # a new export retrains the synthetic arms only: DVC kept the stored (a) and ceiling arms and they were reused
    assert fixed == {m: (root / "metrics/uplift/fixed" / f"{m}.json").stat().st_mtime_ns for m in fixed}
