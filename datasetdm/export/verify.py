"""Checking an export against the hashes its writer recorded, before anything reads it.

The export stage records, in the card ``dataset.json`` under ``files``, the sha256 of
every top-level file (``sha256_file``: ``annotations.json``, ``grid.png``, ...) and
folder (``sha256_dir``, names and contents: ``images/``, ``masks/``, ``depth/``) it
wrote. A reader calls ``verify_export`` first, so a mask edited or an image dropped
after the export stops it with one line naming the file and what to run, instead of
flowing into training or metrics. The curated export (``curate.out``) has the same
layout and is checked the same way against the ``files`` its ``curation.json``
records (``verify_curated``).

Cost: one read of every exported byte (measured in README "Guarantees"), small
beside decoding the same PNGs, which every reader does next.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from datasetdm.errors import DatasetDMError
from datasetdm.io import sha256_dir, sha256_file

logger = logging.getLogger(__name__)

CARD, CURATION = "dataset.json", "curation.json"
# Every export holds these; the rest (depth/, grid.png, embeddings.npy) depends on the run.
REQUIRED = ("annotations.json", "images", "masks")


def export_files(root: str | Path, *, record_file: str = CARD) -> dict[str, str]:
    """Name -> sha256 of every top-level file (``sha256_file``) and folder (``sha256_dir``) in ``root``.

    What an export stage records: everything it wrote except ``record_file`` itself
    (the card holding these hashes) and hidden names.
    """
    root = Path(root)
    files = {}
    for path in sorted(root.iterdir()):
        if path.name == record_file or path.name.startswith("."):
            continue
        files[path.name] = sha256_dir(path) if path.is_dir() else sha256_file(path)
    return files


def verify_export(export_dir: str | Path) -> dict[str, Any]:
    """The card of ``export_dir``, once every file it records hashes as recorded; else one line naming the file."""
    card_file = Path(export_dir) / CARD
    card = _read_record(card_file, "run the export stage")
    verify_files(Path(export_dir), card.get("files"), record_file=card_file, remedy="run the export stage")
    return card


def verify_curated(curated_dir: str | Path) -> dict[str, Any]:
    """``curation.json`` of ``curated_dir``, once every file it records hashes as recorded (as ``verify_export``)."""
    summary_file = Path(curated_dir) / CURATION
    summary = _read_record(summary_file, "run the curate stage")
    verify_files(Path(curated_dir), summary.get("files"), record_file=summary_file, remedy="run the curate stage")
    return summary


def verify_files(root: Path, files: Any, *, record_file: Path, remedy: str) -> None:
    """Stop unless ``files`` (name -> sha256, from ``record_file``) matches what ``root`` holds.

    Every recorded entry must hash as recorded, and every top-level entry of ``root``
    (bar ``record_file`` and hidden names) must be recorded: an export is written as one
    unit, so anything added since (a ``depth/`` folder, say) would otherwise be read
    unchecked. Entries are checked in name order so the first mismatch is stable.
    """
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise DatasetDMError(record_file, "files", f"missing or not a name -> sha256 mapping; {remedy}")
    for name in REQUIRED:
        if name not in files:
            raise DatasetDMError(record_file, f"files.{name}", f"missing; {remedy}")
    for path in sorted(root.iterdir()):
        if path.name not in files and path.name != record_file.name and not path.name.startswith("."):
            raise DatasetDMError(
                path, f"files.{path.name}", f"present but not recorded in {record_file.name}; {remedy}"
            )
    for name, recorded in sorted(files.items()):
        path = root / name
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise DatasetDMError(record_file, f"files.{name}", f"must name a file or folder in {root}; {remedy}")
        if path.is_dir():
            found = sha256_dir(path)
        elif path.is_file():
            found = sha256_file(path)
        else:
            raise DatasetDMError(path, f"files.{name}", f"recorded in {record_file.name} but missing; {remedy}")
        if found != recorded:
            raise DatasetDMError(
                path,
                f"files.{name}",
                f"changed since it was written (sha256 differs from {record_file.name}); {remedy}",
            )
    logger.info("%s: %d files and folders match %s", root, len(files), record_file.name)


def _read_record(path: Path, remedy: str) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetDMError(path, None, f"not found; {remedy}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetDMError(path, f"line {e.lineno}", f"not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise DatasetDMError(path, None, "not UTF-8 text") from None
    if not isinstance(data, dict):
        raise DatasetDMError(path, None, "must be a JSON object")
    return data
