"""`test --per-class`: per-class top-1/top-5, the confusion matrix (JSON), and a drawing of the
worst classes and the most confused pairs (matplotlib, PNG/SVG/PDF by suffix)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alexnet_pipe.fsutil import atomic_write_bytes


@dataclass(frozen=True)
class PerClass:
    """Counts over a whole split: ``confusion[true, predicted]`` and per-class top-5 hits."""

    confusion: np.ndarray  # K x K int64
    top5_hits: np.ndarray  # K int64

    def table(self, ids: list[str], names: list[str]) -> list[dict]:
        counts = self.confusion.sum(axis=1)
        rows = []
        for k, (cid, name) in enumerate(zip(ids, names)):
            n = int(counts[k])
            rows.append({"index": k, "id": cid, "name": name, "images": n,
                         "top1": 100.0 * self.confusion[k, k] / n if n else None,
                         "top5": 100.0 * self.top5_hits[k] / n if n else None})
        return rows

    def confused_pairs(self, limit: int) -> list[tuple[int, int, int]]:
        """(true, predicted, images) of the most frequent mistakes, largest first."""
        off = self.confusion.copy()
        np.fill_diagonal(off, 0)
        flat = np.argsort(off, axis=None, kind="stable")[::-1][:limit]
        pairs = [(int(i), int(j), int(off[i, j])) for i, j in zip(*np.unravel_index(flat, off.shape))]
        return [p for p in pairs if p[2] > 0]


def write_per_class(per_class: PerClass, ids: list[str], names: list[str], out: Path, worst: int = 20) -> list[Path]:
    """``out`` (.json): the table and the confusion matrix; beside it ``<stem>.png``: the drawing."""
    table = per_class.table(ids, names)
    pairs = per_class.confused_pairs(worst)
    body = {"classes": table,
            "confused_pairs": [{"true": ids[i], "predicted": ids[j], "images": n} for i, j, n in pairs],
            "confusion": per_class.confusion.tolist()}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, json.dumps(body).encode())
    drawing = out.with_suffix(".png")
    _draw(table, pairs, ids, names, drawing, worst)
    return [out, drawing]


def _label(ids: list[str], names: list[str], k: int) -> str:
    return f"{names[k]} ({ids[k]})" if names[k] and names[k] != ids[k] else ids[k]


def _draw(table: list[dict], pairs: list[tuple[int, int, int]], ids, names, out: Path, worst: int) -> None:
    from matplotlib.figure import Figure

    from alexnet_pipe.apps.figure_file import save_figure

    scored = sorted((r for r in table if r["top1"] is not None), key=lambda r: (r["top1"], r["index"]))[:worst]
    fig = Figure(figsize=(12, max(4.0, 0.3 * max(len(scored), len(pairs)) + 1.5)), dpi=100, layout="constrained",
                 label="per-class results")
    left, right = fig.subplots(1, 2)
    left.barh([_label(ids, names, r["index"]) for r in scored][::-1], [r["top1"] for r in scored][::-1],
              color="tab:red")
    left.set_xlim(0, 100)
    left.set_xlabel("top-1 %")
    left.set_title(f"the {len(scored)} worst classes by top-1")
    if pairs:
        right.barh([f"{_label(ids, names, i)} -> {_label(ids, names, j)}" for i, j, _ in pairs][::-1],
                   [n for _, _, n in pairs][::-1], color="tab:blue")
    right.set_xlabel("images")
    right.set_title("most confused pairs (true -> predicted)" if pairs else "no confusions")
    save_figure(fig, out)
