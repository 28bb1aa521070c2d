"""Checkpoints and weight files: self-describing, atomic, loadable with weights_only=True.

Both carry the model config and the data settings (classes, mean/std, crop) so a file can be
tested, resumed, imported or used for prediction without the original command line.
A checkpoint adds the optimizer, the completed epoch count and the train config (what goes in
is decided in ``train_state.py``).

Every file ends with a SHA-256 of its torch bytes (``TRAILER``; torch.load ignores bytes after
the zip directory), because a zip's own CRCs are not checked when tensors are read: a flipped
bit in a weight would load silently. ``save(..., keep=K)`` keeps the K newest files as
``name``, ``name.1`` .. ``name.{K-1}``; ``load_newest_good`` falls back along them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from pathlib import Path

import torch

from alexnet_pipe import __version__
from alexnet_pipe.errors import CheckpointError
from alexnet_pipe.fsutil import fsync_dir, output_error, remove_temps, temp_path
from alexnet_pipe.model import body_schema, torchfile

FORMAT = "alexnet-pipe-model"
VERSION = 1
KINDS = ("weights", "checkpoint")
TRAILER = b"\n#alexnet-pipe-sha256:"  # + 64 hex digits + newline, at the very end of the file
_TRAILER_LEN = len(TRAILER) + 65

log = logging.getLogger(__name__)


class _Hashing:
    """A write-only file wrapper that hashes what passes through (torch.save streams into it).
    A write error is kept: torch replaces it with a RuntimeError of its own."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data) -> int:
        self.sha.update(data)
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def save(path: Path, payload: dict, keep: int = 1, then: str | None = None) -> None:
    """Write atomically: a reader sees the previous file or the complete new one. With ``keep``
    > 1 the previous files move to ``path.1``, ``path.2``, ... (the oldest is dropped).

    The data goes to a hidden ``.NAME.tmp-PID`` first. A write that fails (a full disk, a file
    size limit) removes it and raises ``OutputError``, one line ending in ``then`` (what to do;
    by default: free space and run again); one killed midway leaves it, never under a
    checkpoint's name, and the next save removes it.
    """
    if payload.get("kind") not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    body = {"format": FORMAT, "version": VERSION, "created_by": f"alexnet-pipe {__version__}", **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_temps(path.parent, path.name, only_dead=True)
    tmp = temp_path(path)
    hashing = None
    try:
        with open(tmp, "wb") as f:
            hashing = _Hashing(f)
            torch.save(body, hashing)
            f.write(TRAILER + hashing.sha.hexdigest().encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        for k in range(keep - 1, 0, -1):  # each rename is atomic: a crash leaves a valid set
            older = rotated(path, k - 1)
            if older.exists():
                os.replace(older, rotated(path, k))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        cause = hashing.error if hashing is not None and hashing.error is not None else exc
        error = output_error(cause, path, then or "free some space (or choose another path) and run again; an "
                                                  "earlier file of that name is unchanged")
        if error is None:
            raise
        raise error from exc
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def rotated(path: Path, k: int) -> Path:
    """The k-th older file kept beside ``path`` (k = 0: ``path`` itself)."""
    return path if k == 0 else path.with_name(f"{path.name}.{k}")


def written_here(path: Path) -> bool:
    """Whether ``path`` is a file this project wrote (damaged or not), told cheaply by its content:
    the SHA-256 trailer, or, in a file from before the trailer, this format's name in the torch
    zip's pickle. Lets ``--model-file`` tell its own files from torchvision's before reading them."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - _TRAILER_LEN))
            if f.read().startswith(TRAILER):
                return True
        with zipfile.ZipFile(path) as z:
            pickles = [i for i in z.infolist() if i.filename.endswith("/data.pkl") and i.file_size < (64 << 20)]
            return any(FORMAT.encode() in z.read(i) for i in pickles[:1])
    except (OSError, zipfile.BadZipFile, ValueError, NotImplementedError, EOFError):
        return False


def _verify(path: Path) -> None:
    """Check the SHA-256 trailer (files written before it existed have none and pass)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size > _TRAILER_LEN:
            f.seek(size - _TRAILER_LEN)
            tail = f.read()
        else:
            tail = b""
        if not tail.startswith(TRAILER):
            return
        expected = tail[len(TRAILER):-1].decode("ascii", "replace")
        f.seek(0)
        sha, left = hashlib.sha256(), size - _TRAILER_LEN
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            sha.update(chunk)
            left -= len(chunk)
    if sha.hexdigest() != expected:
        raise CheckpointError(f"{path} is damaged (its SHA-256 does not match the one written with it); "
                              "use an older checkpoint or the weights file")


def load_newest_good(path: Path, keep: int = 8, check: bool = True) -> tuple[dict, Path]:
    """``path`` or, when it is damaged, the newest good one of ``path.1`` .. ``path.{keep-1}``,
    with a warning. Raises the newest file's error when none is good."""
    first_error = None
    for k in range(keep):
        candidate = rotated(path, k)
        if k and not candidate.exists():
            break
        try:
            body = load(candidate, check)
        except CheckpointError as exc:
            first_error = first_error or exc
            continue
        if k:
            log.warning("%s; resuming from the previous checkpoint %s instead", first_error, candidate)
        return body, candidate
    raise first_error


def load(path: Path, check: bool = True) -> dict:
    """Read a weights or checkpoint file (tensors and plain data only: weights_only=True)."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass a file written by alexnet-pipe train -s or --serialize")
    _verify(path)
    why = torchfile.problem(path)
    if why is not None:
        raise CheckpointError(f"{path} is refused: {why}")
    try:
        body = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; its advice (weights_only=False) is
        # wrong for a file we do not trust, so only the error's type is shown
        raise CheckpointError(f"{path} is not an alexnet-pipe weights file "
                              f"(torch cannot read it: {type(exc).__name__}); "
                              "pass a file written by alexnet-pipe train or import-weights, or a neon pickle, "
                              "Caffe .caffemodel or torchvision .pth") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an alexnet-pipe weights/checkpoint file "
            "(neon, Caffe and torchvision weights: pass them to --model-file as they are, or convert them "
            "with alexnet-pipe import-weights)"
        )
    if body.get("version") != VERSION:
        raise CheckpointError(f"{path} has format version {body.get('version')}; this alexnet-pipe reads {VERSION}")
    for key in ("kind", "model", "model_config", "data"):
        if key not in body:
            raise CheckpointError(f"{path} lacks '{key}'; the file is damaged or from an unknown writer")
    if check:  # every field a reader uses, before any is used (False: the file layer's own tests)
        body_schema.check(body, path)
    return body
