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
        self.file = str(file) if file is not None else None
        self.field = field
        self.message = " ".join(str(message).split())  # always one line
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [p for p in (self.file, self.field) if p]
        parts.append(self.message)
        return ": ".join(parts)
