"""Writes that run out of space: one line naming the output, the previous output untouched.

A real stage runs through the CLI under a file-size limit (``RLIMIT_FSIZE``, SIGXFSZ
ignored, so ``write`` fails with EFBIG exactly as a full disk fails with ENOSPC); the
mapping of each out-of-space errno is checked on ``atomic_path`` itself.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from datasetdm.errors import DatasetDMError
from datasetdm.io import OutOfSpaceError, atomic_path, write_json
from tests.conftest import tiny_raw


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (a leftover temporary folder too) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def limit_file_size(size: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return preexec


def run_stage(stage: str, root: Path, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "datasetdm", stage, "--params", str(root / "params.yaml")],
        cwd=root,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=limit_file_size(max_file_bytes) if max_file_bytes else None,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_stage_out_of_space_is_one_line_naming_the_output_and_keeps_the_previous_one(tmp_path):
    raw = tiny_raw(tmp_path, tmp_path / "no-backbone-needed")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert run_stage("expand-prompts", tmp_path).returncode == 0
    raw["prompts"]["num_prompts"] = 8  # a rerun would write a different file
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    before = snapshot(tmp_path)

    proc = run_stage("expand-prompts", tmp_path, max_file_bytes=64)

    out = raw["prompts"]["out"]
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.splitlines() == [
        f"error: {out}: file too large for the filesystem or the process's file-size limit while writing; "
        f"the previous {out} is untouched"
    ]
    assert snapshot(tmp_path) == before  # no byte changed, no temporary left
    assert run_stage("expand-prompts", tmp_path).returncode == 0  # with room, the same run does write
    assert Path(out).read_bytes() != before[str(Path(out).relative_to(tmp_path))]


@pytest.mark.parametrize(
    "code, says",
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EFBIG, "file too large"),
    ],
)
def test_out_of_space_inside_a_folder_names_the_folder_and_keeps_the_old_one(tmp_path, code, says):
    """The error comes from a file written inside the folder's temporary: the line names the folder."""
    export = tmp_path / "export"
    write_json(export / "dataset.json", {"samples": 3})
    before = snapshot(tmp_path)

    with pytest.raises(OutOfSpaceError) as info:
        with atomic_path(export) as tmp:
            tmp.mkdir()
            write_json(tmp / "annotations.json", {})
            with atomic_path(tmp / "dataset.json"):
                raise OSError(code, os.strerror(code))

    assert str(info.value).startswith(f"{export}: {says}")
    assert str(info.value).endswith(f"while writing; the previous {export} is untouched")
    assert isinstance(info.value, DatasetDMError) and isinstance(info.value.__cause__, OSError)
    assert snapshot(tmp_path) == before


def test_out_of_space_for_a_new_output_says_nothing_was_written(tmp_path):
    with pytest.raises(OutOfSpaceError, match="nothing was written to"):
        with atomic_path(tmp_path / "metrics.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_are_not_reported_as_out_of_space(tmp_path):
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "metrics.json"):
            raise PermissionError(errno.EACCES, "Permission denied")


@pytest.mark.slow
def test_export_out_of_space_names_the_export_folder_and_keeps_it(tmp_path, tiny_backbone_dir):
    """A stage whose output is a folder of many files: the line names the folder, every old file stays."""
    from datasetdm import stages
    from datasetdm.config import params_from_dict

    shutil.copytree(tiny_backbone_dir, tmp_path / "sd")
    raw = tiny_raw(tmp_path, tmp_path / "sd")
    params = params_from_dict(raw, source=str(tmp_path / "params.yaml"))
    for stage in ("real-data", "train-decoder", "expand-prompts", "generate", "filter", "export"):
        stages.STAGES[stage](params)
    raw["export"]["grid_samples"] = 2  # a rerun would write another grid and card
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    before = snapshot(tmp_path)

    proc = run_stage("export", tmp_path, max_file_bytes=64)

    out = raw["export"]["out"]
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.splitlines() == [
        f"error: {out}: file too large for the filesystem or the process's file-size limit while writing; "
        f"the previous {out} is untouched"
    ]
    assert snapshot(tmp_path) == before
