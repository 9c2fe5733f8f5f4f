"""A temporary DVC repo laid out like this one, running the tiny factory (slow tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, TINY_INSPECTOR, build_tiny_backbone, build_tiny_inspector, tiny_raw


def run(root: Path, *args: str) -> str:
    """Run ``dvc ...`` (through this interpreter) or another command in ``root``; fail the test on error."""
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(root),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "FIFTYONE_DATABASE_DIR": str(root.parent / "fiftyone-db"),
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_DATABASE_VALIDATION": "false",
        # dvc.yaml runs `python`: this interpreter's, as `make test` puts the venv first on PATH
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else list(args)
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def make_tiny_repo(tmp_path: Path) -> tuple[Path, dict]:
    """The package, dvc.yaml, a tiny backbone and tiny params (relative paths) in ``tmp_path/repo``."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copytree(REPO / "datasetdm", root / "datasetdm", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    build_tiny_backbone(root / "models/tiny-backbone")
    build_tiny_inspector().save(root / "models" / TINY_INSPECTOR)
    raw = tiny_raw(Path("."), Path("models/tiny-backbone"))
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root, raw


def dvc_stage(name: str) -> dict:
    """One stage of this repo's ``dvc.yaml`` under the name DVC gives it (``uplift-model@depth``: the
    ``foreach`` body with ``${item}`` filled in)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    base, _, item = name.partition("@")
    spec = stages[base]["do"] if "foreach" in stages[base] else stages[base]
    return yaml.safe_load(yaml.safe_dump(spec).replace("${item}", item))


def stage_command(name: str) -> str:
    """What a DVC stage runs, ``python -m datasetdm <command>``: its key in ``datasetdm.stages.STAGES``."""
    return dvc_stage(name)["cmd"].split()[-1]
