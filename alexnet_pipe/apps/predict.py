"""`predict`: top-5 classes of image files with a weights file, through the validation preprocessing.

Every image takes the path a validation image takes into the network: the converter's own
``imaging.process`` (allowed decoders only, EXIF rotation, ICC to sRGB, short side to the
weights' ``short_side`` or squashed to their ``squash`` H x W, JPEG at the converter's default
quality, or the file's own bytes where the converter keeps them), then what the DALI validation
pipeline does to the stored JPEG:
libjpeg-turbo decoding (OpenCV's, which gives DALI's CPU decoder's pixels), a centre crop placed
as DALI places it, and the weights' channel order, mean and std (``InputSpec``). So a converted
image and the same file given to ``predict`` reach the network as the same tensor
(tests/apps/test_predict.py compares them with the DALI loader).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from alexnet_pipe.config import DECODE_MEMORY_MB, ImageSettings, check_decode_memory, default_workers
from alexnet_pipe.errors import CheckpointError, ConfigError
from alexnet_pipe.imaging.budget import DecodeBudget, installed
from alexnet_pipe.imaging.process import process
from alexnet_pipe.imaging.read import read_source
from alexnet_pipe.imaging.reasons import BadImage
from alexnet_pipe.inputs.entries import not_a_file
from alexnet_pipe.inputs.table import Source
from alexnet_pipe.model.alexnet import AlexNetConfig, build_model
from alexnet_pipe.model.inputspec import InputSpec
from alexnet_pipe.model.model_file import open_model_file
from alexnet_pipe.text import shown
from alexnet_pipe.train.runtime import padded_warning, torch_device

log = logging.getLogger(__name__)

TOP_K = 5
# What a folder expands to: files with these suffixes (the allowed formats' usual names, any
# case). Other files in folders are passed over and counted; a file named on the command line
# is always read, whatever its name.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class PredictConfig:
    """Inputs of the `predict` job."""

    model_file: Path  # this project's weights or checkpoint, or a neon/Caffe/torchvision file (model_file.py)
    inputs: tuple[Path, ...]  # image files and folders, in the order given
    batch_size: int = 64
    backend: str = "cpu"  # "gpu" or "cpu"; the CLI picks gpu when one is present
    device_id: int = 0
    workers: int = field(default_factory=lambda: min(8, default_workers()))  # threads preparing images
    synsets: Path | None = None  # a foreign model_file's class list, in the order of its fc8 rows
    decode_memory_mb: int = DECODE_MEMORY_MB  # the threads' decodes together (imaging/budget.py)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("no images given; pass image files or folders")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.backend not in ("gpu", "cpu"):
            raise ConfigError(f"backend must be gpu or cpu, got {self.backend}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        check_decode_memory(self.decode_memory_mb)


@dataclass(frozen=True)
class Guess:
    index: int  # the network's output row (the class's position in the sorted class list)
    id: str  # wnid
    name: str  # "" when the weights carry no names
    prob: float


@dataclass(frozen=True)
class Prediction:
    """One input's answer: its top classes, or why it could not be read."""

    path: str
    top: tuple[Guess, ...] = ()
    error: str | None = None

    def to_json(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "top5": [{"index": g.index, "id": g.id, "name": g.name, "prob": g.prob}
                                            for g in self.top]}


@dataclass(frozen=True)
class PredictResult:
    predictions: list[Prediction]  # one per input image (and per unreadable input), in input order
    spec: InputSpec  # what the network was fed
    num_classes: int
    device: str
    passed_over: list[str]  # files inside folders that are not images by their suffix

    @property
    def failed(self) -> int:
        return sum(p.error is not None for p in self.predictions)


# ----------------------------------------------------------------------------- inputs


