"""YAML as the factory reads it: ``yaml.safe_load``, but a repeated key is an error.

YAML allows a mapping to name a key twice and PyYAML keeps only the last value, so a
``generate:`` section pasted twice into ``params.yaml`` silently drops the first one's
settings. Every YAML file the package reads goes through ``load_yaml`` (or
``parse_yaml`` for text), which refuses that with one ``DatasetDMError`` naming the
dotted key and both line numbers, and turns every other YAML problem into one line too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from datasetdm.errors import DatasetDMError

_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    """A key a mapping names twice; ``first`` and ``second`` are 1-based line numbers."""

    def __init__(self, key: str, first: int, second: int) -> None:
        super().__init__(f"{key}: duplicate key (lines {first} and {second})")
        self.key, self.first, self.second = key, first, second


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises ``DuplicateKeyError`` before building a document with a repeated key.

    The check walks the composed node tree rather than hooking ``construct_mapping``:
    PyYAML builds nested mappings later, from generators, where the path to the key is
    no longer known, and the message should name ``generate.num_samples``, not
    ``num_samples``.
    """

    def construct_document(self, node: Node) -> Any:
        self._refuse_duplicates(node, path="", seen=set())
        return super().construct_document(node)

    def _refuse_duplicates(self, node: Node, path: str, seen: set[int]) -> None:
        if id(node) in seen:  # an alias to a node already checked (or one that contains itself)
            return
        seen.add(id(node))
        if isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                self._refuse_duplicates(item, f"{path}[{i}]", seen)
        elif isinstance(node, MappingNode):
            lines: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = self._key(key_node)
                # Named as written (``yes``, not ``True``): that is what the user searches the file for.
                written = key_node.value if isinstance(key_node, ScalarNode) else "?"
                dotted = f"{path}.{written}" if path else written
                if key is not None:
                    if key in lines:
                        raise DuplicateKeyError(dotted, lines[key], key_node.start_mark.line + 1)
                    lines[key] = key_node.start_mark.line + 1
                self._refuse_duplicates(value_node, dotted, seen)

    def _key(self, key_node: Node) -> Any:
        """The key as the mapping will hold it (``1`` and ``0x1`` are one key), or None if not comparable.

        Merge keys (``<<: *base``) are skipped: a key that overrides a merged one is
        YAML's intended use, not a mistake. Non-scalar keys are left to PyYAML, which
        refuses the unhashable ones itself.
        """
        if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
            return None
        key = self.construct_object(key_node)
        try:
            hash(key)
        except TypeError:
            return None
        return key


def parse_yaml(text: str, source: str | Path, *, prefix: str = "") -> Any:
    """Parse YAML ``text`` read from ``source`` as ``yaml.safe_load`` does, refusing duplicate keys.

    Args:
        source: the file named in errors.
        prefix: dotted key the text sits under (an override's ``generate``), put before
            the key an error names.

    Every problem is a one-line ``DatasetDMError``.
    """
    try:
        return yaml.load(text, Loader=StrictSafeLoader)  # a SafeLoader: no arbitrary objects
    except DuplicateKeyError as e:
        key = f"{prefix}.{e.key}" if prefix else e.key
        raise DatasetDMError(
            source,
            key,
            f"duplicate key (lines {e.first} and {e.second}); YAML would silently keep only the last",
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        # Under a prefix the text is a value typed on a command line: its key says more than a line number.
        where = prefix or (f"line {mark.line + 1}" if mark is not None else None)
        raise DatasetDMError(source, where, f"not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except ValueError as e:  # PyYAML's own constructors: a date such as 2024-13-45
        raise DatasetDMError(source, prefix or None, f"not valid YAML ({e})") from None


def load_yaml(path: str | Path) -> Any:
    """Read and parse the YAML file at ``path`` (see ``parse_yaml``); a missing or non-UTF-8 file is an error too."""
    path = Path(path)
    if not path.is_file():
        raise DatasetDMError(path, None, "file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DatasetDMError(path, None, "not UTF-8 text") from None
    return parse_yaml(text, path)
