"""Where a dataset came from, in version-control terms: git revision and DVC state.

The export stage records this in the dataset card, so a dataset found on a disk can
be traced to the commit whose code and ``params.yaml`` made it, and to the DVC remote
and content hashes from which ``dvc pull`` restores its inputs. Nothing here is time-
dependent: exporting again at the same commit gives the same card.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

from datasetdm.strict_yaml import load_yaml

logger = logging.getLogger(__name__)


def git_revision(root: str | Path = ".") -> dict[str, Any] | None:
    """``{"revision": sha, "dirty": bool}`` of the git work tree at ``root``, or ``None``.

    ``dirty`` ignores ``dvc.lock`` (DVC rewrites it during every ``dvc repro``) and
    untracked files: it says whether tracked code or params differ from the revision.
    """

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if not sha:
        logger.info("%s is not a git work tree (or git is missing): no revision in the provenance", root)
        return None
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock")
    return {"revision": sha, "dirty": bool(status)}


def dvc_info(root: str | Path = ".", deps: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """DVC version, default remote, and the DVC hashes of ``deps`` as ``dvc.lock`` records them.

    ``deps`` are paths written by earlier stages (for the export: the generated set and
    the filter decisions); their md5 is what ``dvc pull`` fetches. ``None`` outside a
    DVC project.
    """
    root = Path(root)
    if not (root / ".dvc").is_dir():
        logger.info("%s is not a DVC project: no DVC state in the provenance", root)
        return None
    import dvc
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        conf = repo.config
        remote = conf["core"].get("remote")
        url = conf["remote"].get(remote, {}).get("url") if remote else None
    if url and Path(url).is_absolute() and Path(url).resolve().is_relative_to(root.resolve()):
        url = Path(url).resolve().relative_to(root.resolve()).as_posix()  # a card must not name this machine's paths
    hashes: dict[str, str | None] = {}
    lock_file = root / "dvc.lock"
    lock = load_yaml(lock_file) if lock_file.is_file() else None
    for dep in deps:
        hashes[dep] = None
        for stage in (lock or {}).get("stages", {}).values():
            for out in stage.get("outs", []):
                if out.get("path") == dep:
                    hashes[dep] = out.get("md5")
    return {"version": dvc.__version__, "remote": remote, "remote_url": url, "inputs": hashes}


def repo_provenance(root: str | Path = ".", deps: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"git": git_revision(root), "dvc": dvc_info(root, deps)}