def expand_inputs(inputs: Iterable[Path]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Inputs -> ([(path, error or None)], [files passed over]). A folder becomes its image files,
    found recursively and sorted by path (as ``find | sort``), hidden files and folders skipped; a file stays as
    given; a missing path or a folder without images is an entry with its error."""
    items: list[tuple[str, str | None]] = []
    passed_over: list[str] = []
    for path in inputs:
        if path.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if name.startswith("."):
                        continue
                    full = os.path.join(dirpath, name)
                    (found if Path(name).suffix.lower() in IMAGE_SUFFIXES else passed_over).append(full)
            # A link to /dev/zero or a FIFO found here: named as such, never opened.
            items += [(f, not_a_file(f)) for f in sorted(found)]
            if not found:
                items.append((str(path), f"folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"))
        elif path.is_file():
            items.append((str(path), None))
        else:
            items.append((str(path), "not a regular file" if path.exists() else "no such file or folder"))
    return items, passed_over


# ----------------------------------------------------------------------------- preprocessing


def image_settings(spec: InputSpec) -> ImageSettings:
    """The converter's settings for the weights' short side, or their squash (its defaults otherwise)."""
    if spec.squash is not None:
        return ImageSettings(resize="squash", resize_height=spec.squash[0], resize_width=spec.squash[1])
    return ImageSettings(short_side=spec.short_side)


def crop_anchor(size: int, crop: int) -> int:
    """Where DALI's centre crop (crop_pos 0.5) starts: roundf(0.5 * (size - crop)), halves away
    from zero; negative when the image is smaller than the crop (the rest is padding)."""
    half = (size - crop) / 2  # exact in binary: float32 gives DALI the same value
    return int(math.copysign(math.floor(abs(half) + 0.5), half))


def centre_crop(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """H x W x 3 uint8 -> 3 x crop x crop network input: DALI's crop_mirror_normalize of the
    validation pipeline (centre crop, normalised, zero where the crop overhangs the image)."""
    h, w = rgb.shape[:2]
    c = spec.crop
    y0, x0 = crop_anchor(h, c), crop_anchor(w, c)
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(h, y0 + c), min(w, x0 + c)
    out = np.zeros((3, c, c), np.float32)
    out[:, ys - y0 : ye - y0, xs - x0 : xe - x0] = spec.normalize(rgb[ys:ye, xs:xe])
    return out


def decode_stored(jpeg: bytes) -> np.ndarray:
    """A stored JPEG -> H x W x 3 uint8 RGB, decoded by libjpeg-turbo (islow DCT, fancy upsampling)
    as DALI's CPU decoder does."""
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise BadImage("the converted JPEG could not be decoded")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def stored_jpeg(path: str, settings: ImageSettings) -> bytes:
    """The JPEG the converter would store for the file at ``path`` (raises BadImage, OSError)."""
    data = read_source(Source(name=path, label=0, path=path), settings.max_file_mb)
    return process(data, settings).jpeg


def preprocess(path: str, spec: InputSpec) -> np.ndarray:
    """One image file -> its 3 x crop x crop network input (raises BadImage, OSError)."""
    return _preprocess(path, spec)[0]


def _preprocess(path: str, spec: InputSpec) -> tuple[np.ndarray, int]:
    """``preprocess``, and the short side of the image the crop is cut from."""
    rgb = decode_stored(stored_jpeg(path, image_settings(spec)))
    return centre_crop(rgb, spec), min(rgb.shape[:2])


def _prepare(path: str, spec: InputSpec) -> tuple[np.ndarray, int] | str:
    """``_preprocess``, or the one-line reason the file cannot be used."""
    try:
        return _preprocess(path, spec)
    except BadImage as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read the file ({exc.strerror or type(exc).__name__})"
    except Exception as exc:  # a decoder's unforeseen error on odd data: this input only
        return f"cannot read this image ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"


# ----------------------------------------------------------------------------- the network


@dataclass
class Network:
    model: torch.nn.Module
    spec: InputSpec
    classes: list[str]
    names: list[str]
    device: torch.device


def load_network(path: Path, device: torch.device, synsets: Path | None = None) -> Network:
    """The model and input spec a weights or checkpoint file describes (another tool's weights
    imported in memory, their classes from ``synsets``), in eval mode on ``device``."""
    body = open_model_file(path, synsets=synsets).body
    try:
        cfg = AlexNetConfig.from_dict(body["model_config"])
        spec = InputSpec.from_data(body["data"], cfg.crop)
        with torch.device("meta"):  # no random init to throw away: the file's tensors are assigned
            model = build_model(cfg)
        model.load_state_dict(body["model"], assign=True)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"{path} does not describe a network predict can build "
                              f"({' '.join(str(exc).split())[:300]})") from exc
    classes = [str(c) for c in body["data"].get("classes") or range(cfg.num_classes)]  # none listed: numbered
    names = [str(n) for n in body["data"].get("class_names") or []]
    if len(classes) != cfg.num_classes:
        raise CheckpointError(f"{path} lists {len(classes)} classes for a network with {cfg.num_classes} outputs; "
                              "the file is damaged")
    names = names if len(names) == len(classes) else [""] * len(classes)
    return Network(model.to(device).eval(), spec, classes, names, device)


