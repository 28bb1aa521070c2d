"""What ``--model-file`` names: this project's weights or checkpoint, or another tool's weights
(neon pickle, caffemodel, torchvision .pth) imported in memory by ``import-weights``' own code.

The seed's command (``-w batches --model_file alexnet.p --test_only``) names neon's pickle, so
train, test and predict take every format ``import-weights`` reads, told by content, never by
suffix, with the same bounds (size caps, the safe unpickler). The one thing a foreign file lacks
is its class order: the order of its fc8 rows. It comes from ``--synsets`` (the source's class
list), else, for neon, whose fc8 follows the ILSVRC devkit's ``meta.mat`` ids, from the devkit
ids the manifest recorded when the dataset was converted with the devkit. Without either, the
run is refused (a guess would score every image against the wrong labels), except for
``--finetune``, which replaces fc8 anyway.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from alexnet_pipe.errors import CheckpointError
from alexnet_pipe.inputs.entries import refuse_special
from alexnet_pipe.model import checkpoint
from alexnet_pipe.model.weights import ClassListing, detect_format, read_foreign, weights_body

log = logging.getLogger(__name__)


@dataclass
class ModelFile:
    body: dict  # the weights/checkpoint body (``checkpoint.load``'s)
    source: Path  # the file read (a rotated older checkpoint when the newest is damaged)
    imported: str | None = None  # one line: the foreign format and the class order used; None: ours


def foreign_format(path: Path) -> str | None:
    """``neon``, ``caffe`` or ``torchvision`` for another tool's weights; None for this project's
    files and for anything else (``checkpoint.load`` then names what is wrong)."""
    if checkpoint.written_here(path):
        return None
    try:
        with open(path, "rb") as f:
            return detect_format(f.read(16))
    except OSError:
        return None


def open_model_file(path: Path, *, synsets: Path | None = None, devkit_order: list[str] | None = None,
                    dataset: str = "the dataset", need_classes: bool = True, newest_good: bool = False) -> ModelFile:
    """Read ``--model-file``; another tool's weights are imported in memory.

    Args:
        synsets: ``--synsets``, the foreign file's class list in the order of its fc8 rows.
        devkit_order: the dataset's class ids in ILSVRC devkit id order (``Dataset.devkit_order``),
            which neon's fc8 follows; used when ``synsets`` is not given.
        dataset: how messages name the dataset (where the devkit order would come from).
        need_classes: refuse a foreign file whose class order is unknown (False: ``--finetune``,
            whose new fc8 makes the old order moot; its classes are then numbered 0..n-1).
        newest_good: this project's checkpoint may fall back to its rotated older copies.
    Raises:
        CheckpointError, FormatError, UnsafePickleError: one line naming the file (or the flag).
    """
    refuse_special(path, "--model-file")  # before anything opens it (API callers too: the CLI checked already)
    if synsets is not None:
        refuse_special(synsets, "--synsets")
    fmt = foreign_format(path)
    if fmt is None:
        if synsets is not None:
            raise CheckpointError(f"--synsets names the classes of neon, Caffe or torchvision weights; {path} is an "
                                  "alexnet-pipe file, which records its own classes: drop --synsets")
        if newest_good:
            body, source = checkpoint.load_newest_good(path)
        else:
            body, source = checkpoint.load(path), path
        return ModelFile(body, source)
    imp = read_foreign(path, fmt)
    n = imp.model_config.num_classes
    if synsets is not None:
        listing = ClassListing.read(synsets)
    elif fmt == "neon" and devkit_order is not None and len(devkit_order) == n:
        listing = ClassListing(list(devkit_order), [""] * n, f"the devkit order recorded in {dataset}")
    elif need_classes:
        raise CheckpointError(
            f"{path} is a {imp.source_format} whose {n} outputs follow {imp.source_class_order}; pass --synsets "
            "FILE, the source's class list in that order (synset_words.txt for Caffe and torchvision, the devkit's "
            "meta.mat order for neon), to match them to the classes"
            + ("" if fmt != "neon" else f" (or convert {dataset} with the ILSVRC devkit, which records that order)"))
    else:
        listing = None
    body = weights_body(imp, path, listing)
    info = body["imported_from"]
    line = f"{path.name}: {imp.source_format}, imported in memory ({imp.network}); classes: {info['class_order']}"
    log.info("%s", line)
    return ModelFile(body, path, line)
