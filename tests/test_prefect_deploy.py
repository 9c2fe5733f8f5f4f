"""Production orchestration with Prefect: a real server, work pool, deployments and worker.

``scripts/prefect_up.sh`` is started exactly as ``make serve`` starts it, but with a
temporary PREFECT_HOME (SQLite database, result storage) and a free port, and always
stopped again by ``scripts/prefect_down.sh``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.dvc_repo import make_tiny_repo, run

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_stack(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_PORT": str(port),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "FIFTYONE_DATABASE_DIR": str(tmp_path / "fiftyone-db"),
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_DATABASE_VALIDATION": "false",
        "PYTHON": sys.executable,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    try:
        up = subprocess.run(
            [str(REPO / "scripts/prefect_up.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
        )
        assert up.returncode == 0, up.stdout + up.stderr
        yield env
    finally:
        down = subprocess.run(
            [str(REPO / "scripts/prefect_down.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        print(down.stdout, down.stderr)
        for name in ("server", "worker"):
            log = tmp_path / "prefect-home/run" / f"{name}.log"
            if log.is_file():
                print(f"--- {name}.log (tail)\n" + "\n".join(log.read_text().splitlines()[-30:]))


def prefect(env: dict, *args: str, timeout: int = 120) -> str:
    proc = subprocess.run(
        [str(BIN / "prefect"), *args],
        cwd=REPO,
        env={**env, "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_deployment_runs_the_factory_through_a_worker(prefect_stack, tmp_path):
    env = prefect_stack
    deployments = prefect(env, "deployment", "ls")
    for name in (
        "factory/default",
        "factory/nightly-regeneration",
        "train-decoder/default",
        "expand-prompts/default",
        "generate/default",
        "filter/default",
        "export/default",
        "curate/default",
    ):
        assert name in deployments, deployments

    root, _ = make_tiny_repo(tmp_path)
    run(root, "dvc", "init", "--no-scm", "-q")

    def factory_run(*params: str) -> str:
        args = [a for p in ("project_dir=" + str(root), *params) for a in ("--param", p)]
        prefect(env, "deployment", "run", "factory/default", *args, "--watch", "--watch-timeout", "900", timeout=960)
        return (Path(env["PREFECT_HOME"]) / "run/worker.log").read_text()

    log = factory_run()
    runs = prefect(env, "flow-run", "ls")
    assert "COMPLETED" in runs.upper(), runs
    card = json.loads((root / "data/export/dataset.json").read_text())
    assert card["counts"]["generated"] == 6
    assert (root / "data/curated/curation.json").is_file()
    for stage in ("train-decoder", "generate", "export", "curate"):
        assert f"Task run '{stage}-" in log
    assert "Running stage 'generate'" in log  # DVC's own output, in the flow-run log
    lock = (root / "dvc.lock").read_bytes()
    assert "Running stage" not in run(root, "dvc", "repro", "curate", "report")  # DVC: all done

    # Run again: DVC finds every stage up to date, so nothing runs and dvc.lock is untouched.
    log = factory_run()
    assert log.count("stages run: none (all up to date)") == 1, log[-3000:]
    assert (root / "dvc.lock").read_bytes() == lock
    # A per-run setting (as dvc exp run -S): only the stage that reads it runs.
    log = factory_run('set_params=["curate.min_quality=0.9"]')
    assert "stages run: curate" in log, log[-3000:]

    report = prefect(env, "artifact", "inspect", "factory-report")
    assert "datasetdm factory run" in report and "mIoU" in report, report

    schedule = prefect(env, "deployment", "inspect", "factory/nightly-regeneration")
    assert "0 3 * * *" in schedule and "UTC" in schedule, schedule


@pytest.mark.slow
def test_nightly_regeneration_appends_one_steered_round_per_trigger(prefect_stack, tmp_path):
    """Two triggers of the nightly deployment: two rounds, each one DVC experiment, the second planned from both."""
    env = prefect_stack
    root, _ = make_tiny_repo(tmp_path)
    run(root, "git", "init", "-q")
    run(root, "git", "config", "user.name", "nightly")
    run(root, "git", "config", "user.email", "nightly@localhost")
    run(root, "dvc", "init", "-q")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-q", "-m", "tiny factory")

    def trigger() -> None:
        args = ["--param", f"project_dir={root}", "--param", "rounds=1"]
        prefect(
            env,
            "deployment",
            "run",
            "factory/nightly-regeneration",
            *args,
            "--watch",
            "--watch-timeout",
            "900",
            timeout=960,
        )

    trigger()
    trigger()
    log = (Path(env["PREFECT_HOME"]) / "run/worker.log").read_text()
    assert "regeneration round 1: experiment round-001" in log and "regeneration round 2: experiment round-002" in log
    plans = [json.loads((root / f"data/rounds/round-00{r}/plan.json").read_text()) for r in (1, 2)]
    for r in (1, 2):
        assert (root / f"data/rounds/round-00{r}/round.json").is_file()
    # the second round is planned from rounds 0 and 1: where the signals moved, the plan moved
    assert plans[0]["signals"] != plans[1]["signals"]
    assert plans[0]["prompts"] != plans[1]["prompts"] or plans[0]["class_shares"] != plans[1]["class_shares"]
    shown = run(root, "dvc", "exp", "show", "--csv")
    assert "round-001" in shown and "round-002" in shown, shown
    metrics = json.loads((root / "metrics/rounds.json").read_text())
    assert metrics["rounds"] == 2 and set(metrics["fiftyone_datasets"]) == {"round_1", "round_2"}
