"""``make app``: the FiftyOne app on 127.0.0.1 with the current export's curated dataset.

Runs the curate stage first if this export has no FiftyOne dataset yet, then serves
FiftyOne's app server as a child process (stopped with this script on Ctrl-C), so
nothing outlives it. Open the printed URL; samples tagged ``low_quality`` or
``duplicate`` are the ones left out of ``curate.out``.

    python scripts/fiftyone_app.py [--params params.yaml] [--port 5151]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from datasetdm.config import load_params
from datasetdm.curate import dataset_name
from datasetdm.errors import DatasetDMError


def app_command(port: int) -> list[str]:
    return [sys.executable, "-m", "fiftyone.server.main", "--address", "127.0.0.1", "--port", str(port)]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--port", type=int, default=5151)
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        name = dataset_name(params.export.out, params.curate.dataset_prefix)
        import fiftyone as fo

        if name not in fo.list_datasets():
            from datasetdm.stages import curate_stage

            print(f"curate: {curate_stage(params)}")
    except DatasetDMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Ctrl-C or a plain kill both end up in the finally below (a shell may start a
    # background job with SIGINT ignored, so set the handlers explicitly).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    server = subprocess.Popen(app_command(args.port), start_new_session=True)
    print(f"FiftyOne app: http://127.0.0.1:{args.port}/datasets/{name}   (Ctrl-C stops it)", flush=True)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