def top_classes(net: Network, inputs: np.ndarray) -> list[tuple[Guess, ...]]:
    """N x 3 x crop x crop inputs -> each one's top-5 (fewer with fewer classes), most likely first."""
    with torch.inference_mode():
        logits = net.model(torch.from_numpy(inputs).to(net.device))
        probs, idx = torch.softmax(logits.float(), dim=1).topk(min(TOP_K, len(net.classes)), dim=1)
    return [tuple(Guess(int(i), net.classes[i], net.names[i], float(p)) for p, i in zip(prow.tolist(), irow.tolist()))
            for prow, irow in zip(probs.cpu(), idx.cpu())]


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_predict(cfg: PredictConfig) -> PredictResult:
    """Predict every image of ``cfg.inputs``; unreadable inputs get their error, the others a top-5."""
    net = load_network(cfg.model_file, torch_device(cfg.backend, cfg.device_id), cfg.synsets)
    device = str(net.device) if net.device.type == "cpu" else torch.cuda.get_device_name(net.device)
    log.info("%s: %s network, %d classes, crop %d of the image %s, input %s; on %s", cfg.model_file,
             net.model.cfg.arch, len(net.classes), net.spec.crop, net.spec.geometry(), net.spec.describe(), device)
    items, passed_over = expand_inputs(cfg.inputs)
    predictions: list[Prediction] = []
    small = 0  # images whose short side is below the crop (padded)
    # The decoding threads share a memory budget (imaging/budget.py): images just under the pixel limit
    # are not decoded all at once.
    with installed(DecodeBudget(cfg.decode_memory_mb << 20)), ThreadPoolExecutor(cfg.workers) as pool:
        for chunk in _chunks(items, cfg.batch_size):  # OpenCV and Pillow release the GIL while decoding
            ready = list(pool.map(lambda item: item[1] or _prepare(item[0], net.spec), chunk))
            good = [k for k, r in enumerate(ready) if not isinstance(r, str)]
            tops = top_classes(net, np.stack([ready[k][0] for k in good])) if good else []
            small += sum(ready[k][1] < net.spec.crop for k in good)
            answers = dict(zip(good, tops))
            predictions += [Prediction(path, answers[k]) if k in answers else Prediction(path, error=ready[k])
                            for k, (path, _) in enumerate(chunk)]
    if small:
        log.warning("%s", padded_warning(f"{small} of {len(predictions)} images", net.spec.crop, _small_fix(net.spec)))
    return PredictResult(predictions, net.spec, len(net.classes), device, passed_over)


def _small_fix(spec: InputSpec) -> str:
    """What predict can do about images below the crop: larger images, where it keeps their size."""
    if spec.squash is not None:
        return (f"the weights squash every image to {spec.squash[1]}x{spec.squash[0]}, below their crop, as their "
                "training data was")
    if spec.short_side == 0:  # the weights' data kept each image's size (convert --short-side 0)
        return f"pass images at least {spec.crop} pixels on the short side"
    return (f"the weights resize every image to short side {spec.short_side}, below their crop, as their training "
            "data was")


def format_table(result: PredictResult) -> str:
    """The human-readable answer: per image its path, then a line per class (or its error). Class ids
    and names come from the weights file, paths from the disk: escaped (ESC[2J must not reach the
    terminal as itself) and ids and names cut to 100 characters (the JSON keeps them whole)."""
    lines = []
    for p in result.predictions:
        lines.append(shown(p.path))
        if p.error is not None:
            lines.append(f"  error: {shown(p.error)}")
            continue
        ids = [shown(g.id, 100) for g in p.top]
        width = max(map(len, ids))
        for rank, (g, gid) in enumerate(zip(p.top, ids), 1):
            lines.append(f"  {rank}. {100 * g.prob:6.2f}%  {g.index:>4}  {gid:<{width}}  {shown(g.name, 100)}".rstrip())
    return "\n".join(lines)
