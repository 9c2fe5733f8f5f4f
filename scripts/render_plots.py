"""Render every DVC plot to PNG and SVG without a network: ``make plots``.

``dvc plots show`` writes HTML that loads Vega from a CDN, so offline it is blank.
Here DVC fills its templates (``dvc plots show --json``: Vega-Lite specs with the data
inlined) and vl-convert renders them locally. Writes ``<out>/<plot>.png``/``.svg`` and
``<out>/index.md`` linking them (the run report links the index).

    python scripts/render_plots.py [--out reports/plots] [revisions to compare ...]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import vl_convert as vlc


def plot_specs(revisions: list[str]) -> dict[str, list[dict]]:
    """DVC's ``--json`` output: plot id -> list of rendered Vega-Lite specs."""
    cmd = [sys.executable, "-m", "dvc", "plots", "diff" if revisions else "show", *revisions, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[2:])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    out = json.loads(proc.stdout)
    for err in out.get("errors", []) or []:
        print(f"warning: dvc plots: {err}", file=sys.stderr)
    return {pid: [c["content"] for c in contents if c.get("type") == "vega"] for pid, contents in out["data"].items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="reports/plots")
    ap.add_argument("revisions", nargs="*", help="git revisions to compare (dvc plots diff); default: the workspace")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# DVC plots", "", "Rendered offline from `dvc plots show --json` with vl-convert.", ""]
    n = 0
    for pid, specs in plot_specs(args.revisions).items():
        for i, spec in enumerate(specs):
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", pid).strip("_") + (f"-{i}" if i else "")
            (out / f"{stem}.png").write_bytes(vlc.vegalite_to_png(spec, scale=2))
            (out / f"{stem}.svg").write_text(vlc.vegalite_to_svg(spec))
            lines += [f"## {pid}", "", f"![{pid}]({stem}.png)", ""]
            n += 1
            print(f"{out / stem}.png")
    (out / "index.md").write_text("\n".join(lines) + "\n")
    print(f"{n} plot(s) in {out}/index.md")
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
