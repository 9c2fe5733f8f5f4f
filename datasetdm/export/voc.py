"""PASCAL VOC-style semantic masks: one palette PNG per image, pixel value = class.

The palette is VOC's own, so masks open in any VOC tool with the familiar colours
while the pixel indices stay the raw class ids (0 = background, k = 1 + class index).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from datasetdm.io import save_png


@lru_cache(maxsize=1)
def _palette() -> tuple[int, ...]:
    flat: list[int] = []
    for i in range(256):
        r = g = b = 0
        c = i
        # VOC spreads the bits of the index over the three channels, most significant
        # first, so neighbouring labels get very different colours.
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        flat += [r, g, b]
    return tuple(flat)


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map as a flat ``[r0, g0, b0, r1, ...]`` list of 768 ints.

    Index 0 is black (background), 1 is (128, 0, 0), ..., 255 is (224, 224, 192), the
    colour VOC uses for its "void" boundary label.
    """
    return list(_palette())


def voc_colours() -> np.ndarray:
    """The same palette as a (256, 3) uint8 array, for indexing with a label map."""
    return np.array(_palette(), dtype=np.uint8).reshape(256, 3)


def voc_mask_image(semantic: np.ndarray) -> Image.Image:
    """A mode "P" image whose indices are exactly ``semantic`` (HxW uint8)."""
    if semantic.ndim != 2 or semantic.dtype != np.uint8:
        raise ValueError(f"semantic mask must be a 2-D uint8 array, got {semantic.dtype} {semantic.shape}")
    h, w = semantic.shape
    image = Image.frombytes("P", (w, h), np.ascontiguousarray(semantic).tobytes())
    image.putpalette(voc_palette())
    return image


def save_voc_mask(path: str | Path, semantic: np.ndarray) -> None:
    """Write ``semantic`` (HxW uint8 class ids) atomically as a VOC palette PNG."""
    save_png(path, voc_mask_image(semantic))
