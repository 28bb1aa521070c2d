"""Crafted weights and checkpoints with a valid SHA-256 trailer (model/body_schema.py): every field
a reader uses is checked first, and a bad one is refused in one line naming it."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.errors import CheckpointError
from alexnet_pipe.model import checkpoint
from alexnet_pipe.model.alexnet import AlexNetConfig, build_model
from tests.helpers.datasets import shapes_dataset

MC = AlexNetConfig(num_classes=2, crop=67)


@pytest.fixture(scope="module")
def state() -> dict:
    return build_model(MC, generator=torch.Generator().manual_seed(0)).state_dict()


def body(state, kind="weights", **changes) -> dict:
    b = {"kind": kind, "model": dict(state), "model_config": MC.to_dict(),
         "data": {"classes": ["circle", "square"], "class_names": ["", ""], "mean_rgb": [120.0, 110.0, 100.0],
                  "std_rgb": None, "crop": 67, "short_side": 72, "channel_order": "RGB", "value_range": [0, 255]}}
    if kind == "checkpoint":
        b.update(epoch=1, history=[{"epoch": 1}], optimizer={"state": {}, "param_groups": []}, partial=None)
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            b[outer] = dict(b[outer], **{inner: value})
        else:
            b[key] = value
    return b


CASES = {
    "num_classes a string": (dict(model_config={"num_classes": "2", "crop": 67}), "model_config"),
    "classes an int": ({"data.classes": 2}, "data.classes"),
    "classes a prefix": ({"data.classes": ["circle"]}, "data.classes"),
    "data a list": (dict(data=[1, 2]), "data is a list"),
    "a NaN mean": ({"data.mean_rgb": [math.nan, 1.0, 1.0]}, "data.mean_rgb"),
    "a mean out of range": ({"data.mean_rgb": [1e9, 1.0, 1.0]}, "data.mean_rgb"),
    "short_side 1e9": ({"data.short_side": 10**9}, "data.short_side"),
    "channel order": ({"data.channel_order": "\x1b[2J"}, "data.channel_order"),
}
CKPT_CASES = {
    "partial with an unknown key": (dict(partial={"step": 1, "evil": 2}), "partial"),
    "history an int": (dict(history=5), "history"),
    "no epoch": (dict(epoch=None), "epoch"),
    "optimizer a list": (dict(optimizer=[]), "optimizer"),
}


@pytest.mark.parametrize("case", sorted(CASES) + sorted(CKPT_CASES))
def test_each_bad_field_is_named(state, tmp_path, case):
    changes, field = CASES.get(case) or CKPT_CASES[case]
    path = tmp_path / "crafted.pt"
    checkpoint.save(path, body(state, "checkpoint" if case in CKPT_CASES else "weights", **changes))
    with pytest.raises(CheckpointError) as exc:
        checkpoint.load(path)
    msg = str(exc.value)
    assert field in msg and "\x1b" not in msg and len(msg) < 400, msg


@pytest.mark.parametrize("make", ["sparse", "meta", "nan", "shape", "int", "extra"])
def test_tensors_the_network_cannot_take_are_refused(state, tmp_path, make):
    model = dict(state)
    w = model["fc8.weight"]
    model["fc8.weight"] = {"sparse": w.to_sparse(), "meta": torch.empty_like(w, device="meta"),
                           "nan": w.clone().fill_(math.nan), "shape": w[:1].clone(),
                           "int": w.to(torch.int32), "extra": w}[make]
    if make == "extra":
        model["evil.weight"] = w
    path = tmp_path / "crafted.pt"
    checkpoint.save(path, body(state, model=model))
    with pytest.raises(CheckpointError, match=r"model\['(fc8|evil)\.weight'\]"):
        checkpoint.load(path)


def test_the_readers_give_one_line(state, tmp_path):
    data = shapes_dataset(tmp_path / "d")
    path = tmp_path / "crafted.pt"
    checkpoint.save(path, body(state, **{"data.mean_rgb": [math.nan, 0.0, 0.0]}))
    image = next((tmp_path / "d" / "raw" / "train").rglob("*.*"))
    for args in (["test", "-w", str(data), "-b", "cpu", "--model-file", str(path)],
                 ["train", "-w", str(data), "-b", "cpu", "-e", "1", "--model-file", str(path)],
                 ["predict", "-b", "cpu", "--model-file", str(path), str(image)]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1 and "data.mean_rgb holds NaN" in res.output, res.output
        assert "Traceback" not in res.output and "nan%" not in res.output
    good = tmp_path / "good.pt"
    checkpoint.save(good, body(state))
    assert checkpoint.load(good)["data"]["classes"] == ["circle", "square"]


def _consume(body: dict) -> None:
    """What test, predict and train do with a loaded body (train/start.py, apps/predict.py)."""
    from alexnet_pipe.model.inputspec import InputSpec

    mc = AlexNetConfig.from_dict(body["model_config"])
    spec = InputSpec.from_data(body["data"], mc.crop)
    assert all(math.isfinite(v) for v in spec.mean_rgb)
    with torch.device("meta"):
        model = build_model(mc)
    model.load_state_dict(body["model"], assign=True)


@pytest.mark.faults
def test_seeded_field_mutations_load_whole_or_give_one_line(state, tmp_path):
    """100 seeded mutants, each one field of a weights or checkpoint body set to a hostile value:
    each is refused with a CheckpointError naming a field, or loads and is used without error."""
    import random

    rng = random.Random(23)
    hostile = [None, "", "\x1b[2J", 0, -1, 10**18, 1e308, math.nan, math.inf, True, [], {}, [1, 2, 3], {"a": 1},
               [[[]]], torch.zeros(2), torch.tensor(math.nan)]
    fields_ = ["model_config.num_classes", "model_config.crop", "model_config.arch", "model_config.dropout",
               "data.classes", "data.class_names", "data.mean_rgb", "data.std_rgb", "data.value_range",
               "data.channel_order", "data.short_side", "data.squash", "data.crop", "epoch", "history",
               "optimizer", "partial", "world_size", "global_batch", "train_config", "start", "model_config",
               "data", "model"]
    refused = loaded = 0
    for i in range(100):
        field, value = rng.choice(fields_), rng.choice(hostile)
        b = body(state, "checkpoint" if rng.random() < 0.5 else "weights", **{field: value})
        path = tmp_path / f"m{i}.pt"
        checkpoint.save(path, b)
        try:
            loaded_body = checkpoint.load(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc) and "\x1b" not in str(exc) and len(str(exc)) < 500, (field, value, exc)
            refused += 1
        else:
            _consume(loaded_body)
            loaded += 1
        path.unlink()
    assert refused > 50 and loaded > 3  # both outcomes are exercised
