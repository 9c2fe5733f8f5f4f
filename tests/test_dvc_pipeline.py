"""dvc.yaml is the one pipeline graph: the order, staleness and per-run settings an
orchestrator takes from DVC (``datasetdm/dvc_pipeline.py``), on real DVC repos."""

from __future__ import annotations

import ast
import shutil

import pytest
import yaml

from datasetdm import dvc_pipeline
from datasetdm.errors import DatasetDMError
from datasetdm.generate import load_prompts
from datasetdm.stages import STAGES
from tests.conftest import REPO
from tests.dvc_repo import dvc_stage, make_tiny_repo, run, stage_command


def project_copy(tmp_path):
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


def test_stage_order_is_dvcs_graph_dependencies_first():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    names = [  # a foreach stage is one stage per item, named as DVC names them
        n
        for name, stage in stages.items()
        for n in ([f"{name}@{i}" for i in stage["foreach"]] if "foreach" in stage else [name])
    ]
    order = dvc_pipeline.stage_order(REPO)
    assert sorted(order) == sorted(names) and "uplift-model@depth" in order  # every stage of dvc.yaml, nothing else
    lock_deps = {  # a stage comes after every stage whose output it reads
        "train-decoder": ["real-data"],
        "generate": ["train-decoder", "expand-prompts"],
        "export": ["generate", "filter"],
        "downstream": ["baseline", "export"],
        "report": ["export", "evaluate", "downstream", "inspect"],
        "uplift": ["uplift-model@semantic", "uplift-model@depth", "uplift-model@keypoints"],
    }
    for stage, before in lock_deps.items():
        assert all(order.index(b) < order.index(stage) for b in before), order
    assert dvc_pipeline.stage_order(REPO) == order  # deterministic
    # Targets: the target and what it needs, nothing else.
    assert dvc_pipeline.stage_order(REPO, ["filter"]) == [
        s for s in order if s in {"real-data", "train-decoder", "expand-prompts", "generate", "filter"}
    ]
    assert not any(s.startswith("uplift") for s in dvc_pipeline.stage_order(REPO, ["curate", "report"]))


def _stage_functions_reaching(name: str) -> set[str]:
    """The ``datasetdm.stages`` functions that reference ``name`` themselves or through the module's own helpers."""
    tree = ast.parse((REPO / "datasetdm" / "stages.py").read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    refs = {f: {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} for f, node in funcs.items()}

    def reaches(f: str, seen: frozenset = frozenset()) -> bool:
        return name in refs[f] or any(g in funcs and g not in seen and reaches(g, seen | {f}) for g in refs[f])

    return {f for f in funcs if reaches(f)}


def test_every_stage_that_loads_the_backbone_depends_on_its_code_weights_and_settings():
    # A change to the sampler (datasetdm/backbones) must restale every stage that samples or
    # captures features, even when the decoder it retrains comes out byte-identical.
    loading = _stage_functions_reaching("load_backbone")
    checked = []
    for name in dvc_pipeline.stage_order(REPO):
        fn = STAGES[stage_command(name)]
        if getattr(fn, "func", fn).__name__ not in loading:
            continue
        stage = dvc_stage(name)
        assert {"datasetdm/backbones", "${backbone.model}"} <= set(stage["deps"]), name
        assert "backbone" in stage["params"], name
        checked.append(name)
    assert {"train-decoder", "generate", "evaluate", "inspect", "rounds", "steering"} <= set(checked), checked


def test_unknown_stage_is_one_line_naming_the_stages():
    with pytest.raises(DatasetDMError) as e:
        dvc_pipeline.stage_order(REPO, ["genrate"])
    msg = str(e.value)
    assert "\n" not in msg and "genrate" in msg and "generate" in msg and "dvc.yaml" in msg


def test_set_params_edits_params_yaml_as_dvc_exp_run_keeping_comments(tmp_path):
    root = project_copy(tmp_path)
    applied = dvc_pipeline.apply_params(root, ["generate.num_samples=12", "curate.min_quality=0.7"])
    assert applied == {"generate.num_samples": 12, "curate.min_quality": 0.7}
    text = (root / "params.yaml").read_text()
    raw = yaml.safe_load(text)
    assert raw["generate"]["num_samples"] == 12 and raw["curate"]["min_quality"] == 0.7
    assert "# the procedural shapes world" in text  # comments survive
    before = (root / "params.yaml").read_bytes()
    for bad in (["generate.num_samples=-3"], ["generate.no_such_key=1"], ["nosection.key=1"], ["generate"]):
        with pytest.raises(DatasetDMError) as e:
            dvc_pipeline.apply_params(root, bad)
        assert "\n" not in str(e.value) and "params.yaml" in str(e.value)
        assert (root / "params.yaml").read_bytes() == before  # a bad override changes nothing


def test_repro_stage_lets_dvc_decide_and_records_in_dvc_lock(tmp_path):
    root, raw = make_tiny_repo(tmp_path)
    run(root, "dvc", "init", "--no-scm", "-q")
    first = dvc_pipeline.repro_stage(root, "expand-prompts")
    assert first.ran and "expand-prompts" in yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert not dvc_pipeline.repro_stage(root, "expand-prompts").ran  # up to date: skipped
    assert run(root, "dvc", "status", "expand-prompts").strip().endswith("up to date.")

    dvc_pipeline.apply_params(root, ["prompts.num_prompts=5"])
    assert dvc_pipeline.is_stale(root, "expand-prompts")
    assert dvc_pipeline.repro_stage(root, "expand-prompts").ran
    assert len(load_prompts(root / "data/prompts.json")) == 5
    # ... and what the orchestrator ran, `dvc repro` sees as done.
    assert "Running stage" not in run(root, "dvc", "repro", "--single-item", "expand-prompts")
