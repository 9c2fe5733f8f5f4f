"""``python -m datasetdm <stage> [--params params.yaml]``: one stage, one line of error.

This is what ``dvc.yaml`` runs. User errors (``DatasetDMError``) print as a single
line on stderr with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from datasetdm.config import load_params
from datasetdm.errors import DatasetDMError


def main(argv: list[str] | None = None) -> int:
    from datasetdm import stages

    commands = [*stages.STAGES, "pretrain", "pretrain-curve", "train-inspector"]
    parser = argparse.ArgumentParser(prog="datasetdm", description="DatasetDM synthetic dataset factory")
    parser.add_argument("stage", choices=commands)
    parser.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    parser.add_argument("--device", default="cpu", help="pretrain only: torch device to train on (cpu, cuda, cuda:N)")
    parser.add_argument(
        "--until-step", type=int, default=None, help="pretrain only: stop (checkpointed) after this UNet step"
    )
    args = parser.parse_args(argv)
    if args.until_step is not None and args.until_step < 1:
        parser.error("--until-step must be >= 1")
    try:
        params = load_params(args.params)
        if args.stage == "pretrain":
            from datasetdm.backbones.pretrain_sd import pretrain_sd

            result = pretrain_sd(params, device=args.device, until_step=args.until_step)
        elif args.stage == "train-inspector":
            result = stages.train_inspector_stage(params)
        elif args.stage == "pretrain-curve":
            result = stages.pretrain_curve_stage(params)
        else:
            result = stages.STAGES[args.stage](params)
    except DatasetDMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.stage}: {stages.summary(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
