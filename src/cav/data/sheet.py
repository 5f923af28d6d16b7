"""Comparison sheets: videos side by side in one PNG that reads on a screen, one captioned row per prompt.

Layout (all sizes in pixels)::

    title                                                   (optional, one line)
             column 1            column 2            column 3
    caption of row 1 (its prompt, and whatever the caller adds)
    [f0 f1 ... f7]       [f0 f1 ... f7]       [f0 f1 ... f7]
    caption of row 2
    ...

Each cell is one video as up to ``frames`` of its frames (uniformly chosen, first and last included), each scaled
to ``tile`` px high (nearest neighbour when enlarging, so small toy frames stay crisp). Text uses Pillow's scalable
default font (``ImageFont.load_default(size=...)``, Pillow >= 10.1) at ``font_size``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cav.errors import CavError
from cav.io_utils import atomic_path

BACKGROUND = (250, 250, 250)
TEXT = (20, 20, 20)
MUTED = (90, 90, 90)
FRAME_GAP = 2  # between the frames of one video
CELL_GAP = 24  # between videos
MARGIN = 16


def write_comparison_sheet(path: str | Path, rows: list[list[np.ndarray]], *, columns: list[str],
                           captions: list[str], title: str | None = None, frames: int = 8, tile: int = 64,
                           font_size: int = 18) -> Path:
    """Write ``rows`` (each a list of uint8 (F, H, W, 3) videos, one per column) as a captioned PNG grid."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise CavError(f"cannot write sheet '{path}': use a file name ending in .png")
    if not rows or any(len(r) != len(columns) for r in rows) or len(captions) != len(rows):
        raise ValueError(f"need one caption per row and one video per column ({len(columns)}) in every row")
    cells = [[_cell(v, frames, tile) for v in row] for row in rows]
    widths = [max(c[k].width for c in cells) for k in range(len(columns))]
    font = ImageFont.load_default(size=font_size)
    line = font_size + font_size // 2
    width = 2 * MARGIN + sum(widths) + CELL_GAP * (len(columns) - 1)
    row_h = [line + max(c.height for c in row) + MARGIN for row in cells]
    height = MARGIN + (line + MARGIN if title else 0) + line + sum(row_h)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = MARGIN
    if title:
        draw.text((MARGIN, y), _fit(draw, title, font, width - 2 * MARGIN), fill=TEXT, font=font)
        y += line + MARGIN
    x = MARGIN
    for name, w in zip(columns, widths):
        draw.text((x, y), _fit(draw, name, font, w), fill=MUTED, font=font)
        x += w + CELL_GAP
    y += line
    for caption, row, h in zip(captions, cells, row_h):
        draw.text((MARGIN, y), _fit(draw, caption, font, width - 2 * MARGIN), fill=TEXT, font=font)
        x = MARGIN
        for cell, w in zip(row, widths):
            sheet.paste(cell, (x, y + line))
            x += w + CELL_GAP
        y += h
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def _cell(video: np.ndarray, frames: int, tile: int) -> Image.Image:
    """Up to ``frames`` frames of a video, ``tile`` px high, side by side."""
    v = np.asarray(video)
    if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8 or len(v) == 0:
        raise ValueError(f"video has shape {v.shape} and dtype {v.dtype}: pass uint8 (frames, height, width, 3)")
    v = v[np.unique(np.linspace(0, len(v) - 1, min(frames, len(v))).round().astype(int))]
    h, w = v.shape[1:3]
    size = (max(1, round(w * tile / h)), tile)
    resample = Image.Resampling.NEAREST if tile >= h else Image.Resampling.LANCZOS
    images = [Image.fromarray(f).resize(size, resample) for f in v]
    cell = Image.new("RGB", (len(images) * (size[0] + FRAME_GAP) - FRAME_GAP, tile), BACKGROUND)
    for i, im in enumerate(images):
        cell.paste(im, (i * (size[0] + FRAME_GAP), 0))
    return cell


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut with '...' (the default font has no ellipsis glyph) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
