"""The one schema a weights or checkpoint body meets before any field of it is used.

The SHA-256 trailer proves a file is whole, not who wrote it: a crafted file with a valid trailer
reaches ``test``, ``predict``, ``train --model-file`` and ``import-weights`` as readily as ours.
``check`` reads every field those use (types, ranges, finite numbers, tensors the network can
take) and refuses the first bad one in one line naming it, so no reader meets a string
``num_classes``, a NaN mean (``nan%`` predictions with exit 0 before), a sparse or meta tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from alexnet_pipe.config import MAX_SIDE  # short_side, squash, crop: no image this project reads is larger
from alexnet_pipe.errors import CheckpointError

MAX_CLASSES = 1 << 20  # ImageNet-21k has 21,841; a million fc8 rows is already a 16 GB fc8
_PARTIAL_KEYS = ("step", "loss_sum", "samples", "seconds", "data_wait_s")  # train/state.py's Partial


class _Bad(Exception):
    def __init__(self, field: str, what: str):
        super().__init__(f"{field} {what}")


def check(body: Mapping, path: Path) -> None:
    """Raise CheckpointError naming the first field of ``body`` that is not as this project writes it."""
    try:
        _check(body)
    except _Bad as exc:
        raise CheckpointError(f"{path}: {exc}; the file is damaged or was not written by alexnet-pipe") from None


def _check(body: Mapping) -> None:
    from alexnet_pipe.model.alexnet import AlexNetConfig, build_model

    mc_dict = _mapping(body.get("model_config"), "model_config")
    try:
        mc = AlexNetConfig.from_dict(mc_dict)
    except (TypeError, ValueError) as exc:
        raise _Bad("model_config", f"is not a network's ({' '.join(str(exc).split())[:200]})") from None
    _int(mc.num_classes, "model_config.num_classes", 1, MAX_CLASSES)
    _int(mc.crop, "model_config.crop", 1, MAX_SIDE)
    model = _mapping(body.get("model"), "model")
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {k: tuple(v.shape) for k, v in build_model(mc).state_dict().items()}
    for key, value in model.items():
        _tensor(key, value, expected)
    missing = sorted(set(expected) - set(model))
    if missing:
        raise _Bad("model", f"lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    _data(_mapping(body.get("data"), "data"), mc.num_classes)
    if body.get("kind") == "checkpoint":
        _checkpoint(body)


def _mapping(value, field: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise _Bad(field, f"is {_kind(value)}, expected a dict")
    return value


def _tensor(key, value, expected: dict[str, tuple[int, ...]]) -> None:
    field = f"model[{str(key)[:60]!r}]"
    if key not in expected:
        raise _Bad(field, "is no parameter of the network its model_config describes")
    if not isinstance(value, torch.Tensor):
        raise _Bad(field, f"is {_kind(value)}, expected a tensor")
    if value.layout != torch.strided or value.is_quantized or value.is_meta or not value.dtype.is_floating_point:
        raise _Bad(field, f"is a {value.layout} {value.dtype} tensor{' (meta)' if value.is_meta else ''}, "
                          "expected a dense floating-point one")
    if tuple(value.shape) != expected[key]:
        raise _Bad(field, f"has shape {tuple(value.shape)}, the network {expected[key]}")
    if not bool(torch.isfinite(value).all()):
        raise _Bad(field, "holds NaN or infinite values")


def _data(data: Mapping, num_classes: int) -> None:
    for name in ("classes", "class_names"):
        listed = data.get(name)
        if listed is None or (name == "class_names" and listed == []):
            continue
        if not isinstance(listed, list) or not all(isinstance(c, str) for c in listed):
            raise _Bad(f"data.{name}", f"is {_kind(listed)}, expected a list of strings")
        if len(listed) != num_classes:
            raise _Bad(f"data.{name}", f"lists {len(listed)} classes for a network with {num_classes} outputs")
    lo, hi = _numbers(data.get("value_range", (0, 255)), "data.value_range", 2)
    if not lo < hi:
        raise _Bad("data.value_range", f"is {lo}..{hi}, expected low < high")
    if "mean_rgb" in data:
        for v in _numbers(data["mean_rgb"], "data.mean_rgb", 3):
            if not lo <= v <= hi:
                raise _Bad("data.mean_rgb", f"holds {v}, outside the value range {lo:g}..{hi:g}")
    if data.get("std_rgb") is not None:
        if min(_numbers(data["std_rgb"], "data.std_rgb", 3)) <= 0:
            raise _Bad("data.std_rgb", "holds a value <= 0")
    if data.get("channel_order", "RGB") not in ("RGB", "BGR"):
        raise _Bad("data.channel_order", f"is {data.get('channel_order')!r:.60}, expected RGB or BGR")
    if data.get("short_side") is not None:
        _int(data["short_side"], "data.short_side", 0, MAX_SIDE)
    if data.get("squash") is not None:
        squash = data["squash"]
        if not isinstance(squash, (list, tuple)) or len(squash) != 2:
            raise _Bad("data.squash", f"is {_kind(squash)}, expected [height, width]")
        for v in squash:
            _int(v, "data.squash", 1, MAX_SIDE)
    if data.get("crop") is not None:
        _int(data["crop"], "data.crop", 1, MAX_SIDE)


def _checkpoint(body: Mapping) -> None:
    _int(body.get("epoch"), "epoch", 0, None)
    history = body.get("history", [])
    if not isinstance(history, list) or not all(isinstance(r, Mapping) for r in history):
        raise _Bad("history", f"is {_kind(history)}, expected a list of epoch rows")
    optimizer = _mapping(body.get("optimizer"), "optimizer")
    if not isinstance(optimizer.get("param_groups"), list) or not isinstance(optimizer.get("state"), Mapping):
        raise _Bad("optimizer", "is not an optimizer's state (param_groups, state)")
    partial = body.get("partial")
    if partial:
        partial = _mapping(partial, "partial")
        unknown = sorted(str(k)[:40] for k in partial if k not in _PARTIAL_KEYS)
        if unknown:
            raise _Bad("partial", f"holds unknown keys {unknown[:4]}")
        for key, value in partial.items():
            (_int(value, f"partial.{key}", 0, None) if key in ("step", "samples")
             else _numbers([value], f"partial.{key}", 1))
    for key in ("world_size", "global_batch"):
        if body.get(key) is not None:
            _int(body[key], key, 1, None)
    for key in ("train_config", "start", "scaler"):
        if body.get(key) is not None:
            _mapping(body[key], key)


def _numbers(value, field: str, n: int) -> list[float]:
    if (not isinstance(value, (list, tuple)) or len(value) != n
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise _Bad(field, f"is {_kind(value)}, expected {n} numbers")
    if not all(math.isfinite(v) for v in value):
        raise _Bad(field, "holds NaN or infinite values")
    return [float(v) for v in value]


def _int(value, field: str, lo: int, hi: int | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        raise _Bad(field, f"is {_kind(value)}, expected an integer >= {lo}" + (f" and <= {hi}" if hi else ""))
    return value


def _kind(value) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)[:40]
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return f"a {type(value).__name__}"

