#!/bin/bash
# The steering experiment (make steering) where synthetic data is scarce.
#
# At the default size the synthetic set saturates the audit model: round 0 keeps about 900
# samples and two more uniform rounds of 400 moved held-out mIoU by less than a point, so
# how a round's samples are allotted cannot show. Users with many classes and a small budget
# per class are in the other regime. This runs the same experiment, same code and seeds, with
# SAMPLES samples in round 0 (generate.num_samples) and in each round (steer.budget), in a
# clone of HEAD that shares this project's DVC cache (the decoder, real sets and prompts come
# from it; nothing in this workspace is touched but the files it writes):
#   metrics/steering_scarce.json       metrics/steering.json's fields and round0_samples
#   metrics/steering_scarce_plot.json  per-class held-out IoU by round, steered vs uniform
#   metrics/steering_scarce_results.json  every scored model's held-out IoU (per arm, seed, round)
#
#     scripts/steering_scarce.sh [SAMPLES] [CANDIDATES] [SHAPE]   (default 100, 1, 0; about 60 min on 2 cores)
#
# CANDIDATES > 1 sets steer.candidates (steering by quality as well as quantity: the steered
# rounds draw up to CANDIDATES images per slot of a weak prompt and keep the best); SHAPE
# (steer.shape_check) 1 ranks them by filter score x shape fidelity, 0 by the score alone.
# The files are then named metrics/steering_scarce_candidates<CANDIDATES>[_shape]*.json.
set -euo pipefail
n=${1:-100}
c=${2:-1}
shape=${3:-0}
name=steering_scarce$([ "$c" = 1 ] || echo "_candidates$c")$([ "$c" = 1 ] || [ "$shape" = 0 ] || echo "_shape")
root=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$root" "$work/repo"
cd "$work/repo"
dvc cache dir --local "$root/.dvc/cache"
dvc checkout -q real-data train-decoder expand-prompts
python - "$n" "$c" "$shape" <<'PY'
import sys
import yaml
n, c, shape = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
params = yaml.safe_load(open("params.yaml"))
params["generate"]["num_samples"] = n
params["steer"]["budget"] = n
params["steer"]["candidates"] = c
params["steer"]["shape_check"] = shape
open("params.yaml", "w").write(yaml.safe_dump(params, sort_keys=False))
PY
dvc repro steering
python - "$n" "$root" "$name" <<'PY'
import json
import sys
from pathlib import Path
from datasetdm.io import write_json
n, root, name = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
metrics = json.loads(Path("metrics/steering.json").read_text())
write_json(root / f"metrics/{name}.json", {"round0_samples": n, **metrics})
write_json(root / f"metrics/{name}_plot.json", json.loads(Path("metrics/steering_plot.json").read_text()))
write_json(root / f"metrics/{name}_results.json", json.loads(Path("data/steering/results.json").read_text()))
PY
