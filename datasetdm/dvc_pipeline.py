"""``dvc.yaml`` is the factory's one pipeline graph; an orchestrator asks DVC what to run.

Prefect (``flows/``) takes the stages and their order from DVC's own graph and brings
each stage up to date with ``dvc repro --single-item``, so DVC alone decides what is
stale and ``dvc.lock`` records what ran, whichever orchestrator ran it: a scheduled
Prefect run and a colleague's ``dvc repro`` agree on what is done. Per-run settings
are applied to ``params.yaml`` as ``dvc exp run -S`` applies them (DVC's own
comment-keeping YAML editor), checked by the same parser every stage uses.

Nothing here imports Prefect: the tasks in ``tasks/`` are thin wrappers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasetdm.errors import DatasetDMError

logger = logging.getLogger(__name__)

PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class StageRun:
    """What bringing one stage up to date did: ``ran`` is False when DVC found it up to date."""

    stage: str
    ran: bool
    seconds: float


@contextlib.contextmanager
def _repo(root: str | Path) -> Iterator[Any]:
    """DVC's repo object, used from inside ``root`` (DVC resolves outputs against the working directory)."""
    from dvc.repo import Repo

    if not (Path(root) / "dvc.yaml").is_file():
        raise DatasetDMError(Path(root) / "dvc.yaml", None, "not found: the factory runs in a DVC project")
    with contextlib.chdir(root), Repo(".") as repo:
        yield repo


def stage_order(root: str | Path = ".", targets: list[str] | None = None) -> list[str]:
    """The stages of ``dvc.yaml`` (or only ``targets`` and what they depend on), dependencies first.

    Ties are broken by the order of ``dvc.yaml``, so the order is the same on every run.
    """
    import networkx as nx

    with _repo(root) as repo:
        graph = repo.index.graph  # edges run from a stage to the stages it depends on
        by_name = {stage.addressing: stage for stage in graph.nodes}
        position = {name: i for i, name in enumerate(by_name)}
        keep = set(by_name)
        if targets:
            unknown = [t for t in targets if t not in by_name]
            if unknown:
                raise DatasetDMError("dvc.yaml", unknown[0], f"no such stage (stages: {', '.join(by_name)})")
            keep = {t for t in targets} | {d.addressing for t in targets for d in nx.descendants(graph, by_name[t])}
        order = nx.lexicographical_topological_sort(graph.reverse(copy=True), key=lambda s: position[s.addressing])
        return [stage.addressing for stage in order if stage.addressing in keep]


def is_stale(root: str | Path, stage: str) -> bool:
    """Whether DVC would run ``stage`` (changed params, deps, outputs or command; never run)."""
    with _repo(root) as repo:
        status = repo.status(targets=[stage])
    if status:
        logger.info("%s: stale (%s)", stage, status.get(stage, status))
    return bool(status)


def _dvc(root: str | Path, *args: str) -> None:
    """Run ``dvc <args>`` in ``root`` with this interpreter, its output line by line to the log."""
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    from datasetdm.workspace_lock import die_with

    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", *args],
        preexec_fn=die_with(os.getpid()),  # a killed flow takes its dvc command down with it
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            logger.info("%s", line)
            tail = (tail + [line])[-5:]
    if proc.wait() != 0:
        last = next((t for t in reversed(tail) if t.startswith("ERROR") or "Error" in t), tail[-1] if tail else "")
        raise DatasetDMError("dvc.yaml", args[-1], f"dvc {' '.join(args)} failed: {last}")


def repro_stage(root: str | Path, stage: str) -> StageRun:
    """Bring one stage up to date: ``dvc repro --single-item`` if DVC finds it stale, nothing otherwise."""
    start = time.monotonic()
    if not is_stale(root, stage):
        logger.info("%s: up to date (dvc.lock), skipped", stage)
        return StageRun(stage, False, time.monotonic() - start)
    _dvc(root, "repro", "--single-item", stage)
    return StageRun(stage, True, time.monotonic() - start)


def commit_stage(root: str | Path, stage: str) -> None:
    """Record outputs made outside ``dvc repro`` (generation mapped over Dask) in ``dvc.lock``."""
    _dvc(root, "commit", "--force", stage)


def apply_params(root: str | Path, overrides: list[str]) -> dict[str, Any]:
    """Set ``key.path=value`` overrides in ``params.yaml`` as ``dvc exp run -S`` does; return them.

    The edited file is checked by the factory's own parser before it replaces the old
    one (written to a temporary file, then renamed), so a bad override leaves
    ``params.yaml`` as it was and stops with one line.
    """
    from dvc.utils.serialize import dumps_yaml, parse_yaml_for_update

    from datasetdm.config import params_from_dict
    from datasetdm.io import atomic_path
    from datasetdm.strict_yaml import load_yaml, parse_yaml

    if not overrides:
        return {}
    path = Path(root) / PARAMS_FILE
    load_yaml(path)  # a duplicate key or bad YAML is our one line, before DVC's round-trip parser sees it
    data = parse_yaml_for_update(path.read_text(encoding="utf-8"), str(path))
    applied: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise DatasetDMError(path, item, "an override is key.path=value (as dvc exp run -S)")
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise DatasetDMError(path, key, f"no section {part!r} to set a key in")
            node = node[part]
        node[parts[-1]] = applied[key] = parse_yaml(text, path, prefix=key)
    text = dumps_yaml(data)
    params_from_dict(parse_yaml(text, path), source=str(path))  # a bad value stops here, params.yaml untouched
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    logger.info("params.yaml overrides applied: %s", applied)
    return applied


def run_experiment(root: str | Path, stage: str, name: str | None = None) -> None:
    """``dvc exp run <stage>`` in the workspace: one DVC experiment (a git ref with params, dvc.lock and
    metrics), listed by ``dvc exp show`` beside the others.

    Set its parameters with ``apply_params`` first: they are checked there, and the
    experiment records the workspace's params.yaml as it then is.
    """
    if not (Path(root) / ".git").exists():
        raise DatasetDMError(
            Path(root), "git", "not a git repository: a regeneration round is a DVC experiment (git init, commit)"
        )
    _dvc(root, "exp", "run", *(("--name", name) if name else ()), stage)
