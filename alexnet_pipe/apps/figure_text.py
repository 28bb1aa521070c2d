"""Text laid out to fit a figure: widths measured with Agg's own text layout, lines wrapped or cut
with an ellipsis to a width in pixels (matplotlib neither wraps nor clips a title, so a long path
or class name would run past the figure's edge and be cut there).

Used by ``inspect`` (``image_grid.py``), ``plot`` and ``test --per-class`` (``train/report.py``).
"""

from __future__ import annotations

import re
from functools import lru_cache

DPI = 100  # every figure of the product is drawn at 100 dpi
BREAKS = re.compile(r"(?<=[\s/_\-,.:])")  # a line may break after a space, a path separator or punctuation
ELLIPSIS = "\u2026"


@lru_cache(maxsize=4)
def _renderer(dpi: int):
    from matplotlib.backends.backend_agg import RendererAgg

    return RendererAgg(1, 1, dpi)


@lru_cache(maxsize=8192)
def text_width(text: str, fontsize: float | str, dpi: int = DPI) -> float:
    """Width in pixels of the widest line of ``text`` at ``fontsize`` (points or a name like "small")."""
    from matplotlib.font_manager import FontProperties

    prop = FontProperties(size=fontsize)
    renderer = _renderer(dpi)
    return max(renderer.get_text_width_height_descent(line, prop, ismath=False)[0] if line else 0.0
               for line in text.split("\n"))


def shorten(text: str, width_px: float, fontsize: float | str, dpi: int = DPI) -> str:
    """``text`` (one line) cut with an ellipsis so that it measures at most ``width_px``."""
    if text_width(text, fontsize, dpi) <= width_px:
        return text
    lo, hi = 0, len(text)  # the longest prefix that fits with the ellipsis: a bisection on its length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text_width(text[:mid].rstrip() + ELLIPSIS, fontsize, dpi) <= width_px:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + ELLIPSIS


def wrap(text: str, width_px: float, fontsize: float | str, dpi: int = DPI) -> str:
    """``text`` with each line broken so that it measures at most ``width_px``: after a space, a
    ``/``, ``_``, ``-`` or punctuation where one fits, else inside a word (a long path stays whole)."""
    out: list[str] = []
    for line in text.split("\n"):
        current = ""
        for piece in BREAKS.split(line):
            if text_width(current + piece, fontsize, dpi) <= width_px:
                current += piece
                continue
            if current.strip():
                out.append(current.rstrip())
                current = ""
            piece = piece.lstrip() if not current else piece
            while text_width(piece, fontsize, dpi) > width_px and len(piece) > 1:  # a word wider than a line
                cut = len(shorten(piece, width_px, fontsize, dpi)) - 1  # what fits, without the ellipsis
                cut = max(cut, 1)
                out.append(piece[:cut])
                piece = piece[cut:]
            current = piece
        out.append(current.rstrip())
    return "\n".join(out)
