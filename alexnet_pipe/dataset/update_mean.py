"""`update-mean`: upgrade old full-image means to the per-channel ``mean.json``.

Old formats, all full mean images:

- neon's ``dataset_cache.pkl``: a Python 2 pickle whose ``global_mean`` has shape
  (img_size*img_size*3, 1), RGB planar. Rewritten in place as neon's own
  ``update_dataset_cache.py`` did (per-channel, BGR, shape (3, 1)), so neon still reads it.
- Caffe's ``mean.binaryproto``: a BlobProto, 1 x C x H x W, BGR.
- ``mean.npy``: H x W x 3 (or 3 x H x W), RGB unless told otherwise.

Each also gets a ``mean.json`` (RGB) that our own tools read, beside it or in ``--into``, a
dataset directory convert wrote. Anything overwritten is backed up first (``name.bak``,
``name.bak1``, ...), but a current ``mean.json`` is never replaced by one with less in it: convert's
(with its std and counts) is kept when the values agree, and otherwise the run is refused.
"""

from __future__ import annotations

import ast
import json
import operator
import pickle
import pickletools
import re
import reprlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alexnet_pipe.config import UpdateMeanConfig
from alexnet_pipe.dataset.layout import MANIFEST_FILE, MEAN_FILE, OLD_MEAN_FILES
from alexnet_pipe.dataset.mean import MEAN_VERSION, ChannelMean, newer_version, read_mean_file, write_mean
from alexnet_pipe.errors import AlexnetPipeError, DatasetError, FormatError, UnsafePickleError
from alexnet_pipe.formats.blobproto import decode_blobproto
from alexnet_pipe.fsutil import atomic_write_bytes, backup_path, output_error
from alexnet_pipe.inputs.entries import not_a_file
from alexnet_pipe.safe_pickle import loads as safe_loads
from alexnet_pipe.safe_pickle import read_capped

NEON_CACHE_PROTOCOL = 2  # what neon's save_obj wrote; the highest a Python 2 neon can read
# A 1024x1024 float64 mean image is 24 MiB; anything much larger is not a mean file.
MAX_MEAN_FILE_BYTES = 256 << 20
NPY_MAX_HEADER = 10_000  # numpy's own limit for a header it will parse
# A mean image's plane means (float32 pixels) agree with convert's exact mean.json to ~1e-5 of 0..255.
SAME_MEAN_ATOL = 1e-3


