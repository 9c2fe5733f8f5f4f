"""The command line a user (and dvc.yaml) runs: stages chain, and bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "datasetdm", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda raw: raw["generate"].update(num_samples=-3), "generate.num_samples"),
        (lambda raw: raw["world"].update(classes=["circle", "dodecahedron"]), "world.classes"),
        (lambda raw: raw.update(genrate={"num_samples": 3}), "genrate"),
        (lambda raw: raw["decoder"].update(lr="fast"), "decoder.lr"),
    ],
)
def test_bad_params_give_one_line_naming_the_key(tiny_params_file, edit, expected):
    raw = yaml.safe_load(tiny_params_file.read_text())
    edit(raw)
    tiny_params_file.write_text(yaml.safe_dump(raw))
    line = one_error_line(run_cli("expand-prompts", "--params", str(tiny_params_file)))
    assert str(tiny_params_file) in line and expected in line


def test_yaml_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("world: {image_size: 64\nreal: [")
    line = one_error_line(run_cli("real-data", "--params", str(bad)))
    assert str(bad) in line


def test_missing_labelled_set_is_one_line_and_writes_nothing(tiny_params_file, tmp_path):
    line = one_error_line(run_cli("train-decoder", "--params", str(tiny_params_file)))
    assert "real" in line
    assert not (tmp_path / "models").exists()


def test_corrupt_labelled_set_keeps_the_old_decoder(tiny_params_file, tmp_path):
    """A failed re-train must leave the decoder that was there untouched."""
    for stage in ("real-data", "train-decoder"):
        assert run_cli(stage, "--params", str(tiny_params_file)).returncode == 0
    decoder_dir = tmp_path / "models/decoder"
    before = {p.name: p.read_bytes() for p in decoder_dir.iterdir()}
    annotations = tmp_path / "data/real/train/annotations.json"
    annotations.write_text(annotations.read_text()[:200])  # truncated JSON
    line = one_error_line(run_cli("train-decoder", "--params", str(tiny_params_file)))
    assert "annotations.json" in line
    assert {p.name: p.read_bytes() for p in decoder_dir.iterdir()} == before


def test_unknown_class_in_a_prompt_names_the_prompt(tiny_params_file, tmp_path):
    for stage in ("real-data", "train-decoder", "expand-prompts"):
        assert run_cli(stage, "--params", str(tiny_params_file)).returncode == 0, stage
    prompts_file = tmp_path / "data/prompts.json"
    data = json.loads(prompts_file.read_text())
    data["prompts"][1]["prompt"] = "a red dodecahedron"
    prompts_file.write_text(json.dumps(data))
    line = one_error_line(run_cli("generate", "--params", str(tiny_params_file)))
    assert "prompts.json" in line and "dodecahedron" in line
    assert not (tmp_path / "data/generated/manifest.json").exists()


def test_verbose_logs_the_decisions(tiny_params_file):
    raw = yaml.safe_load(tiny_params_file.read_text())
    raw["prompts"]["num_prompts"] = 100
    tiny_params_file.write_text(yaml.safe_dump(raw))
    quiet = run_cli("expand-prompts", "--params", str(tiny_params_file))
    assert quiet.returncode == 0 and "datasetdm.prompts" not in quiet.stderr
    loud = run_cli("expand-prompts", "--params", str(tiny_params_file), "--verbose")
    assert loud.returncode == 0, loud.stderr
    assert "datasetdm.prompts: prompts.num_prompts is 100, but the world has only 14 distinct prompts" in loud.stderr


def test_each_stage_run_records_its_cost_and_the_report_shows_it(tiny_params_file):
    """The CLI keeps each stage's wall time beside params.yaml (not a DVC output); the report turns it into a table."""
    from datasetdm.cost import COST_DIR, cost_summary, read_costs
    from datasetdm.report import _cost_section

    root = tiny_params_file.parent
    proc = run_cli("expand-prompts", "--params", str(tiny_params_file))
    assert proc.returncode == 0, proc.stderr
    record = json.loads((root / COST_DIR / "expand-prompts.json").read_text())
    # A stage can take under a millisecond (expand-prompts does): the time is >= 0, not > 0.
    assert record["stage"] == "expand-prompts" and 0 <= record["seconds"] < 600 and "cores" in record["machine"]
    assert run_cli("generate", "--params", str(tiny_params_file)).returncode == 2  # a failed run records nothing
    assert set(read_costs(root)) == {"expand-prompts"}

    costs = {
        "generate": {"stage": "generate", "seconds": 90.0, "machine": "cpu x"},
        "filter": {"stage": "filter", "seconds": 10.0, "machine": "cpu x"},
        "evaluate": {"stage": "evaluate", "seconds": 50.0, "machine": "cpu x"},
        "uplift": {"stage": "uplift", "seconds": 3000.0, "machine": "cpu x"},  # on demand: not in the total
    }
    summary = cost_summary(costs, generated=100, kept=80)
    assert summary["images_per_hour"] == 4000 and summary["making_seconds"] == 100.0
    assert summary["seconds_per_1000_kept"] == 1250.0 and summary["total_seconds"] == 150.0
    text = "\n".join(_cost_section(costs, {"generated": 100, "kept": 80}))
    assert (
        "| generate | 90.0 |" in text
        and "| **total** | **150.0** |" in text
        and "| uplift (on demand, not in the total) | 3000.0 |" in text
        and "4,000 images per hour" in text
        and "1,250 s per 1,000 kept" in text
    )
    assert "reused" not in text

    # A generate run that resumed a killed one made only some images: images per hour counts those alone.
    costs["generate"]["made"] = 45
    summary = cost_summary(costs, generated=100, kept=80)
    assert summary["images_per_hour"] == 1800 and summary["reused"] == 55
    assert "reused 55 images" in "\n".join(_cost_section(costs, {"generated": 100, "kept": 80}))
    costs["generate"]["made"] = 0  # every shard reused: no rate to give
    assert cost_summary(costs, generated=100, kept=80)["images_per_hour"] is None
