"""Atomic file writing and content hashing.

Nothing the factory produces may be half-written: a crash mid-write must leave the
previous version (or nothing) in place. So every writer goes through a temporary
sibling and ``os.replace``, which is atomic on POSIX within one filesystem.
"""

from __future__ import annotations

import contextlib
import errno
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

from datasetdm.errors import DatasetDMError

# Write failures that mean "the disk (or a limit) is full", not a bug: the user can act on them.
_NO_SPACE = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the filesystem or the process's file-size limit",
}


class OutOfSpaceError(DatasetDMError):
    """A write ran out of space; ``path`` is the output that was being replaced."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        previous = f"the previous {path} is untouched" if path.exists() else f"nothing was written to {path}"
        super().__init__(path, None, f"{reason} while writing; {previous}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    Works for files and directories alike: the caller writes whatever it wants at the
    yielded path. On error the temporary is removed and ``path`` is untouched. A write
    that runs out of space (ENOSPC, EDQUOT, EFBIG) becomes an ``OutOfSpaceError`` naming
    ``path``: the outermost ``atomic_path`` names its own output, never a temporary inside it.
    """
    path = Path(path)
    with _naming_space_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _naming_space_errors(path):
            yield tmp / path.name
            _swap(tmp / path.name, path, tmp / (path.name + ".old"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _naming_space_errors(path: Path) -> Iterator[None]:
    """Turn a write that ran out of space, here or in a nested ``atomic_path``, into one line naming ``path``."""
    try:
        yield
    except OutOfSpaceError as e:
        raise OutOfSpaceError(path, e.reason) from e.__cause__
    except OSError as e:
        reason = _NO_SPACE.get(e.errno or 0)
        if reason is None:
            raise
        raise OutOfSpaceError(path, reason) from e


def _swap(new: Path, path: Path, old: Path) -> None:
    """Rename ``new`` over ``path``; a directory there is first moved to ``old``, and back if the swap fails."""
    if not (path.is_dir() and not path.is_symlink()):
        os.replace(new, path)
        return
    # os.replace cannot overwrite a non-empty directory: move the old one aside first
    # so the swap is still a pair of renames, and undo the first if the second fails.
    os.replace(path, old)
    try:
        os.replace(new, path)
    except OSError:
        os.replace(old, path)
        raise


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
