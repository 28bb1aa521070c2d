"""Import trained AlexNet weights from neon, Caffe and torchvision into this project's weights file.

``import_weights(src, cfg)`` tells the format by the file's first bytes (not its suffix), maps
the arrays onto ``AlexNet`` (neon, Caffe) or ``TorchvisionAlexNet``, and writes a ``kind:
weights`` file (``checkpoint.save``) recording the input the network expects: crop, channel
order, value range, mean/std and the class list. A weights or checkpoint file this project wrote
is refused as already one (use it with ``--model-file``), not read as a foreign state_dict.

``read_foreign`` + ``weights_body`` are the same import without the file: ``--model-file``
(model/model_file.py) uses them to take a neon, Caffe or torchvision file as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from alexnet_pipe.errors import CheckpointError, ConfigError, FormatError
from alexnet_pipe.fsutil import check_output_file
from alexnet_pipe.model import checkpoint
from alexnet_pipe.model.weights import caffe, neon, torchvision
from alexnet_pipe.model.weights.common import SHORT_SIDE, Imported
from alexnet_pipe.safe_pickle import load_file, read_capped

__all__ = ["FORMATS", "ClassListing", "ImportConfig", "ImportResult", "detect_format", "import_weights",
           "read_foreign", "read_synsets", "weights_body"]

FORMATS = ("neon", "caffe", "torchvision")
MAX_BYTES = 2 << 30  # AlexNet with momentum buffers is about 0.5 GB; protobuf itself stops at 2 GiB
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # torch's pre-1.6 file


@dataclass(frozen=True)
class ImportConfig:
    """What ``import-weights`` was asked to do."""

    output: Path
    fmt: str = "auto"  # "auto" or one of FORMATS
    synsets: Path | None = None  # the source's class list, in the order of its fc8 rows
    mean: tuple[float, float, float] | None = None  # R, G, B, in the weights' value range
    std: tuple[float, float, float] | None = None
    mean_file: Path | None = None  # a Caffe mean.binaryproto (BGR mean image): its per-channel mean

    def __post_init__(self) -> None:
        if self.mean is not None and self.mean_file is not None:
            raise ConfigError("give --mean or --mean-file, not both")
        if self.fmt not in ("auto", *FORMATS):
            raise ConfigError(f"format must be auto or one of {FORMATS}, got {self.fmt!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ConfigError(f"--{name} needs three values R,G,B, got {len(value)}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"--std values must be > 0, got {self.std}")


@dataclass
class ImportResult:
    output: Path
    source_format: str
    network: str
    arch: str
    num_classes: int
    crop: int
    class_order: str
    notes: list[str] = field(default_factory=list)
    squash: tuple[int, int] | None = None  # (height, width) predict squashes images to; None: short side

    def summary(self) -> str:
        geometry = "" if self.squash is None else f" of every image squashed to {self.squash[1]}x{self.squash[0]}"
        lines = [f"wrote {self.output}: {self.network} from a {self.source_format}, arch {self.arch}, "
                 f"{self.num_classes} classes, crop {self.crop}{geometry}", f"classes: {self.class_order}"]
        return "\n".join(lines + self.notes)


def detect_format(head: bytes) -> str | None:
    """neon / caffe / torchvision from a file's first bytes, or None."""
    if head.startswith(b"PK\x03\x04") or head.startswith(_TORCH_LEGACY_MAGIC):
        return "torchvision"
    # A NetParameter starts with its name (field 1), V1 layers (2) or layer (100), all length-delimited;
    # none of those first bytes is a pickle opcode.
    if head[:1] in (b"\x0a", b"\x12") or head[:2] == b"\xa2\x06":
        return "caffe"
    # Pickles: protocol 2+ (PROTO), or protocol 0/1 opening a container or naming a global (hostile
    # ones too: the safe unpickler judges them).
    if ((head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
            or head[:1] in (b"(", b"}", b"]", b"c")):
        return "neon"
    return None


def read_synsets(path: Path) -> tuple[list[str], list[str]]:
    """Class ids and names from a synset list: one class a line, ``wnid [name]`` (synsets.txt,
    synset_words.txt), in the order of the source's fc8 rows."""
    ids, names = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read the synset list ({exc})") from None
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if parts:
            ids.append(parts[0])
            names.append(parts[1] if len(parts) > 1 else "")
    seen = set()
    for i, wnid in enumerate(ids):
        if wnid in seen:
            raise FormatError(f"{path}: class {wnid!r} appears twice (again on class line {i + 1})")
        seen.add(wnid)
    return ids, names


def _read(src: Path, fmt: str) -> Imported:
    if fmt == "neon":
        return neon.convert(neon.read_params(load_file(src, MAX_BYTES, "neon weights")))
    if fmt == "caffe":
        return caffe.convert(*caffe.read_layers(read_capped(src, MAX_BYTES, "a caffemodel")))
    return torchvision.convert(torchvision.load_state_dict(src))


@dataclass(frozen=True)
class ClassListing:
    """The source's classes in the order of its fc8 rows, and where that order came from."""

    ids: list[str]
    names: list[str]
    origin: str  # e.g. "synset_words.txt", "the devkit order recorded in batches/manifest.json"

    @classmethod
    def read(cls, path: Path) -> ClassListing:
        return cls(*read_synsets(path), path.name)


def _classes(imp: Imported, listing: ClassListing | None) -> tuple[list[str], list[str], str]:
    """Class ids, names and a line about their order; fc8's rows permuted to sorted-id order."""
    n = imp.model_config.num_classes
    if listing is None:
        return ([str(i) for i in range(n)], [""] * n,
                f"numbered 0..{n - 1} in {imp.source_class_order}; pass --synsets to name them")
    ids, names = listing.ids, listing.names
    if len(ids) != n:
        raise FormatError(f"{listing.origin} lists {len(ids)} classes; the weights have {n} outputs")
    perm = sorted(range(n), key=lambda i: ids[i])
    if perm == list(range(n)):
        return ids, names, f"{n} classes from {listing.origin}, already in sorted-id order (this project's)"
    index = torch.tensor(perm)
    for key in ("fc8.weight", "fc8.bias"):
        imp.state_dict[key] = imp.state_dict[key][index].contiguous()
    return ([ids[i] for i in perm], [names[i] for i in perm],
            f"{n} classes, fc8's rows permuted from {listing.origin}'s order to sorted-id order (this project's)")


def read_foreign(src: Path, fmt: str = "auto") -> Imported:
    """A neon pickle, caffemodel or torch .pth (``fmt`` "auto": told by content) in this project's
    layout, in memory, with every bound of the importers (size caps, the safe unpickler).

    Raises:
        FormatError, UnsafePickleError: one line starting with ``src``.
    """
    if not src.is_file():
        raise FormatError(f"{src} is not a file")
    with open(src, "rb") as f:
        head = f.read(16)
    if fmt == "auto":
        fmt = detect_format(head)
        if fmt is None:
            raise FormatError(f"{src} is not a neon pickle, a caffemodel or a torch .pth file (it starts with "
                              f"{head[:8].hex(' ')}); pass --format if it is one")
    try:
        return _read(src, fmt)
    except FormatError as exc:
        kind = _written_here(src) if detect_format(head) == "torchvision" else None
        if kind is not None:
            raise FormatError(f"{src} is already an alexnet-pipe {kind} file: nothing to import; use it as it is "
                              f"(--model-file {src} with train, test or predict)") from None
        msg = str(exc)
        raise FormatError(msg if msg.startswith(str(src)) else f"{src}: {msg}") from None


def weights_body(imp: Imported, src: Path, listing: ClassListing | None,
                 mean: tuple[float, float, float] | None = None,
                 std: tuple[float, float, float] | None = None, given: bool = False) -> dict:
    """The ``kind: weights`` body of an imported network (what ``checkpoint.save`` writes and
    ``--model-file`` reads); fc8's rows permuted to sorted-id order. ``mean``/``std``: None, the
    source's own; ``given``: they were given by the user (the notes say so)."""
    ids, names, order = _classes(imp, listing)
    mean = mean if mean is not None else imp.mean_rgb
    std = std if std is not None else imp.std_rgb
    mc = imp.model_config
    data = {
        "classes": ids, "class_names": names,
        "mean_rgb": [float(v) for v in mean], "std_rgb": None if std is None else [float(v) for v in std],
        "crop": mc.crop, "short_side": SHORT_SIDE, "channel_order": imp.channel_order,
        "value_range": list(imp.value_range),
        **({"squash": list(imp.squash)} if imp.squash is not None else {}),  # InputSpec.squash
    }
    notes = list(imp.notes)
    scale = "0..1" if imp.value_range[1] == 1.0 else "0..255"
    notes.append(f"input: {imp.channel_order}, values {scale}, mean R,G,B {_fmt(mean)}"
                 + (f", std {_fmt(std)}" if std is not None else "") + (" (given)" if given else ""))
    return {"kind": "weights", "model": imp.state_dict, "model_config": mc.to_dict(), "data": data,
            "imported_from": {"format": imp.source_format, "network": imp.network, "file": src.name,
                              "class_order": order, "notes": notes}}


def import_weights(src: Path, cfg: ImportConfig) -> ImportResult:
    """Read ``src`` (neon pickle, caffemodel or torch .pth), write ``cfg.output``.

    Raises:
        FormatError, UnsafePickleError: the file is not one of the formats, is damaged, is
        another network, or is a pickle that asks for anything but arrays (nothing is run).
    """
    if not src.is_file():
        raise FormatError(f"{src} is not a file")
    check_output_file(cfg.output, "-o", "alexnet.pt")
    if cfg.output.resolve() == src.resolve():
        raise ConfigError(f"-o {cfg.output} is the source file; write the weights elsewhere")
    imp = read_foreign(src, cfg.fmt)
    mean = cfg.mean
    if cfg.mean_file is not None:
        if imp.value_range[1] != 255.0:
            raise ConfigError("--mean-file gives a 0..255 mean; these weights take 0..1 input: use --mean")
        from alexnet_pipe.dataset.update_mean import _read_binaryproto  # the Caffe mean reader of update-mean

        mean = tuple(float(v) for v in _read_binaryproto(cfg.mean_file, None).rgb)
    given = cfg.mean is not None or cfg.std is not None or cfg.mean_file is not None
    try:
        listing = ClassListing.read(cfg.synsets) if cfg.synsets is not None else None
        body = weights_body(imp, src, listing, mean, cfg.std, given)
    except FormatError as exc:
        msg = str(exc)
        raise FormatError(msg if msg.startswith(str(src)) else f"{src}: {msg}") from None
    checkpoint.save(cfg.output, body)
    info = body["imported_from"]
    mc = imp.model_config
    return ImportResult(cfg.output, imp.source_format, imp.network, mc.arch, mc.num_classes, mc.crop,
                        info["class_order"], info["notes"], imp.squash)


def _written_here(src: Path) -> str | None:
    """``weights`` or ``checkpoint`` when ``src`` is a file alexnet-pipe itself wrote (told by its
    content: a torch file whose body names this project's format), else None."""
    try:
        kind = checkpoint.load(src).get("kind")
    except CheckpointError:
        return None
    return kind if kind in checkpoint.KINDS else "weights"


def _fmt(values) -> str:
    return ",".join(f"{v:g}" for v in np.asarray(values, dtype=float))
