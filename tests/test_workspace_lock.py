"""Two factory runs never interleave: real processes contend for one workspace.

Each test holds the workspace from a ``python -m datasetdm hold-workspace`` process (what
``make run`` runs) and starts a second run beside it: the second stops with one line
naming the first, or waits with ``--wait``; a SIGKILLed holder frees the workspace and
takes its command down with it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datasetdm.workspace_lock import HOLDER_FILE, WorkspaceBusy

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock and /proc: Linux")


def hold(*command: str, wait: bool = False) -> list[str]:
    """What ``make run`` runs, around ``command``."""
    return [sys.executable, "-m", "datasetdm", "hold-workspace", *(["--wait"] if wait else []), "--", *command]


def start_holder(root: Path, *command: str) -> subprocess.Popen:
    """A run holding ``root`` (its record written) whose command has started."""
    proc = subprocess.Popen(hold(*command), cwd=root, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (root / "started").exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the holder's command never started"
        time.sleep(0.05)
    return proc


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_second_run_stops_with_one_line_and_a_killed_holder_leaves_no_lock(tmp_path):
    sleeper = "echo $$ > child.pid; touch started; exec sleep 120"
    first = start_holder(tmp_path, "sh", "-c", sleeper)
    try:
        second = subprocess.run(hold("touch", "second-ran"), cwd=tmp_path, capture_output=True, text=True)
        assert second.returncode == 2
        lines = second.stderr.splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith(f"error: .datasetdm/run.lock: the workspace is in use by pid {first.pid} on "), (
            lines
        )
        assert "(sh -c " in lines[0] and "exec sleep 120" in lines[0] and " since 20" in lines[0], lines
        assert "--wait" in lines[0]
        assert not (tmp_path / "second-ran").exists()

        child = int((tmp_path / "child.pid").read_text())
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        # The holder's command does not outlive it (it would write unlocked): the kernel SIGTERMs it.
        assert wait_until(lambda: not running(child)), "the holder's command survived it"
    finally:
        first.kill()
        first.wait()

    assert json.loads((tmp_path / HOLDER_FILE).read_text())["pid"] == first.pid  # the dead run's record stays...
    third = subprocess.run(hold("touch", "third-ran"), cwd=tmp_path, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr  # ...and blocks nothing
    assert (tmp_path / "third-ran").exists()
    assert json.loads((tmp_path / HOLDER_FILE).read_text())["command"] == "touch third-ran"


def test_wait_queues_behind_the_holder_and_the_exit_code_passes_through(tmp_path):
    first = start_holder(tmp_path, "sh", "-c", "touch started; sleep 2; touch first-done")
    second = subprocess.run(
        hold("sh", "-c", "test -f first-done && exit 7", wait=True),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert first.wait(timeout=60) == 0
    assert second.returncode == 7, second.stderr  # 7: it ran, and only after the first had finished
    assert second.stderr.startswith(f"waiting for the workspace: in use by pid {first.pid} "), second.stderr


def test_sigterm_to_the_holder_stops_its_command(tmp_path):
    first = start_holder(tmp_path, "sh", "-c", "echo $$ > child.pid; touch started; exec sleep 120")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=20) == 128 + signal.SIGTERM
    assert not running(int((tmp_path / "child.pid").read_text()))


def test_the_factory_flow_refuses_while_another_process_holds_the_workspace(tmp_path):
    """The flow checks before it touches anything: not even its ``set_params`` edit lands."""
    from flows.factory import factory

    params = tmp_path / "params.yaml"
    params.write_text("generate:\n  num_samples: 6\n")
    before = params.read_bytes()
    first = start_holder(tmp_path, "sh", "-c", "touch started; exec sleep 120")
    try:
        with pytest.raises(WorkspaceBusy, match=f"in use by pid {first.pid} on .* since "):
            factory.fn(str(tmp_path), set_params=["generate.num_samples=3"])
    finally:
        first.kill()
        first.wait()
    assert params.read_bytes() == before
