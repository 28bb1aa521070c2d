"""``convert --val-ratio R``: a validation split carved out of a train-only input.

This is im2rec's ``--train-ratio`` (there ``1 - R``), made stratified and reproducible:

  * per class: a class of n >= 2 images gives round(R * n) of them, at least 1 and at most
    n - 1, to val; a class of one image keeps it in train;
  * which images: those whose sha256(seed, "holdout", name) is smallest in their class. The
    choice depends only on the seed and the names, never on the order the file system lists
    them in, and adding a file to a class moves at most one other image between the splits.

Example, R = 0.1, seed 0: classes of 25, 3 and 1 images give 3 (round(2.5) up), 1 (the minimum)
and 0 val images.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace

import numpy as np

from alexnet_pipe.errors import LayoutError
from alexnet_pipe.inputs.table import ScanResult

log = logging.getLogger(__name__)


def holdout_counts(counts: np.ndarray, ratio: float) -> np.ndarray:
    """Validation images per class for classes of ``counts`` images (see the module's rule)."""
    counts = np.asarray(counts, np.int64)
    wanted = np.floor(counts * ratio + 0.5).astype(np.int64)  # round half up, not to even
    return np.clip(np.maximum(wanted, 1), 0, np.maximum(counts - 1, 0))


def _key(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}\0holdout\0{name}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big")


def carve_val(found: ScanResult, ratio: float, seed: int) -> ScanResult:
    """``found`` with a val split carved from its train split, per class (``ratio`` in (0, 1)).

    Raises:
        LayoutError: the input has a validation split already.
    """
    if "val" in found.splits:
        raise LayoutError(
            f"the input already has a validation split ({found.layout['val']}); --val-ratio carves one only "
            "from an input without one: drop --val-ratio"
        )
    train = found.splits["train"]
    labels = train.labels.astype(np.int64)
    keys = np.fromiter((_key(seed, name) for name in train.names()), np.uint64, len(train))
    order = np.lexsort((keys, labels))  # by class, then by key
    counts = np.bincount(labels, minlength=len(found.classes))
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(len(train), np.int64)
    rank[order] = np.arange(len(train)) - starts[labels[order]]  # place of each image within its class
    is_val = rank < holdout_counts(counts, ratio)[labels]
    n_val = int(is_val.sum())
    if not n_val:
        raise LayoutError(f"--val-ratio {ratio:g} holds out no image: every class has a single image")
    layout = dict(found.layout)
    layout["train"] = f"{found.layout['train']}, less the val split of --val-ratio {ratio:g}"
    layout["val"] = (f"--val-ratio {ratio:g}: {n_val} of the {len(train)} train images held out, per class "
                     f"(seed {seed})")
    warnings = list(found.warnings)
    single = int(np.sum(counts == 1))
    if single:
        warnings.append(f"--val-ratio: {single} {'class has' if single == 1 else 'classes have'} a single image, "
                        "kept in train: no val image for them")
        log.warning("%s", warnings[-1])
    splits = {"train": train.take(np.flatnonzero(~is_val)), "val": train.take(np.flatnonzero(is_val))}
    return replace(found, layout=layout, splits=splits, warnings=warnings)
