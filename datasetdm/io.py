"""Atomic file writing and content hashing.

Nothing the factory produces may be half-written: a crash mid-write must leave the
previous version (or nothing) in place. So every writer goes through a temporary
sibling and ``os.replace``, which is atomic on POSIX within one filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    Works for files and directories alike: the caller writes whatever it wants at the
    yielded path. On error the temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            # os.replace cannot overwrite a non-empty directory: move the old one
            # aside first so the swap is still a pair of renames.
            old = tmp / (path.name + ".old")
            os.replace(path, old)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_temporaries(parent: str | Path, name: str = "*") -> list[Path]:
    """Delete what ``atomic_path`` left in ``parent`` for ``name`` when a process died mid-write.

    A killed writer (SIGKILL, the OOM killer) never reaches the cleanup
    in ``atomic_path``, so its ``.<name>.<random>.tmp`` folder stays behind. Only call
    this when no other process is writing ``name`` in ``parent`` (it would remove that
    writer's temporary). Returns the folders removed.
    """
    removed = []
    for tmp in Path(parent).glob(f".{name}.*.tmp"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_png(path: str | Path, image: Image.Image | np.ndarray) -> None:
    """Save a PNG atomically; uint16 arrays become 16-bit greyscale PNGs."""
    if isinstance(image, np.ndarray):
        image = array_to_image(image)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def array_to_image(array: np.ndarray) -> Image.Image:
    if array.dtype == np.uint16:
        # Pillow infers I;16 from a little-endian uint16 array (passing mode= is rejected).
        return Image.fromarray(np.ascontiguousarray(array, dtype="<u2"))
    if array.dtype != np.uint8:
        raise TypeError(f"cannot save {array.dtype} array as PNG")
    return Image.fromarray(array)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_dir(path: str | Path) -> str:
    """Hash of a directory's files (relative names and contents), order-independent."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()
