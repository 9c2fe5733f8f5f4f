"""Strict settings files: a key given twice is refused at any depth, never silently overwritten."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from datasetdm import dvc_pipeline, stages
from datasetdm.config import params_from_dict
from datasetdm.errors import DatasetDMError
from datasetdm.strict_yaml import load_yaml, parse_yaml
from tests.conftest import REPO, tiny_raw
from tests.test_bad_inputs import snapshot
from tests.test_cli import one_error_line, run_cli

SUFFIX = "duplicate key (lines {} and {}); YAML would silently keep only the last"


def line_of(text: str, line: str, nth: int = 0) -> int:
    """1-based number of the ``nth`` line of ``text`` that reads exactly ``line``."""
    return [i + 1 for i, lin in enumerate(text.splitlines()) if lin == line][nth]


# Each edit takes the dumped tiny params and returns (text, dotted key, first line, second line).
def top_level_section(text: str) -> tuple[str, str, int, int]:
    text += "generate:\n  num_samples: 3\n"  # a second generate: section pasted at the end
    return text, "generate", line_of(text, "generate:"), line_of(text, "generate:", 1)


def nested_key(text: str) -> tuple[str, str, int, int]:
    text = text.replace("\nprompts:\n", "\nprompts:\n  num_prompts: 99\n", 1)
    return text, "prompts.num_prompts", line_of(text, "  num_prompts: 99"), line_of(text, "  num_prompts: 6")


def list_item_key(text: str) -> tuple[str, str, int, int]:
    text = text.replace("  classes:\n  - circle\n", "  classes:\n  - circle\n  - shape: square\n    shape: star\n", 1)
    return text, "world.classes[1].shape", line_of(text, "  - shape: square"), line_of(text, "    shape: star")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A workspace where expand-prompts already ran (its output must survive a refused re-run)."""
    raw = tiny_raw(tmp_path, tmp_path / "sd")
    stages.STAGES["expand-prompts"](params_from_dict(raw, source=str(tmp_path / "params.yaml")))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp_path


@pytest.mark.parametrize("edit", [top_level_section, nested_key, list_item_key])
def test_duplicate_key_in_params_is_one_line_naming_both_lines(
    workspace: Path, edit: Callable[[str], tuple[str, str, int, int]]
) -> None:
    params_file = workspace / "params.yaml"
    text, key, first, second = edit(params_file.read_text())
    assert first < second
    params_file.write_text(text)
    before = snapshot(workspace)

    line = one_error_line(run_cli("expand-prompts", "--params", str(params_file)))

    assert line == f"error: {params_file}: {key}: {SUFFIX.format(first, second)}"
    assert snapshot(workspace) == before  # data/prompts.json (and the params file) byte-identical


@pytest.mark.parametrize("name", ["params.yaml", "dvc.yaml", "dvc.lock", "prefect.yaml"])
def test_the_repos_yaml_loads_exactly_as_safe_load(name: str) -> None:
    path = REPO / name
    if not path.is_file():
        pytest.skip(f"{name} not in this checkout")
    assert load_yaml(path) == yaml.safe_load(path.read_text(encoding="utf-8"))


def test_merge_keys_and_aliases_are_not_duplicates() -> None:
    text = "base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  x: 3\nloop: &l [*l]\n"
    data = parse_yaml(text, "f.yaml")
    assert data["use"] == {"x": 3, "y": 2} == yaml.safe_load(text)["use"]
    assert data["loop"][0] is data["loop"]


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("a:\n  1: x\n  0x1: y\n", "a.0x1", (2, 3)),  # one integer key, written twice
        ("yes: 1\ntrue: 2\n", "true", (1, 2)),  # YAML 1.1 booleans: named as written
        ("a: [{b: 1, b: 2}]\n", "a[0].b", (1, 1)),  # flow style: both on one line
    ],
)
def test_keys_equal_as_values_are_duplicates(text: str, key: str, lines: tuple[int, int]) -> None:
    with pytest.raises(DatasetDMError) as e:
        parse_yaml(text, "f.yaml")
    assert str(e.value) == f"f.yaml: {key}: {SUFFIX.format(*lines)}"


def test_other_yaml_problems_stay_one_line() -> None:
    for text, words in (("a: [", "line 1: not valid YAML"), ("2024-13-45: 1\n", "not valid YAML (month")):
        with pytest.raises(DatasetDMError, match=re.escape(words)) as e:
            parse_yaml(text, "f.yaml")
        assert "\n" not in str(e.value)


def test_set_params_refuses_duplicates_in_the_file_and_in_a_value(tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text("generate:\n  num_samples: 3\n  num_samples: 4\n")
    with pytest.raises(DatasetDMError, match=re.escape(f"{params_file}: generate.num_samples: duplicate key")):
        dvc_pipeline.apply_params(tmp_path, ["generate.batch_size=2"])
    params_file.write_text("generate:\n  num_samples: 3\n")
    with pytest.raises(DatasetDMError, match=re.escape("generate.x: duplicate key (lines 1 and 1)")):
        dvc_pipeline.apply_params(tmp_path, ["generate={x: 1, x: 2}"])
    assert params_file.read_text() == "generate:\n  num_samples: 3\n"


def test_the_package_reads_yaml_only_through_the_strict_loader() -> None:
    """``yaml.safe_load`` anywhere in ``datasetdm/`` would be a reader that keeps the last duplicate."""
    loose = re.compile(r"\byaml\.(safe_load|load|full_load|unsafe_load)(_all)?\(")
    offenders = [
        str(p.relative_to(REPO))
        for p in sorted((REPO / "datasetdm").rglob("*.py"))
        if p.name != "strict_yaml.py" and loose.search(p.read_text(encoding="utf-8"))
    ]
    assert offenders == []
