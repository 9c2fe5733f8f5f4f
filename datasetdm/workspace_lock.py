"""One factory run per workspace at a time: a lock held for a whole run, not one DVC command.

DVC locks the repo for the length of one ``dvc`` command. A factory run is many: a
Prefect flow calls ``dvc repro --single-item`` once per stage and may first edit
``params.yaml`` (``set_params``), so without a lock of its own a ``make run`` could
start between two of its stages, or its params edit land in the middle of a
``make run``. Every factory run (``make run``, ``make uplift``, each flow in
``flows/``) holds this lock for its whole length: the second one stops at once with
one line naming the run that holds the workspace, or waits if asked.

The lock is ``flock`` on ``.datasetdm/run.lock``, so the kernel drops it when the
holder dies, even by SIGKILL: a killed run never leaves a stale lock. Who holds it
(pid, command, start time, host) is written beside it, atomically, in
``.datasetdm/run.json``; that record is only read while the lock is taken, so one
left behind by a dead run blocks nothing. ``flock`` works between processes on one
machine: two machines sharing a workspace over NFS are not covered.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from datasetdm.errors import DatasetDMError
from datasetdm.io import write_json

logger = logging.getLogger(__name__)

LOCK_FILE = Path(".datasetdm/run.lock")
HOLDER_FILE = Path(".datasetdm/run.json")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Signals a holder passes on to its child: how a scheduler or `kill` stops a run.
_FORWARDED = (signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class Holder:
    """The run that holds (or last held) the workspace; ``since`` is UTC, ISO 8601."""

    pid: int
    command: str
    since: str
    host: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} ({self.command}) since {self.since}"


class WorkspaceBusy(DatasetDMError):
    """Another run holds the workspace."""


@contextlib.contextmanager
def hold_workspace(root: str | Path = ".", *, command: str, wait: bool = False) -> Iterator[Holder]:
    """Hold the workspace lock of the project at ``root`` while the block runs.

    ``command`` says what this run is, for the message a second run prints. If another
    run holds the lock: raise ``WorkspaceBusy`` naming it, or, with ``wait``, log that
    and block until it ends. Not reentrant: a nested hold in the same process is refused
    like any other second run.
    """
    lock_path = Path(root) / LOCK_FILE
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _acquire(fd, Path(root), lock_path, wait)
        holder = Holder(os.getpid(), command, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), socket.gethostname())
        write_json(Path(root) / HOLDER_FILE, asdict(holder))
        logger.info("workspace %s held by %s", Path(root).resolve(), holder.describe())
        yield holder
    finally:
        os.close(fd)  # releases the flock


def _acquire(fd: int, root: Path, lock_path: Path, wait: bool) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    who = describe_holder(root)
    if not wait:
        message = f"the workspace is in use by {who}; rerun when it ends, or queue behind it with --wait"
        raise WorkspaceBusy(lock_path, None, message)
    logger.warning("waiting for the workspace: in use by %s", who)
    fcntl.flock(fd, fcntl.LOCK_EX)


def describe_holder(root: str | Path = ".") -> str:
    """The holder's record as one phrase; tolerant of a record missing or being replaced right now."""
    try:
        return Holder(**json.loads((Path(root) / HOLDER_FILE).read_text(encoding="utf-8"))).describe()
    except (OSError, ValueError, TypeError):
        return "another run (its record is not written yet)"


def run_holding(command: list[str], *, root: str | Path = ".", wait: bool = False) -> int:
    """Run ``command`` while holding the workspace; return its exit code (128 + signal if killed).

    The lock stays in this process (a forked DVC daemon must not inherit it and hold
    the workspace after the run). So that the run cannot outlive its lock, the child
    gets SIGTERM if this process dies (Linux), SIGTERM and SIGHUP sent here are passed
    on, and Ctrl-C, which the terminal already sends the child, is left to the child.
    """
    with hold_workspace(root, command=shlex.join(command), wait=wait):
        try:
            proc = subprocess.Popen(command, preexec_fn=die_with(os.getpid()))
        except FileNotFoundError as e:
            raise DatasetDMError(command[0], None, "command not found") from e
        previous = {s: signal.signal(s, lambda signum, _frame: proc.send_signal(signum)) for s in _FORWARDED}
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            code = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return 128 - code if code < 0 else code


def die_with(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGTERM the child when ``parent`` dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None

    def preexec() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(128 + signal.SIGTERM)

    return preexec
