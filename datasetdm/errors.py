"""The one exception users see.

Every failure caused by input a user controls (params, labelled sets, checkpoints,
prompts) is raised once, at the boundary where the input is read, as a
``DatasetDMError`` naming the file and the field. The CLI prints ``str(err)`` on a
single line and exits non-zero, so messages must be one line and self-contained.
"""

from __future__ import annotations

from pathlib import Path


class DatasetDMError(Exception):
    """A user-facing error: ``<file>: <field>: <message>``."""

    def __init__(self, file: str | Path | None, field: str | None, message: str) -> None:
        self.file = _printable(str(file)) if file is not None else None
        # A field can come from user data (a YAML key, a file name): escape what would break the line.
        self.field = _printable(str(field)) if field is not None else None
        self.message = " ".join(str(message).split())  # always one line
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [p for p in (self.file, self.field) if p]
        parts.append(self.message)
        return ": ".join(parts)


def _printable(text: str) -> str:
    """``text`` as is, or with control characters escaped (``\\n``, ``\\x00``) if it has any."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
