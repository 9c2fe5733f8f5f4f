"""Every setting a stage reads is one DVC tracks for it, so ``dvc repro`` reruns a stage when,
and only when, something it used changed (the promise of "change one setting in params.yaml
and only the stages that depend on it run again").

Each stage runs for real on tiny params while every read of a ``Params`` section field is
recorded; what a stage read must be covered by its ``params:`` in ``dvc.yaml`` (a section
covers its fields) or name a path DVC tracks as its dependency or output (``${real.dir}``).
"""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest
import yaml

from datasetdm import stages
from datasetdm.config import Params, params_from_dict
from datasetdm.dvc_pipeline import stage_order
from tests.conftest import REPO, tiny_raw
from tests.dvc_repo import dvc_stage, stage_command

# Read by stages but not what they make: where the work runs (results are the same on any
# device, up to float rounding).
NOT_OUTPUT_SHAPING = {"backbone.device"}
# Read by a stage and then not used, per stage (each with why).
READ_UNUSED = {
    # uplift_fixed_key and uplift_table take the quick audit's steps as the default of every
    # task, then use the stage's own downstream.uplift_steps.<model>
    **{f"uplift-model@{m}": {"downstream.steps"} for m in ("semantic", "depth", "keypoints")},
}


def _section_paths(params: Params) -> dict[type, str]:
    """Config class -> its dotted place in ``Params`` (each section class sits in one place)."""
    paths: dict[type, str] = {}

    def walk(obj: object, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                assert type(value) not in paths, f"{type(value).__name__} sits in two places"
                paths[type(value)] = prefix + f.name
                walk(value, prefix + f.name + ".")

    walk(params, "")
    return paths


def _record_reads(monkeypatch: pytest.MonkeyPatch, params: Params) -> set[str]:
    """Patch every section class so reading one of its fields adds ``section.field`` to the returned set.

    Reads inside ``Params.to_dict`` are not recorded: a dataset card keeps the whole of
    ``params.yaml`` as it was when the set was made, a record of the time, not a dependency.
    """
    reads: set[str] = set()
    recording = [True]
    to_dict = Params.to_dict

    def unrecorded_to_dict(self):
        recording[0] = False
        try:
            return to_dict(self)
        finally:
            recording[0] = True

    monkeypatch.setattr(Params, "to_dict", unrecorded_to_dict)
    for cls, path in _section_paths(params).items():
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name, _path=path, _names=names):
            if name in _names and recording[0]:
                reads.add(f"{_path}.{name}")
            return object.__getattribute__(self, name)

        monkeypatch.setattr(cls, "__getattribute__", getattribute)
    return reads


def _tracked(stage: str) -> tuple[set[str], set[str]]:
    """The params a ``dvc.yaml`` stage lists and the settings its deps and outs are templated from."""
    spec = dvc_stage(stage)
    files = yaml.safe_dump({k: spec.get(k) for k in ("deps", "outs", "metrics", "plots")})
    return set(spec.get("params", [])), set(re.findall(r"\$\{([a-z_.]+)\}", files))


def _covered(key: str, params: set[str], paths: set[str]) -> bool:
    """``key`` is listed, inside a listed section, a path DVC tracks, or a section read on the way to a listed key."""
    return (
        key in paths
        or key in NOT_OUTPUT_SHAPING
        or any(key == p or key.startswith(p + ".") or p.startswith(key + ".") for p in params)
    )


@pytest.mark.slow
def test_every_setting_a_stage_reads_is_tracked_by_its_dvc_stage(tmp_path, tiny_backbone_dir, monkeypatch):
    raw = tiny_raw(tmp_path, tiny_backbone_dir)  # every path absolute, in the temp dir
    if "fiftyone" not in sys.modules:  # curate's datasets go to a database of the test's own
        monkeypatch.setenv("FIFTYONE_DATABASE_DIR", str(tmp_path / "fiftyone-db"))
        monkeypatch.setenv("FIFTYONE_DO_NOT_TRACK", "true")
    raw["steer"]["round"] = 1  # a round is made, so its settings are read
    params = params_from_dict(raw, source=str(tmp_path / "params.yaml"))
    untracked: dict[str, list[str]] = {}
    order = stage_order(REPO)
    assert "rounds" in order and "uplift-model@depth" in order
    reads = _record_reads(monkeypatch, params)
    for stage in order:
        reads.clear()
        stages.STAGES[stage_command(stage)](params)
        assert reads, f"{stage} read no setting: the recording is broken"
        tracked, paths = _tracked(stage)
        missing = sorted(k for k in reads - READ_UNUSED.get(stage, set()) if not _covered(k, tracked, paths))
        if missing:
            untracked[stage] = missing
    assert not untracked, "\n".join(f"{s}: {k}" for s, k in untracked.items())


def test_read_recording_sees_a_field_read_and_nothing_else(tiny_params, monkeypatch):
    reads = _record_reads(monkeypatch, tiny_params)
    assert tiny_params.downstream.uplift_steps.depth == 2
    assert reads == {"downstream.uplift_steps", "downstream.uplift_steps.depth"}
    assert _covered("downstream.uplift_steps.depth", {"downstream.uplift_steps.depth"}, set())
    assert not _covered("downstream.uplift_steps.semantic", {"downstream.uplift_steps.depth"}, set())
    assert _covered("steer.folds", {"steer"}, set()) and not _covered("steering.x", {"steer"}, set())
    reads.clear()
    tiny_params.to_dict()  # the card's record of the whole file
    assert not reads
