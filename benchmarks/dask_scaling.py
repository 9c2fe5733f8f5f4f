"""Sharded generation on 1 vs 2 local Dask workers: wall time and speed-up.

Uses the trained decoder and prompts of the current params (run ``make run`` first)
with ``generate.num_samples`` / ``shard_size`` overridden, writing into a temporary
folder; each configuration starts its own local cluster (included in the time, as a
user pays it). Checks that both runs give byte-identical shards.

    python benchmarks/dask_scaling.py [--params params.yaml] [--samples 64] [--shard-size 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasetdm.config import load_params  # noqa: E402
from datasetdm.io import sha256_dir  # noqa: E402
from flows.generate import generate_sharded  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=8)
    args = ap.parse_args()
    params = load_params(args.params)
    times, hashes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            gen = dataclasses.replace(
                params.generate,
                num_samples=args.samples,
                shard_size=args.shard_size,
                out=str(Path(tmp) / f"gen-{workers}"),
            )
            # The user's params file with only the generate section changed (validated on load).
            raw = yaml.safe_load(Path(args.params).read_text())
            raw["generate"] = {
                **raw.get("generate", {}),
                "num_samples": gen.num_samples,
                "shard_size": gen.shard_size,
                "out": gen.out,
            }
            path = Path(tmp) / f"params-{workers}.yaml"
            path.write_text(yaml.safe_dump(raw))
            t0 = time.perf_counter()
            result = generate_sharded(str(path), workers=workers)
            times[workers] = time.perf_counter() - t0
            hashes[workers] = sha256_dir(gen.out)
            print(
                f"{workers} worker(s): {result['num_samples']} samples in {result['shards']} shards, "
                f"{times[workers]:.1f} s",
                flush=True,
            )
    print(
        f"1 worker {times[1]:.1f} s, 2 workers {times[2]:.1f} s, speed-up x{times[1] / times[2]:.2f}; "
        f"identical output: {hashes[1] == hashes[2]}"
    )
    return 0 if hashes[1] == hashes[2] else 1


if __name__ == "__main__":
    sys.exit(main())
