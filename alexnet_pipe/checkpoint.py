"""Checkpoints and weight files: self-describing, atomic, loadable with weights_only=True.

Both carry the model config and the data settings (classes, mean/std, crop) so a file can be
tested, resumed, imported or used for prediction without the original command line.
A checkpoint adds the optimizer, the completed epoch count and the train config (what goes in
is decided in ``train_state.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import __version__
from .errors import CheckpointError
from .fsutil import fsync_dir

FORMAT = "alexnet-pipe-model"
VERSION = 1
KINDS = ("weights", "checkpoint")


def save(path: Path, payload: dict) -> None:
    """Write atomically: a reader sees the previous file or the complete new one."""
    if payload.get("kind") not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    body = {"format": FORMAT, "version": VERSION, "created_by": f"alexnet-pipe {__version__}", **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(body, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def load(path: Path) -> dict:
    """Read a weights or checkpoint file (tensors and plain data only: weights_only=True)."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass a file written by alexnet-pipe train -s or --serialize")
    try:
        body = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(f"{path} is not a readable torch file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an alexnet-pipe weights/checkpoint file "
            "(importers for neon, Caffe and torchvision weights are not available yet)"
        )
    if body.get("version") != VERSION:
        raise CheckpointError(f"{path} has format version {body.get('version')}; this alexnet-pipe reads {VERSION}")
    for key in ("kind", "model", "model_config", "data"):
        if key not in body:
            raise CheckpointError(f"{path} lacks '{key}'; the file is damaged or from an unknown writer")
    return body
