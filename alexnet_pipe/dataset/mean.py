"""The dataset mean store: exact pixel statistics, ``mean.json``, the mean image, old formats.

Current format (``mean.json``)::

    {"format": "alexnet-pipe-mean", "version": 1, "channel_order": "RGB",
     "mean": [r, g, b], "std": [r, g, b] | null, "value_range": [0, 255], ...}

What is averaged: the centre S x S of every training image as stored (S = the short side,
256 when sizes are kept; see ``centre_box``), the same pixels as the mean image
``mean_image.npy`` (S x S x 3, RGB, float32) and its Caffe copy ``mean.binaryproto``
(1 x 3 x S x S, BGR). So each plane's mean of the mean image is ``mean.json``'s mean whenever
every image covers the whole S x S (always, when images are scaled up to the short side), and
``update-mean`` on our own ``mean.binaryproto`` gives back ``mean.json``'s mean. neon's old
full-image mean was likewise a centre-crop mean. Training uses the per-channel mean (neon's recipe).

Old formats are full mean images (neon's ``dataset_cache.pkl``, Caffe's
``mean.binaryproto``, ``mean.npy``); where there is no ``mean.json`` beside them, readers
refuse them and point at ``update-mean``.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alexnet_pipe.dataset.layout import MEAN_FILE, MEAN_IMAGE_BINARYPROTO, MEAN_IMAGE_NPY, OLD_MEAN_FILES
from alexnet_pipe.errors import DatasetError, FormatError, InputError, OldMeanFormatError
from alexnet_pipe.formats.blobproto import encode_blobproto
from alexnet_pipe.fsutil import atomic_write_bytes, atomic_write_json

MEAN_FORMAT = "alexnet-pipe-mean"
MEAN_VERSION = 1


@dataclass(frozen=True)
class ChannelMean:
    """Per-channel mean (and std, when known) on the 0..255 scale."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float] | None = None
    channel_order: str = "RGB"
    images: int = 0
    pixels: int = 0
    source: str = ""
    # The 3 x 3 covariance of the pixel values (in ``channel_order``; population, 0..255 scale) or
    # None (a mean converted before it was recorded, or an update-mean of an old mean file).
    covariance: tuple[tuple[float, float, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise InputError(f"channel order must be RGB or BGR, got {self.channel_order}")
        if len(self.mean) != 3 or (self.std is not None and len(self.std) != 3):
            raise InputError("mean and std need exactly three channels")
        if self.covariance is not None and (len(self.covariance) != 3 or any(len(r) != 3 for r in self.covariance)):
            raise InputError("the covariance needs 3 x 3 values")

    def rgb_covariance(self) -> np.ndarray | None:
        """The 3 x 3 covariance in RGB order (float64), or None when not recorded."""
        if self.covariance is None:
            return None
        cov = np.array(self.covariance, np.float64)
        return cov if self.channel_order == "RGB" else cov[::-1, ::-1].copy()

    def rgb(self) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
        """(mean, std) in RGB order, the order DALI decodes to."""
        if self.channel_order == "RGB":
            return tuple(self.mean), None if self.std is None else tuple(self.std)
        return tuple(self.mean[::-1]), None if self.std is None else tuple(self.std[::-1])

    def to_json(self) -> dict:
        return {
            "format": MEAN_FORMAT,
            "version": MEAN_VERSION,
            "channel_order": self.channel_order,
            "value_range": [0, 255],
            "mean": list(self.mean),
            "std": None if self.std is None else list(self.std),
            "images": self.images,
            "pixels": self.pixels,
            "source": self.source,
        } | ({} if self.covariance is None else covariance_json(self.covariance))


def eigen(covariance) -> tuple[list[float], list[list[float]]]:
    """(eigenvalues, eigenvectors) of a 3 x 3 covariance: numpy.linalg.eigh in float64, eigenvalues
    descending, ``eigenvectors[i]`` the unit vector of ``eigenvalues[i]``, its sign fixed so that its
    largest-magnitude component (the first of equals) is positive. The PCA colour augmentation of
    Krizhevsky et al. 2012, section 4.1 adds sum_i alpha_i * lambda_i * p_i, the lambdas those of 0..1
    pixel values (these / 255^2; loading/pipeline.py's lighting_rows)."""
    values, vectors = np.linalg.eigh(np.asarray(covariance, np.float64))
    order = np.argsort(-values, kind="stable")
    out = []
    for i in order:
        v = vectors[:, i]
        out.append([float(x) for x in (v if v[int(np.argmax(np.abs(v)))] > 0 else -v)])
    return [float(values[i]) for i in order], out


def covariance_json(covariance) -> dict:
    """mean.json's covariance fields: the matrix and its eigen-decomposition (``eigen``)."""
    values, vectors = eigen(covariance)
    return {"covariance": [[float(v) for v in row] for row in covariance], "eigenvalues": values,
            "eigenvectors": vectors}


@dataclass
class PixelStats:
    """Exact integer sums over RGB pixels, so merging shards in any order gives the same mean.

    The pixels are those of the mean image: the centre box of every image (``centre_box``).
    """

    images: int = 0
    pixels: int = 0
    sums: list[int] = field(default_factory=lambda: [0, 0, 0])
    sq_sums: list[int] = field(default_factory=lambda: [0, 0, 0])
    # Sums of products of different channels over the same pixels: [r*g, r*b, g*b]. None: not
    # known (a completion record from before they were recorded), and then nothing merged with it is.
    cross_sums: list[int] | None = field(default_factory=lambda: [0, 0, 0])

    def merge(self, other: PixelStats) -> None:
        self.images += other.images
        self.pixels += other.pixels
        for c in range(3):
            self.sums[c] += other.sums[c]
            self.sq_sums[c] += other.sq_sums[c]
        if self.cross_sums is None or other.cross_sums is None:
            self.cross_sums = None
        else:
            self.cross_sums = [a + b for a, b in zip(self.cross_sums, other.cross_sums)]

    def to_json(self) -> dict:
        out = {"images": self.images, "pixels": self.pixels, "sums": self.sums, "sq_sums": self.sq_sums}
        return out if self.cross_sums is None else out | {"cross_sums": self.cross_sums}

    @classmethod
    def from_json(cls, obj: dict) -> PixelStats:
        cross = obj.get("cross_sums")
        return cls(obj["images"], obj["pixels"], list(obj["sums"]), list(obj["sq_sums"]),
                   None if cross is None else [int(v) for v in cross])

    def covariance(self) -> tuple[tuple[float, float, float], ...] | None:
        """The RGB covariance (population: divided by the pixel count) from the exact sums, or None."""
        if self.cross_sums is None or not self.pixels:
            return None
        n, s = self.pixels, self.sums
        rg, rb, gb = self.cross_sums
        products = [[self.sq_sums[0], rg, rb], [rg, self.sq_sums[1], gb], [rb, gb, self.sq_sums[2]]]
        # n * sum(x y) - sum(x) sum(y) is an exact integer: one rounding, in the final division.
        return tuple(tuple((n * products[i][j] - s[i] * s[j]) / (n * n) for j in range(3)) for i in range(3))

    def to_mean(self, source: str) -> ChannelMean:
        if not self.pixels:
            raise DatasetError("no training pixels to compute a mean from (the train split is empty)")
        n = self.pixels
        mean = tuple(s / n for s in self.sums)
        # Var = E[x^2] - E[x]^2 computed from exact integers: no catastrophic cancellation.
        std = tuple(math.sqrt(max(0, q * n - s * s)) / n for s, q in zip(self.sums, self.sq_sums))
        return ChannelMean(mean, std, "RGB", self.images, self.pixels, source, self.covariance())


def write_mean(path: Path, mean: ChannelMean) -> None:
    atomic_write_json(path, mean.to_json())


MEAN_MAX = 255.0  # means are on the 0..255 scale
STD_MAX = 128.0  # values in 0..255 have a std of at most 127.5 (half 0, half 255); rounding aside


def _channels(value, name: str, top: float, where: str) -> tuple[float, float, float]:
    """Three finite numbers in [0, top] (JSON booleans, strings, NaN and infinities refused)."""
    if not isinstance(value, list) or len(value) != 3:
        raise DatasetError(f"{where}: {name} is {json.dumps(value)[:60]}, "
                           "expected one value per channel (three numbers)")
    for c, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= top:
            raise DatasetError(f"{where}: {name}[{c}] is {v!r}, expected a finite number in 0..{top:g}")
    return tuple(float(v) for v in value)


def newer_version(obj) -> int | None:
    """The version of an alexnet-pipe mean.json object newer than this code reads, else None."""
    version = obj.get("version") if isinstance(obj, dict) and obj.get("format") == MEAN_FORMAT else None
    return version if type(version) is int and version > MEAN_VERSION else None


def parse_mean(obj: dict, where: str) -> ChannelMean:
    """Validate a mean.json object; a full-image or unknown mean raises OldMeanFormatError,
    a mean.json with values that are not numbers in range (NaN, inf, booleans, strings, the wrong
    number of channels) raises DatasetError: a reader must not train on those."""
    if not isinstance(obj, dict) or obj.get("format") != MEAN_FORMAT:
        raise OldMeanFormatError(f"{where} is not an alexnet-pipe mean file")
    if obj.get("version") != MEAN_VERSION or isinstance(obj.get("version"), bool):
        raise OldMeanFormatError(f"{where} has mean format version {obj.get('version')!r}, expected {MEAN_VERSION}")
    mean = _channels(obj.get("mean"), "mean", MEAN_MAX, where)
    std = None if obj.get("std") is None else _channels(obj["std"], "std", STD_MAX, where)
    order = obj.get("channel_order", "RGB")
    if order not in ("RGB", "BGR"):
        raise DatasetError(f"{where}: channel_order is {order!r}, expected 'RGB' or 'BGR'")
    if "value_range" in obj and (obj["value_range"] != [0, 255]
                                 or any(isinstance(v, bool) for v in obj["value_range"])):
        raise DatasetError(f"{where}: value_range is {obj['value_range']!r}, expected [0, 255]")
    counts = []
    for key in ("images", "pixels"):
        n = obj.get(key, 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DatasetError(f"{where}: {key} is {n!r}, expected a whole number >= 0")
        counts.append(n)
    source = obj.get("source", "")
    if not isinstance(source, str):
        raise DatasetError(f"{where}: source is {source!r}, expected a string")
    covariance = None if obj.get("covariance") is None else _covariance(obj["covariance"], where)
    return ChannelMean(mean, std, order, counts[0], counts[1], source, covariance)


def _covariance(value, where: str) -> tuple[tuple[float, float, float], ...]:
    """A symmetric 3 x 3 of finite numbers no larger than a 0..255 variance can be."""
    if not isinstance(value, list) or len(value) != 3 or any(not isinstance(r, list) or len(r) != 3 for r in value):
        raise DatasetError(f"{where}: covariance is {json.dumps(value)[:60]}, expected 3 x 3 numbers")
    for i, row in enumerate(value):
        for j, v in enumerate(row):
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                    or abs(v) > STD_MAX * STD_MAX or v != value[j][i]):
                raise DatasetError(f"{where}: covariance[{i}][{j}] is {v!r}, expected a finite number of at most "
                                   f"{STD_MAX * STD_MAX:g} equal to covariance[{j}][{i}]")
    return tuple(tuple(float(v) for v in row) for row in value)


def read_mean_file(path: Path) -> ChannelMean:
    """Read and validate a mean.json (see ``parse_mean``).

    Raises:
        DatasetError: unreadable, a newer format version, or values that are not a usable mean (the
            message names the fix).
        OldMeanFormatError: not our mean format.
    """
    try:
        if path.exists() and not path.is_file():  # a FIFO or device would block or never end
            raise OSError("not a regular file")
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise DatasetError(f"cannot read {path} ({str(exc)[:200]}); {MEAN_FIX}") from exc
    if newer_version(obj) is not None:  # not an old format: update-mean would be the wrong advice
        raise DatasetError(f"{path} has mean format version {newer_version(obj)}, newer than this alexnet-pipe "
                           f"reads ({MEAN_VERSION}); use a newer alexnet-pipe")
    try:
        return parse_mean(obj, str(path))
    except OldMeanFormatError:
        raise
    except DatasetError as exc:
        raise DatasetError(f"{exc}; {MEAN_FIX}") from exc


# What repairs a damaged mean.json of a converted dataset: convert's last step writes it.
MEAN_FIX = ("rerun the alexnet-pipe convert command that made the dataset (it rewrites mean.json from the shards' "
            "pixel sums), or run alexnet-pipe update-mean on the old mean file it came from")


def missing_std_fix(root: Path) -> str:
    """What gives ``root/mean.json`` back its std (for ``--normalize-std``): a backup that holds one
    (an older update-mean replaced convert's mean.json by a mean without std), else a convert rerun."""
    path = root / MEAN_FILE
    for backup in sorted(root.glob(f"{MEAN_FILE}.bak*")):
        try:
            if read_mean_file(backup).std is not None:
                return f"its backup {backup} has one: mv {backup} {path}"
        except (DatasetError, OldMeanFormatError):
            continue
    return ("rerun the alexnet-pipe convert command that made the dataset (it writes mean.json with the std), "
            "or drop --normalize-std")


def load_dataset_mean(root: Path) -> ChannelMean:
    """The per-channel mean of a dataset directory.

    Raises:
        OldMeanFormatError: only an old full-image mean is there; the message names the fix.
        DatasetError: no mean at all.
    """
    fix = f"run: alexnet-pipe update-mean {root}"
    path = root / MEAN_FILE
    old = [name for name in OLD_MEAN_FILES if (root / name).exists()]
    if path.exists():
        try:
            return read_mean_file(path)
        except OldMeanFormatError as exc:
            raise OldMeanFormatError(f"{exc}: {root} holds an old mean format; {fix}") from exc
    if old:
        raise OldMeanFormatError(f"{root} holds an old full-image mean ({', '.join(old)}); {fix}")
    raise DatasetError(f"{root} has no {MEAN_FILE}; convert the dataset with alexnet-pipe convert")


# ---------------------------------------------------------------- the mean image


@dataclass(frozen=True)
class CentreBox:
    """The part of a W x H image that the S x S mean image covers, and where it lands in it."""

    x: int  # left column in the image
    y: int  # top row in the image
    width: int
    height: int
    canvas_x: int  # left column in the S x S canvas
    canvas_y: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def centre_box(width: int, height: int, size: int) -> CentreBox:
    """The centre ``min(size, width)`` x ``min(size, height)`` of an image, centred in the canvas.

    Example: a 341 x 256 image with size 256 gives x=42, y=0, 256 x 256 at canvas (0, 0); a
    100 x 80 image (sizes kept) gives the whole image at canvas (78, 88).
    """
    w, h = min(size, width), min(size, height)
    return CentreBox((width - w) // 2, (height - h) // 2, w, h, (size - w) // 2, (size - h) // 2)


def _smallest_uint(arr: np.ndarray) -> np.ndarray:
    """The array in the narrowest unsigned dtype that holds its values exactly."""
    top = int(arr.max()) if arr.size else 0
    for dtype in (np.uint16, np.uint32, np.uint64):
        if top <= np.iinfo(dtype).max:
            return arr.astype(dtype)
    raise ValueError(f"value {top} does not fit 64 bits")


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A .npz whose bytes depend only on the arrays (np.savez stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            # Level 1: 4x faster than the default 6 on a shard's sums, and a few percent larger.
            zf.writestr(info, member.getvalue(), compresslevel=1)
    return buf.getvalue()


class MeanImageSum:
    """Exact per-pixel sums of centre boxes on an S x S canvas (RGB) and how many covered each pixel.

    Integer sums make merging shards and worker chunks order-free: any worker count, resume or
    ``--part`` split gives the same mean image.
    """

    def __init__(self, size: int):
        self.size = size
        self.sum = np.zeros((size, size, 3), np.uint64)
        self.count = np.zeros((size, size), np.uint64)

    def add(self, sums: np.ndarray, counts: np.ndarray) -> None:
        if sums.shape != self.sum.shape or counts.shape != self.count.shape:
            raise ValueError(f"mean sums of shape {sums.shape} do not fit a {self.size} x {self.size} canvas")
        self.sum += sums
        self.count += counts

    def to_bytes(self) -> bytes:
        """Deterministic .npz (``sum``, ``count``) in the smallest exact dtypes."""
        return _npz_bytes({"sum": _smallest_uint(self.sum), "count": _smallest_uint(self.count)})

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> MeanImageSum:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                sums, counts = z["sum"], z["count"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            raise FormatError(f"{where} is not a readable mean-image sum ({exc})") from exc
        if sums.ndim != 3 or sums.shape[2] != 3 or counts.shape != sums.shape[:2] or sums.shape[0] != sums.shape[1]:
            raise FormatError(f"{where} holds sums of shape {sums.shape} and counts {counts.shape}; "
                              "expected S x S x 3 and S x S")
        out = cls(sums.shape[0])
        out.add(sums.astype(np.uint64), counts.astype(np.uint64))
        return out

    def image(self) -> np.ndarray:
        """S x S x 3 float32 RGB: sum / count where some image covered the pixel, else 0."""
        covered = np.maximum(self.count, 1).astype(np.float64)[..., None]
        return (self.sum.astype(np.float64) / covered).astype(np.float32)


def write_mean_image(root: Path, sums: MeanImageSum, images: int) -> dict:
    """Write ``mean_image.npy`` and ``mean.binaryproto`` (atomically); return the manifest entry.

    The binaryproto is what Caffe's ``compute_image_mean`` writes: a BlobProto with
    num=1, channels=3, height=S, width=S and packed float data in C x H x W BGR order.
    """
    image = sums.image()
    buf = io.BytesIO()
    np.save(buf, image, allow_pickle=False)
    atomic_write_bytes(root / MEAN_IMAGE_NPY, buf.getvalue())
    atomic_write_bytes(root / MEAN_IMAGE_BINARYPROTO, encode_blobproto(image[..., ::-1].transpose(2, 0, 1)))
    return {"npy": MEAN_IMAGE_NPY, "binaryproto": MEAN_IMAGE_BINARYPROTO, "size": sums.size, "images": images}