@dataclass(frozen=True)
class UpdateMeanResult:
    """What `update-mean` read, wrote and backed up."""

    mean: ChannelMean
    written: list[Path]
    backups: list[Path]
    already_current: bool  # nothing needed writing
    read: str = ""  # the input, in words: "batches/mean.binaryproto (256x256 full-image mean, BGR)"
    notes: tuple[str, ...] = ()  # things the user should double-check

    def summary(self) -> str:
        """A few human lines: input, outputs, backups, the per-channel values."""
        lines = [f"read    {self.read}"]
        if self.already_current:
            lines.append("already current: nothing changed")
        lines += [f"wrote   {p}" for p in self.written]
        lines += [f"backup  {p}" for p in self.backups]
        rgb, _ = self.mean.rgb()
        lines.append("mean    " + "  ".join(f"{c}={v:.3f}" for c, v in zip("RGB", rgb)) + "  (0..255 scale)")
        lines += [f"note    {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------- untrusted files

def _read_input(path: Path) -> bytes:
    """A user-given mean file, whole; refused past ``MAX_MEAN_FILE_BYTES`` (means are a few MiB), and
    refused unopened when it is not a regular file (a FIFO would wait for a writer forever)."""
    why = not_a_file(str(path))
    if why is not None:
        raise FormatError(f"{path}: {why}; pass the mean file itself (.binaryproto, .npy or neon's "
                          "dataset_cache.pkl) or a dataset directory")
    return read_capped(path, MAX_MEAN_FILE_BYTES, "a mean file")


def _numpy1_global_names(data: bytes) -> bytes:
    """Rename ``numpy._core.*`` globals to ``numpy.core.*`` in a protocol-2 pickle.

    numpy 2 pickles name numpy._core, which numpy 1.x (and so any Python 2 neon) cannot import;
    numpy 2 still resolves the old names. Edits only GLOBAL opcodes, never array bytes.
    """
    out, last = [], 0
    for op, arg, pos in pickletools.genops(data):
        if op.name == "GLOBAL" and arg.startswith("numpy._core."):
            module, name = arg.split(" ", 1)
            end = pos + 1 + len(module) + 1 + len(name) + 1  # 'c' module '\n' name '\n'
            out += [data[last:pos], b"c" + module.replace("numpy._core.", "numpy.core.", 1).encode() + b"\n"
                    + name.encode() + b"\n"]
            last = end
    out.append(data[last:])
    return b"".join(out)


# ---------------------------------------------------------------- full image -> per channel

def _channel_means(image: np.ndarray, layout: str, what: str) -> np.ndarray:
    """Per-channel means (float64, in the array's channel order) of a CHW, HWC or 3-value mean."""
    if image.dtype.kind not in "fiu":
        raise FormatError(f"{what} has dtype {image.dtype}; expected a numeric (float) mean")
    if image.size == 0:  # its mean would be NaN, after two numpy RuntimeWarnings
        raise FormatError(f"{what} is an empty mean (shape {image.shape}); expected a mean image or 3 channel values")
    with np.errstate(all="ignore"):  # inf - inf or an overflow gives NaN or inf: refused below, in one line
        if layout == "C":
            means = image.reshape(3).astype(np.float64)
        elif layout == "CHW":
            means = image.reshape(3, -1).mean(axis=1, dtype=np.float64)
        else:
            means = image.reshape(-1, 3).mean(axis=0, dtype=np.float64)
    if not np.isfinite(means).all():
        raise FormatError(f"{what} holds non-finite values (NaN or inf); expected finite pixel means")
    if means.min() < 0 or means.max() > 255:
        raise FormatError(f"{what} has channel means {means.round(3).tolist()}; "
                          "expected pixel means on the 0..255 scale")
    return means


def _is_three_values(arr: np.ndarray) -> bool:
    return arr.shape in ((3,), (3, 1))


def _describe(arr: np.ndarray, layout: str) -> str:
    if layout == "C":
        return "per-channel mean"
    h, w = arr.shape[1:] if layout == "CHW" else arr.shape[:2]
    return f"{w}x{h} full-image mean"


def _scale_notes(rgb: np.ndarray) -> tuple[str, ...]:
    if rgb.max() <= 1.0:
        return ("all channel means are <= 1: is this a 0..1-scaled mean? mean.json is on the 0..255 scale",)
    return ()


@dataclass(frozen=True)
class _Decoded:
    """An old mean, read: RGB per-channel values and how to describe where they came from."""

    rgb: np.ndarray
    what: str  # "256x256 full-image mean"
    read: str  # "batches/mean.npy (256x256 full-image mean, HWC RGB)"
    notes: tuple[str, ...] = ()


def _read_binaryproto(path: Path, channel_order: str | None) -> _Decoded:
    if channel_order is not None:
        raise AlexnetPipeError(f"--channel-order applies to .npy means only; {path.name} is a Caffe "
                               "BlobProto, which is always BGR")
    data = _read_input(path)
    try:
        arr = decode_blobproto(data)
    except FormatError as exc:
        raise FormatError(f"{path}: not a valid Caffe mean BlobProto: {exc}") from exc
    image = arr[0] if arr.ndim == 4 and arr.shape[0] == 1 else arr
    if _is_three_values(image) or image.shape == (3, 1, 1):
        layout = "C"
    elif image.ndim == 3 and image.shape[0] == 3:
        layout = "CHW"
    else:
        raise FormatError(f"{path}: BlobProto has shape {arr.shape}; expected a BGR mean image "
                          "1 x 3 x H x W (as compute_image_mean writes) or 3 per-channel values")
    what = _describe(image, layout)
    rgb = _channel_means(image, layout, str(path))[::-1]  # Caffe stores BGR
    return _Decoded(rgb, what, f"{path} ({what}, BGR)", _scale_notes(rgb))


_NPY_DESCR = re.compile(r"[<>|=]?(b1|[iu][1248]|f[248])")  # dtype.str of a plain number type: '<f4', '|u1'


def _npy_header(data: bytes, path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of an .npy file, parsed without numpy.load.

    Only a plain number type is accepted, so numpy never unpickles anything, and the caller
    checks the shape against the bytes present before anything is allocated.
    """
    if not data.startswith(b"\x93NUMPY") or len(data) < 10:
        raise FormatError(f"{path}: not an .npy file (no \\x93NUMPY magic)")
    major, minor = data[6], data[7]
    if (major, minor) not in ((1, 0), (2, 0), (3, 0)):
        raise FormatError(f"{path}: .npy version {major}.{minor}; expected 1.0, 2.0 or 3.0")
    fmt = "<H" if major == 1 else "<I"
    start = 8 + struct.calcsize(fmt)
    if len(data) < start:
        raise FormatError(f"{path}: .npy file truncated inside its header")
    (length,) = struct.unpack_from(fmt, data, 8)
    if length > NPY_MAX_HEADER or start + length > len(data):
        raise FormatError(f"{path}: .npy header of {length} bytes is too long or truncated")
    try:
        text = data[start:start + length].decode("utf-8" if major == 3 else "latin1")
        try:
            header = ast.literal_eval(text)
        except SyntaxError:  # Python 2 on some platforms wrote shapes as (3L, 256L)
            header = ast.literal_eval(re.sub(r"\b([0-9]+)L\b", r"\1", text))
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as exc:
        raise FormatError(f"{path}: .npy header is not a readable dict ({type(exc).__name__})") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise FormatError(f"{path}: .npy header is not numpy's dict of descr, fortran_order and shape")
    shape, fortran, descr = header["shape"], header["fortran_order"], header["descr"]
    if type(shape) is not tuple or not all(type(d) is int and d >= 0 for d in shape) or type(fortran) is not bool:
        raise FormatError(f"{path}: .npy header has a malformed shape or fortran_order")
    if not isinstance(descr, str) or not _NPY_DESCR.fullmatch(descr):
        raise FormatError(f"{path}: .npy array has dtype {reprlib.repr(descr)}; expected bool, int, uint or "
                          "float (structured, object and pickled arrays are refused)")
    return shape, fortran, np.dtype(descr), start + length


def _decode_npy(data: bytes, path: Path) -> np.ndarray:
    """The array of an .npy file, checked against the file's size first (no 2 TiB allocations)."""
    shape, fortran, dtype, offset = _npy_header(data, path)
    if len(shape) > 4:
        raise FormatError(f"{path}: array has shape {shape}; a mean image has at most 4 axes")
    if 0 in shape:  # no values: any other axis may claim 2**62, which numpy cannot even reshape to
        raise FormatError(f"{path}: .npy array has shape {shape}, which holds no values (an empty mean); "
                          "expected an H x W x 3 (or 3 x H x W) mean image or 3 per-channel values")
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != len(data) - offset:
        raise FormatError(f"{path}: .npy header declares shape {shape} of {dtype} ({count * dtype.itemsize:,} "
                          f"bytes) but the file holds {len(data) - offset:,} bytes of data (truncated or corrupt)")
    flat = np.frombuffer(data, dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


def read_npy_mean(path: Path) -> np.ndarray:
    """A mean image's .npy file as an array: a plain number dtype, a shape that holds values and
    matches the file's bytes, at most ``MAX_MEAN_FILE_BYTES``; else FormatError naming the file,
    raised before numpy allocates anything (a header may declare terabytes)."""
    return _decode_npy(_read_input(path), path)


def _read_npy(path: Path, channel_order: str | None) -> _Decoded:
    arr = read_npy_mean(path)
    image = arr[0] if arr.ndim == 4 and arr.shape[0] == 1 else arr
    if _is_three_values(image):
        layout = "C"
    elif image.ndim == 3 and image.shape[-1] == 3:
        layout = "HWC"
    elif image.ndim == 3 and image.shape[0] == 3:
        layout = "CHW"
    else:
        raise FormatError(f"{path}: array has shape {arr.shape}; expected an H x W x 3 (or 3 x H x W) "
                          "mean image or 3 per-channel values")
    order = (channel_order or "rgb").upper()
    what = _describe(image, layout)
    means = _channel_means(image, layout, str(path))
    rgb = means[::-1] if order == "BGR" else means
    notes = _scale_notes(rgb)
    if channel_order is None:
        # Caffe's widely shared ilsvrc_2012_mean.npy is 3 x 256 x 256 *BGR*; nothing in the file says so.
        notes += ("channel order assumed RGB; if this mean came from Caffe (BGR), rerun with --channel-order bgr",)
    return _Decoded(rgb, what, f"{path} ({what}, {layout} {order})", notes)


def _neon_bgr_mean(cache: object, path: Path) -> tuple[np.ndarray, str, bool]:
    """(per-channel BGR means, description, already per-channel) of a neon dataset cache."""
    if not isinstance(cache, dict) or "global_mean" not in cache:
        # Keys come from the file: reprlib escapes them and keeps the line short.
        keys = reprlib.repr(sorted(reprlib.repr(k) for k in cache)) if isinstance(cache, dict) else type(cache).__name__
        raise FormatError(f"{path}: no 'global_mean' (found {keys}); expected neon's dataset cache, "
                          "a dict with 'img_size' and 'global_mean'")
    gm = cache["global_mean"]
    if not isinstance(gm, np.ndarray):
        raise FormatError(f"{path}: global_mean is a {type(gm).__name__}; expected a numpy array")
    if _is_three_values(gm):
        return _channel_means(gm, "C", f"{path} global_mean"), "per-channel mean", gm.shape == (3, 1)
    try:
        size = operator.index(cache.get("img_size"))
    except TypeError:
        raise FormatError(f"{path}: img_size is {reprlib.repr(cache.get('img_size'))}; "
                          "expected the image side in pixels") from None
    if size < 1 or gm.shape != (size * size * 3, 1):
        raise FormatError(f"{path}: global_mean has shape {gm.shape}; expected ({size}*{size}*3, 1) "
                          "(full image, RGB planar) or (3, 1) (per channel, BGR)")
    rgb = _channel_means(gm, "CHW", f"{path} global_mean")  # planar: all R, then G, then B
    return rgb[::-1], f"{size}x{size} full-image mean", False


# ---------------------------------------------------------------- the job

def _replace(path: Path, write: Callable[[], None], old: bytes | None, backups: list[Path]) -> None:
    """Back up ``old`` (``path``'s bytes; None: no file there) to a free ``.bak`` name, then ``write()``
    ``path`` anew. A write that fails (a full disk, a file size limit) is one line, and ``path`` is
    unchanged: the backup made for it is removed (each rerun would otherwise leave one more)."""
    backup = None if old is None else backup_path(path)
    try:
        if backup is not None:
            atomic_write_bytes(backup, old)
        write()
    except OSError as exc:
        if backup is not None:
            backup.unlink(missing_ok=True)
        error = output_error(exc, path, "free some space (or raise the limit), then rerun the same command")
        if error is None:
            raise
        raise error from exc
    if backup is not None:
        backups.append(backup)


def _held(mean: ChannelMean) -> str:
    """What a mean carries beyond the three values, in words: "its std, 18 images" (or "")."""
    return ", ".join(([] if mean.std is None else ["its std"]) + ([f"{mean.images:,} images"] if mean.images else []))


def _newer_version(path: Path) -> int | None:
    """The version of an alexnet-pipe mean.json newer than this code reads (else None)."""
    try:
        return newer_version(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, RecursionError):
        return None


def _plan_mean_json(out: Path, mean: ChannelMean, src: Path) -> tuple[bool, tuple[str, ...]]:
    """Whether ``out`` needs writing, and notes for the user. A current mean.json is never replaced
    by one with less in it (update-mean's means carry no std and no counts): with the same values
    it is kept, with others refused; a newer format is refused. Runs before anything is written."""
    if not out.exists():
        return True, ()
    why = not_a_file(str(out))
    if why is not None:  # a FIFO there would block the read (and the backup) forever
        raise DatasetError(f"{out}: {why}; nothing changed: move it aside, {MEAN_FILE} is written there")
    newer = _newer_version(out)
    if newer is not None:
        raise DatasetError(f"{out} has mean format version {newer}, newer than this alexnet-pipe reads "
                           f"({MEAN_VERSION}); nothing changed: use a newer alexnet-pipe")
    try:
        old = read_mean_file(out)
    except AlexnetPipeError:
        return True, ()  # unreadable or old format: replace it (after a backup)
    if _held(old) and not _held(mean):
        if np.allclose(old.rgb()[0], mean.rgb()[0], rtol=0, atol=SAME_MEAN_ATOL):  # e.g. the dataset's own mean image
            return False, (f"kept {out}: it holds this mean and {_held(old)}",)
        rgb = "  ".join(f"{c}={v:.3f}" for c, v in zip("RGB", mean.rgb()[0]))
        raise DatasetError(f"{out} already holds a per-channel mean with {_held(old)}; {src.name} gives another "
                           f"({rgb}) with no std, and update-mean never replaces a mean with less: nothing changed "
                           f"(to use it anyway, move the current one aside first: mv {out} {out}.own)")
    # Same values already there (a rerun): keep the file; other values replace it, after a backup.
    return not np.allclose(old.rgb()[0], mean.rgb()[0], rtol=0, atol=1e-9), ()


def _write_mean_json(out: Path, mean: ChannelMean, written: list[Path], backups: list[Path]) -> None:
    """Write ``out`` (where ``_plan_mean_json`` said to); back up whatever it replaces."""
    _replace(out, lambda: write_mean(out, mean), _read_input(out) if out.exists() else None, backups)
    written.append(out)


def _out_dir(cfg: UpdateMeanConfig, default: Path) -> Path:
    """Where mean.json goes: beside the mean file, or ``--into``, a dataset that convert wrote
    (nothing is created: a mean.json alone in a folder is read by nothing)."""
    if cfg.into is None:
        return default
    fix = f"give the directory alexnet-pipe convert wrote, or leave out --into to write {MEAN_FILE} beside {cfg.path}"
    if not cfg.into.is_dir():
        raise DatasetError(f"--into {cfg.into} {'is not a directory' if cfg.into.exists() else 'does not exist'}; "
                           f"{fix}")
    if not (cfg.into / MANIFEST_FILE).is_file():
        raise DatasetError(f"--into {cfg.into} is not an alexnet-pipe dataset (no {MANIFEST_FILE}); {fix}")
    return cfg.into


def _update_neon_cache(path: Path, cfg: UpdateMeanConfig) -> UpdateMeanResult:
    if cfg.channel_order is not None:
        raise AlexnetPipeError(f"--channel-order applies to .npy means only; {path.name} is neon's cache, "
                               "whose global_mean is RGB planar")
    raw = _read_input(path)
    try:
        cache = safe_loads(raw)
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from exc
    except FormatError as exc:
        raise FormatError(f"{path}: {exc}; expected neon's dataset_cache.pkl") from exc
    bgr, what, current = _neon_bgr_mean(cache, path)
    rgb = bgr[::-1]
    source = f"upgraded from {path.name} ({what})" if not current else f"from {path.name} ({what})"
    mean = ChannelMean(tuple(float(v) for v in rgb), None, "RGB", 0, 0, source)
    out = _out_dir(cfg, path.parent) / MEAN_FILE
    write_json, kept = _plan_mean_json(out, mean, path)  # refusals come before the cache is rewritten
    written: list[Path] = []
    backups: list[Path] = []
    if not current:
        # What neon's update_dataset_cache.py did: mean of each plane, RGB -> BGR, shape (3, 1);
        # we keep the array's float dtype and every other key as it was.
        gm = cache["global_mean"]
        dtype = gm.dtype if gm.dtype.kind == "f" else np.float64
        upgraded = dict(cache, global_mean=bgr.reshape(3, 1).astype(dtype))
        data = _numpy1_global_names(pickle.dumps(upgraded, protocol=NEON_CACHE_PROTOCOL))
        _replace(path, lambda: atomic_write_bytes(path, data), raw, backups)  # backs up the very bytes that were read
        written.append(path)
    if write_json:
        _write_mean_json(out, mean, written, backups)
    read = f"{path} ({what}, {'BGR (3, 1): already current' if current else 'RGB planar'})"
    return UpdateMeanResult(mean, written, backups, not written, read, kept + _scale_notes(rgb))


def _update_mean_file(path: Path, cfg: UpdateMeanConfig) -> UpdateMeanResult:
    """Upgrade one old mean file (dispatch on its suffix, so imagenet_mean.binaryproto works too)."""
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        return _update_neon_cache(path, cfg)
    if suffix == ".json":
        mean = read_mean_file(path)
        if cfg.into is not None:
            raise AlexnetPipeError(f"{path} is already a current {MEAN_FILE}: --into applies to old mean files "
                                   f"(to use this mean for {cfg.into}, copy it there)")
        return UpdateMeanResult(mean, [], [], True, f"{path} (current {MEAN_FILE} format)")
    if suffix == ".binaryproto":
        decoded = _read_binaryproto(path, cfg.channel_order)
    elif suffix == ".npy":
        decoded = _read_npy(path, cfg.channel_order)
    else:
        raise FormatError(f"{path}: unknown mean format; expected a neon dataset_cache.pkl, a Caffe "
                          ".binaryproto, a .npy mean image or a dataset directory")
    prefix = "from" if decoded.what == "per-channel mean" else "upgraded from"
    mean = ChannelMean(tuple(float(v) for v in decoded.rgb), None, "RGB", 0, 0,
                       f"{prefix} {path.name} ({decoded.what})")
    out = _out_dir(cfg, path.parent) / MEAN_FILE
    write_json, kept = _plan_mean_json(out, mean, path)
    written: list[Path] = []
    backups: list[Path] = []
    if write_json:
        _write_mean_json(out, mean, written, backups)
    return UpdateMeanResult(mean, written, backups, not written, decoded.read, kept + decoded.notes)


def run_update_mean(cfg: UpdateMeanConfig) -> UpdateMeanResult:
    """Upgrade an old full-image mean to a per-channel ``mean.json``.

    Args:
        cfg: ``path`` is a dataset directory or one old mean file; ``into`` a directory for
            ``mean.json`` (default: beside the file), an existing dataset (with ``manifest.json``);
            ``channel_order`` the order of an .npy mean.
    Returns:
        what was read, written and backed up. A directory that already holds a valid
        ``mean.json`` is reported as current and left alone.
    Raises:
        AlexnetPipeError: nothing to upgrade, unreadable or malformed input, unsafe pickle, an
            ``--into`` that is not a dataset, a current mean.json that would lose its std or counts.
    """
    path = cfg.path
    if not path.exists():
        raise DatasetError(f"{path} does not exist; expected a dataset directory or an old mean file")
    if not path.is_dir():
        return _update_mean_file(path, cfg)
    if cfg.into is not None and cfg.into.resolve() != path.resolve():
        raise AlexnetPipeError(f"--into is for a single mean file; a dataset directory's {MEAN_FILE} goes "
                               f"into the directory itself. To put it elsewhere, pass the old file: "
                               f"alexnet-pipe update-mean {path / OLD_MEAN_FILES[1]} --into {cfg.into}")
    current = path / MEAN_FILE
    problem = ""
    if current.exists():
        try:
            mean = read_mean_file(current)
        except AlexnetPipeError as exc:
            problem = f" ({current} is not usable: {exc})"
        else:
            return UpdateMeanResult(mean, [], [], True, f"{current} (current {MEAN_FILE} format)")
    for name in OLD_MEAN_FILES:
        if (path / name).is_file():
            return _update_mean_file(path / name, cfg)
    raise DatasetError(f"{path} has no mean to upgrade: looked for a valid {MEAN_FILE} and for "
                       f"{', '.join(OLD_MEAN_FILES)}{problem}")
