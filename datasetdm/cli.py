"""``python -m datasetdm <stage> [--params params.yaml]``: one stage, one line of error.

This is what ``dvc.yaml`` runs. User errors (``DatasetDMError``) print as a single
line on stderr with exit code 2; anything else is a bug and keeps its traceback.
``python -m datasetdm hold-workspace [--wait] -- <command>`` runs a whole factory run
(``make run``: ``dvc repro curate report``) holding the workspace lock
(``datasetdm/workspace_lock.py``) and exits with the command's exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

from datasetdm.config import load_params
from datasetdm.cost import record_cost
from datasetdm.errors import DatasetDMError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hold-workspace"]:  # before the stages' imports (torch): a refusal must be instant
        return hold_workspace_main(argv[1:])
    from datasetdm import stages

    commands = [*stages.STAGES, "pretrain", "pretrain-curve", "train-inspector", "hold-workspace"]
    parser = argparse.ArgumentParser(prog="datasetdm", description="DatasetDM synthetic dataset factory")
    parser.add_argument("stage", choices=commands)
    parser.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    parser.add_argument("--device", default="cpu", help="pretrain only: torch device to train on (cpu, cuda, cuda:N)")
    parser.add_argument(
        "--until-step", type=int, default=None, help="pretrain only: stop (checkpointed) after this UNet step"
    )
    parser.add_argument(
        "--vae-from",
        default=None,
        metavar="FOLDER",
        help="pretrain only: train the UNet on this finished pipeline folder's VAE, skipping the VAE stages",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log the decisions stages take (shards reused or rebuilt, device placement, skips) on stderr",
    )
    args = parser.parse_args(argv)
    if args.until_step is not None and args.until_step < 1:
        parser.error("--until-step must be >= 1")
    with _verbose_logging() if args.verbose else contextlib.nullcontext():
        return _run(args, stages)


@contextlib.contextmanager
def _verbose_logging():
    """The library's INFO decisions on stderr, printed above (not through) the progress bars."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    log = logging.getLogger("datasetdm")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with logging_redirect_tqdm(loggers=[log]):
            yield
    finally:
        log.removeHandler(handler)


def _run(args: argparse.Namespace, stages) -> int:
    try:
        params = load_params(args.params)
        if args.stage == "pretrain":
            from datasetdm.backbones.pretrain_sd import pretrain_sd

            result = pretrain_sd(params, device=args.device, until_step=args.until_step, vae_from=args.vae_from)
        elif args.stage == "train-inspector":
            result = stages.train_inspector_stage(params)
        elif args.stage == "pretrain-curve":
            result = stages.pretrain_curve_stage(params)
        else:
            started = time.perf_counter()
            result = stages.STAGES[args.stage](params)
            seconds = time.perf_counter() - started
            made = result.get("made") if isinstance(result, dict) else None
            record_cost(Path(args.params).parent, args.stage, seconds, device=params.backbone.device, made=made)
    except DatasetDMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.stage}: {stages.summary(result)}")
    return 0


def hold_workspace_main(argv: list[str]) -> int:
    """``hold-workspace [--wait] -- <command>``: the command's exit code; 2 and one line if the workspace is taken."""
    from datasetdm.workspace_lock import run_holding

    parser = argparse.ArgumentParser(
        prog="datasetdm hold-workspace", description="run a command holding this workspace's factory-run lock"
    )
    parser.add_argument("--wait", action="store_true", help="wait for the run holding the workspace, not stop")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    try:
        return run_holding(command, wait=args.wait)
    except DatasetDMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
