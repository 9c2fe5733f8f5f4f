"""A contact sheet of annotated samples, for a human to judge a dataset at a glance.

Each cell shows the image and its mask overlay side by side, upscaled with NEAREST so
pixels stay honest, with the prompt and quality score underneath. Images here are
small (64x64 by default), so everything is drawn at ``scale`` and the text size
follows it; an optional legend names the colour of every class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from datasetdm.export.voc import voc_colours
from datasetdm.io import save_png

BOUNDARY = 255  # VOC draws object outlines with its "void" colour, (224, 224, 192)
PAD = 8
GAP = 4
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def class_boundaries(semantic: np.ndarray) -> np.ndarray:
    """HxW bool: labelled pixels with a 4-neighbour of another label (inner outline)."""
    padded = np.pad(semantic, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    differs = np.zeros(semantic.shape, dtype=bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        differs |= padded[1 + dy : padded.shape[0] - 1 + dy, 1 + dx : padded.shape[1] - 1 + dx] != centre
    return differs & (semantic > 0)


def overlay(image: np.ndarray, semantic: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend each class's VOC colour over ``image`` and outline the classes.

    image: HxWx3 uint8; semantic: HxW class ids (0 = background, left as is).
    Returns HxWx3 uint8. Labelled pixels are blended over the image's *grey* level:
    over the raw colours a blue object tinted "triangle" olive comes out grey-blue,
    so the hue would say more about the object than about its label.
    """
    colours = voc_colours()
    labels = semantic.astype(np.intp)
    grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    blended = grey[..., None] * (1 - alpha) + colours[labels].astype(np.float32) * alpha
    out = np.where((semantic > 0)[..., None], blended.round(), image).astype(np.uint8)
    out[class_boundaries(semantic)] = colours[BOUNDARY]
    return out


def default_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font, at ``size`` pixels where this Pillow can scale it (>= 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a word wider than a line is split."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while len(word) > 1 and font.getlength(word) > width:
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines or [""]


def sample_grid(
    items: Sequence[tuple[np.ndarray, np.ndarray | None, str, float | None]],
    path: str | Path,
    *,
    columns: int = 4,
    scale: int = 3,
    classes: Sequence[str] | None = None,
) -> None:
    """Write a PNG grid of ``(image, semantic, caption, score)`` samples to ``path``.

    Images are HxWx3 uint8 and all the same size; semantic masks HxW class ids. With
    ``classes`` given, a legend maps each class's overlay colour to its name. Items
    with ``semantic=None`` show the image alone (backbone previews), and a ``None``
    score prints no score line.
    """
    if not items:
        raise ValueError("sample_grid needs at least one sample")
    h, w = items[0][0].shape[:2]
    font = default_font(max(10, 4 * scale + 2))
    line_h = font.getbbox("Ag")[3] + 3
    panels = 1 if items[0][1] is None else 2
    cell_w = panels * w * scale + (panels - 1) * GAP
    captions = [
        _wrap(caption, font, cell_w) + ([] if score is None else [f"score {score:.3f}"])
        for _, _, caption, score in items
    ]
    columns = max(1, min(columns, len(items)))
    rows = -(-len(items) // columns)
    # Each row is as tall as its longest caption, so one long prompt costs one row.
    row_h = [
        h * scale + GAP + line_h * max(len(c) for c in captions[r * columns : (r + 1) * columns]) for r in range(rows)
    ]
    row_y = [PAD + sum(row_h[:r]) + r * PAD for r in range(rows + 1)]
    legend = _legend_entries(classes, font, columns * (cell_w + PAD) - PAD) if classes else []
    legend_h = len(legend) * (line_h + 2) + PAD if legend else 0
    sheet = Image.new("RGB", (PAD + columns * (cell_w + PAD), row_y[-1] + legend_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for n, ((image, semantic, _, _), lines) in enumerate(zip(items, captions)):
        if image.shape[:2] != (h, w) or (semantic is not None and semantic.shape != (h, w)):
            raise ValueError(
                f"sample {n}: image {image.shape} / mask {semantic.shape} differ from the first ({h}, {w})"
            )
        x = PAD + (n % columns) * (cell_w + PAD)
        y = row_y[n // columns]
        for i, panel in enumerate((image,) if semantic is None else (image, overlay(image, semantic))):
            big = Image.fromarray(panel).resize((w * scale, h * scale), Image.Resampling.NEAREST)
            sheet.paste(big, (x + i * (w * scale + GAP), y))
        for j, line in enumerate(lines):
            draw.text((x, y + h * scale + GAP + j * line_h), line, fill=TEXT, font=font)
    _draw_legend(draw, legend, font, x0=PAD, y0=row_y[-1], line_h=line_h)
    save_png(path, sheet)


def _legend_entries(classes: Sequence[str], font, width: int) -> list[list[tuple[int, str]]]:
    """Legend rows of (class id, name), wrapped to ``width`` pixels."""
    swatch = font.getbbox("Ag")[3]
    rows: list[list[tuple[int, str]]] = [[]]
    used = 0
    for k, name in enumerate(classes, start=1):
        need = swatch + 4 + int(font.getlength(name)) + 16
        if rows[-1] and used + need > width:
            rows.append([])
            used = 0
        rows[-1].append((k, name))
        used += need
    return rows


def _draw_legend(
    draw: ImageDraw.ImageDraw, rows: list[list[tuple[int, str]]], font, *, x0: int, y0: int, line_h: int
) -> None:
    colours = voc_colours()
    swatch = font.getbbox("Ag")[3]
    for r, row in enumerate(rows):
        x, y = x0, y0 + r * (line_h + 2)
        for k, name in row:
            draw.rectangle(
                (x, y + 1, x + swatch, y + 1 + swatch), fill=tuple(int(v) for v in colours[k]), outline=TEXT
            )
            x += swatch + 4
            draw.text((x, y), name, fill=TEXT, font=font)
            x += int(font.getlength(name)) + 16
