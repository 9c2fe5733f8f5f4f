"""DVC as the project ships it: a default local remote, push/pull, experiments, provenance.

Slow: the tiny factory through ``dvc repro`` in a temporary git + DVC repo laid out like
this one (``tests/test_end_to_end.py`` does the same for incremental rebuilds).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from datasetdm.io import sha256_dir, sha256_file
from tests.conftest import REPO
from tests.dvc_repo import make_tiny_repo, run

pytestmark = pytest.mark.slow

CACHED_OUTS = (
    "data/real",
    "models/decoder",
    "data/prompts.json",
    "data/generated",
    "data/filtered.json",
    "data/export",
    "data/curated",
)


def hashes(root: Path) -> dict[str, str]:
    return {o: sha256_dir(root / o) if (root / o).is_dir() else sha256_file(root / o) for o in CACHED_OUTS}


def test_push_delete_pull_is_byte_identical_and_experiments_run(tmp_path):
    root, _ = make_tiny_repo(tmp_path)
    (root / ".gitignore").write_text("__pycache__/\n/.dvc-remote/\n")
    run(root, "git", "init", "-q")
    run(root, "dvc", "init", "-q")
    # The project's own .dvc/config (default remote "local" in ../.dvc-remote) and plot template.
    shutil.copy(REPO / ".dvc/config", root / ".dvc/config")
    shutil.copytree(REPO / ".dvc/plots", root / ".dvc/plots", dirs_exist_ok=True)
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "factory")
    head = run(root, "git", "rev-parse", "HEAD").strip()

    run(root, "dvc", "repro")
    card = json.loads((root / "data/export/dataset.json").read_text())
    prov = card["provenance"]
    assert prov["git"] == {"revision": head, "dirty": False}
    assert prov["dvc"]["remote"] == "local" and prov["dvc"]["remote_url"] == ".dvc-remote"
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert prov["dvc"]["inputs"]["data/generated"] == lock["stages"]["generate"]["outs"][0]["md5"]

    before = hashes(root)
    pushed = run(root, "dvc", "push")
    assert (root / ".dvc-remote/files/md5").is_dir(), pushed
    for out in CACHED_OUTS:
        path = root / out
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(root / ".dvc/cache")  # nothing local: everything must come from the remote
    run(root, "dvc", "pull")
    assert hashes(root) == before
    assert "up to date" in run(root, "dvc", "status").lower() or "unchanged" in run(root, "dvc", "status").lower()

    # An experiment with one setting changed, as a user would run it.
    run(root, "git", "add", "dvc.lock")
    run(root, "git", "commit", "-qm", "lock")
    exp = run(root, "dvc", "exp", "run", "-S", "generate.num_samples=5")
    assert "Running stage 'generate'" in exp
    assert json.loads((root / "data/export/dataset.json").read_text())["counts"]["generated"] == 5
    shown = json.loads(run(root, "dvc", "exp", "show", "--json"))
    assert "5" in json.dumps(shown)

    # The one plot renders offline (no CDN): dvc plots show --json, then vl-convert.
    out = root / "plots"
    run(root, sys.executable, str(REPO / "scripts/render_plots.py"), "--out", str(out))
    assert (out / "data_filtered.json.png").stat().st_size > 1000
