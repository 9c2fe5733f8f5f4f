"""Training sets for downstream models: the K real images, the synthetic export, or both."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from datasetdm.errors import DatasetDMError
from datasetdm.realset import LabelledImage


@dataclass
class ArraySet:
    """Images (N, H, W, 3) uint8 and semantic labels (N, H, W) uint8 (0 = background)."""

    images: np.ndarray
    semantic: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def from_labelled(items: list[LabelledImage]) -> ArraySet:
    return ArraySet(np.stack([x.image for x in items]), np.stack([x.semantic for x in items]).astype(np.uint8))


def from_export(export_dir: str | Path, limit: int | None = None) -> ArraySet:
    """The kept synthetic samples of an export (images/ + VOC masks/), in card order."""
    export_dir = Path(export_dir)
    card_file = export_dir / "dataset.json"
    try:
        kept = [s["id"] for s in json.loads(card_file.read_text())["samples"] if s["kept"]]
    except FileNotFoundError:
        raise DatasetDMError(card_file, None, "not found; run the export stage") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetDMError(card_file, "samples", f"not a dataset card ({e})") from None
    kept = kept[:limit] if limit is not None else kept
    if not kept:
        raise DatasetDMError(card_file, "samples", "the export holds no kept samples")
    images, masks = [], []
    for sid in kept:
        for folder, dest, mode in (("images", images, "RGB"), ("masks", masks, None)):
            file = export_dir / folder / f"{sid}.png"
            try:
                with Image.open(file) as im:
                    dest.append(np.asarray(im.convert(mode) if mode else im))
            except (OSError, ValueError) as e:
                raise DatasetDMError(file, None, f"unreadable image ({e})") from None
    return ArraySet(np.stack(images), np.stack(masks).astype(np.uint8))
