"""Peak memory of the generate stage at N and factor x N samples: flat in N if shards stream.

Runs ``python -m datasetdm generate`` twice in subprocesses, on the user's params with
only ``generate`` (num_samples, shard_size, out) and ``backbone.steps`` changed, writing
into a temporary folder, and prints each run's peak resident set size (``os.wait4``
gives the rusage of that one child) and the ratio. Generation keeps the per-shard
records and the manifest entries; images, masks and features must not pile up, so the
ratio should stay near 1. Uses the trained decoder and prompts of the params (run the
train-decoder and expand-prompts stages, or ``make run``, first).

    python benchmarks/generation_memory.py [--params params.yaml] [--samples 64] [--factor 4] [--steps 4] \
        [--shard-size 16]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datasetdm.config import params_from_dict  # noqa: E402


def run_generate(params_file: Path, log: Path) -> tuple[float, float]:
    """Run the generate stage once; return (peak RSS in MiB, wall seconds)."""
    t0 = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "datasetdm", "generate", "--params", str(params_file)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        # RUSAGE_CHILDREN would report the largest child so far; wait4 reports this one alone.
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"generate failed (exit {proc.returncode}):\n{log.read_text()[-2000:]}")
    return usage.ru_maxrss / 1024, seconds  # Linux reports KiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--samples", type=int, default=64, help="N")
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="DDIM steps (memory does not depend on them; time does)")
    ap.add_argument("--shard-size", type=int, default=16)
    args = ap.parse_args()
    base = yaml.safe_load(Path(args.params).read_text())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.samples, args.factor * args.samples):
            raw = {
                **base,
                "generate": {
                    **base.get("generate", {}),
                    "num_samples": n,
                    "shard_size": args.shard_size,
                    "out": str(Path(tmp) / f"gen-{n}"),
                },
                "backbone": {**base.get("backbone", {}), "steps": args.steps},
            }
            params = params_from_dict(raw, source=args.params)  # the same validation the stage applies
            path = Path(tmp) / f"params-{n}.yaml"
            path.write_text(yaml.safe_dump(raw))
            rss, seconds = run_generate(path, Path(tmp) / f"stderr-{n}.txt")
            results[n] = rss
            print(
                f"N={n:5d}: peak RSS {rss:7.1f} MiB, {seconds:5.1f} s "
                f"(batch {params.generate.batch_size}, shard {args.shard_size}, {args.steps} steps)",
                flush=True,
            )
    small, large = results[args.samples], results[args.factor * args.samples]
    size = params.world.image_size
    per_sample = (large - small) * 2**20 / ((args.factor - 1) * args.samples)
    print(
        f"ratio {args.factor}N/N: {large / small:.3f}; growth {per_sample / 1024:.1f} KiB per extra sample "
        f"(one image + mask in memory: {size * size * 4 / 1024:.0f} KiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
