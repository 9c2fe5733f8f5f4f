"""``make app``: the FiftyOne app on 127.0.0.1 with the current export's curated dataset.

Runs the curate stage first if this export has no FiftyOne dataset yet, then serves
FiftyOne's app server as a child process (stopped with this script on Ctrl-C), so
nothing outlives it. Open the printed URL; samples tagged ``low_quality`` or
``duplicate`` are the ones left out of ``curate.out``.

    python scripts/fiftyone_app.py [--params params.yaml] [--port 5151]

With ``--screenshots DIR`` it instead saves two views in the dataset (``similar``: the
samples most like the first one, by the similarity index on the backbone's embeddings;
``hardest``: sorted by the decoder's hardness), photographs each in headless chromium
into ``DIR`` and stops the server (``make app-screenshots``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from datasetdm.config import load_params
from datasetdm.curate import dataset_name
from datasetdm.errors import DatasetDMError


def app_command(port: int) -> list[str]:
    return [sys.executable, "-m", "fiftyone.server.main", "--address", "127.0.0.1", "--port", str(port)]


def wait_until_up(server: subprocess.Popen, port: int, timeout: float = 120) -> None:
    """Return once the app server answers on ``port``; raise if it died or took too long."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
            return
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError("FiftyOne app server did not come up") from None
            time.sleep(1)


def blank(shot: Path) -> bool:
    """Whether a screenshot shows nothing but the app's plain loading screen."""
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    return not (pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50)


def screenshot(url: str, shot: Path, profile: Path, attempts: int = 3) -> bool:
    """Photograph ``url`` in headless chromium (1280x900) into ``shot``; whether it is not blank.

    The first page load can outlast chromium's virtual-time budget while the app server
    warms up (seen on a busy machine: FiftyOne's empty dark loading screen), so up to
    ``attempts`` loads, each judged by the same check; the last one counts.
    """
    for attempt in range(attempts):
        shot.unlink(missing_ok=True)
        subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                f"--user-data-dir={profile}-{attempt}",
                f"--screenshot={shot}",
                "--window-size=1280,900",
                "--virtual-time-budget=15000",
                url,
            ],
            capture_output=True,
            timeout=180,
        )
        if shot.is_file() and not blank(shot):
            return True
    return False


def save_views(name: str) -> dict[str, str]:
    """Save the ``similar`` and ``hardest`` views in dataset ``name``; return slug -> description."""
    import fiftyone as fo

    from datasetdm.curate import SIMILARITY

    ds = fo.load_dataset(name)
    first = ds.sort_by("sample_id").first()
    views = {
        "similar": (
            ds.sort_by_similarity(first.id, k=24, brain_key=SIMILARITY),
            f"the 24 samples most like {first['sample_id']} ({first['prompt']!r}) by the backbone's embeddings",
        ),
        "hardest": (ds.sort_by("hardness", reverse=True), "sorted by the decoder's hardness, hardest first"),
    }
    for slug, (view, description) in views.items():
        if ds.has_saved_view(slug):
            ds.delete_saved_view(slug)
        ds.save_view(slug, view, description=description)
    return {slug: description for slug, (_, description) in views.items()}


def screenshots(name: str, port: int, out: Path) -> int:
    """``--screenshots``: each saved view of ``save_views`` photographed into ``out``."""
    views = save_views(name)
    out.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(app_command(port), start_new_session=True)
    try:
        wait_until_up(server, port)
        for slug, description in views.items():
            shot = out / f"fiftyone-{slug}.png"
            with tempfile.TemporaryDirectory() as profile:
                ok = screenshot(f"http://127.0.0.1:{port}/datasets/{name}?view={slug}", shot, Path(profile) / "p")
            print(f"{shot}: {description}{'' if ok else ' (BLANK: the app did not render)'}", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--port", type=int, default=5151)
    ap.add_argument("--screenshots", type=Path, help="photograph the saved views into this folder and stop")
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
    if args.screenshots:
        return screenshots(name, args.port, args.screenshots)
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
