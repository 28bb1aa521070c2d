"""Starting from weights: fine-tuning onto other classes (a new fc8, frozen layers, the head's lr),
and imported weights running in train and test with the input they record. Real converted data,
real DALI (CPU), real torch steps through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from alexnet_pipe.apps.synthetic import CLASSES, SynthConfig, make_image_tree
from alexnet_pipe.cli import main
from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.model import checkpoint
from alexnet_pipe.model.alexnet import AlexNetConfig, build_model

RUN = ["-b", "cpu", "--crop", "67", "-z", "8", "--no-progress", "--data-threads", "1", "--init", "kaiming"]
# The target task: four colours under heavy noise. Features of a barely trained network separate
# them, so a few fine-tuning steps must reach high accuracy: a broken head, lr or input would not.
COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40), "yellow": (220, 210, 40)}


def _convert(root: Path) -> Path:
    run_convert(ConvertConfig(src=root / "raw", dst=root / "data", formats=("lmdb",), shard_size=40, workers=1,
                              progress=False, image=ImageSettings(short_side=72)))
    return root / "data"


@pytest.fixture(scope="module")
def ten(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ten")
    make_image_tree(SynthConfig(root / "raw", 6, 1, (96, 72), CLASSES, seed=3, texture=0.3))
    return _convert(root)


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("four")
    rng = np.random.default_rng(1)
    for split, n in (("train", 16), ("val", 4)):
        for name, rgb in COLOURS.items():
            folder = root / "raw" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                noise = rng.normal(0, 40, (72, 96, 3)) + rng.normal(0, 30, 3)
                Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)).save(
                    folder / f"{name}_{i}.JPEG", quality=90)
    return _convert(root)


@pytest.fixture(scope="module")
def source(ten, tmp_path_factory) -> Path:
    """A 10-class model trained here for one epoch."""
    out = tmp_path_factory.mktemp("src") / "ten.pt"
    res = CliRunner().invoke(main, ["train", "-w", str(ten), *RUN, "-e", "1", "--eval-freq", "0", "-s", str(out),
                                    "--lr", "0.02"])
    assert res.exit_code == 0, res.output
    return out


def _train(data: Path, *args: str) -> object:
    return CliRunner().invoke(main, ["train", "-w", str(data), *RUN, *args])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["model"]


def test_other_classes_are_refused_without_finetune(four, source, tmp_path):
    res = _train(four, "-e", "1", "--model-file", str(source), "-s", str(tmp_path / "w.pt"))
    assert res.exit_code == 1
    assert "has 10 classes" in res.output and "add --finetune" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "w.pt").exists()
    res = _train(four, "-e", "1", "--freeze", "conv", "-s", str(tmp_path / "w.pt"))
    assert res.exit_code == 1 and "--freeze conv is for fine-tuning: add --finetune" in res.output


def test_finetuning_onto_four_classes_learns(four, source, tmp_path):
    out, metrics = tmp_path / "ft.pt", tmp_path / "m.jsonl"
    res = _train(four, "-e", "3", "--model-file", str(source), "--finetune", "--lr", "0.005", "-s", str(out),
                 "-o", str(metrics))
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    epochs = [r for r in rows if "epoch" in r and "step" not in r]
    assert len(epochs) == 3
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    assert epochs[-1]["val_top1"] >= 75.0  # chance is 25 % (measured: 100 % after 2 epochs)
    body = checkpoint.load(out)
    assert body["model_config"]["num_classes"] == 4 and body["data"]["classes"] == sorted(COLOURS)
    assert body["start"]["new_head"] is True and body["start"]["model_file"] == str(source)
    src = _weights(source)
    assert body["model"]["fc8.weight"].shape == (4, 4096) and src["fc8.weight"].shape == (10, 4096)
    assert not torch.equal(body["model"]["conv1.weight"], src["conv1.weight"])  # every layer trained


@pytest.mark.parametrize("freeze, frozen, trained", [
    ("conv", ["conv1", "conv2", "conv3", "conv4", "conv5"], ["fc6", "fc7", "fc8"]),
    ("features", ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"], ["fc8"]),
])
def test_freeze_keeps_layers_bit_identical(four, source, tmp_path, freeze, frozen, trained):
    out = tmp_path / "ft.pt"
    res = _train(four, "-e", "1", "--eval-freq", "0", "--model-file", str(source), "--finetune", "--freeze", freeze,
                 "-s", str(out))
    assert res.exit_code == 0, res.output
    src, new = _weights(source), _weights(out)
    for layer in frozen:
        assert torch.equal(src[f"{layer}.weight"], new[f"{layer}.weight"]), layer
        assert torch.equal(src[f"{layer}.bias"], new[f"{layer}.bias"]), layer
    for layer in trained[:-1]:
        assert not torch.equal(src[f"{layer}.weight"], new[f"{layer}.weight"]), layer


def test_new_head_gets_its_own_lr_and_a_resumed_finetune_equals_an_uninterrupted_one(four, source, tmp_path):
    common = ["--eval-freq", "0", "--subset-pct", "50", "--model-file", str(source), "--finetune", "--lr", "0.001",
              "--lr-scale", "none", "--head-lr-mult", "5"]
    res = _train(four, "-e", "2", *common, "-s", str(tmp_path / "a.pt"))
    assert res.exit_code == 0, res.output
    res = _train(four, "-e", "1", *common, "-s", str(tmp_path / "b.pt"), "--serialize", "1")
    assert res.exit_code == 0, res.output
    ckpt = tmp_path / "b.ckpt"
    groups = {g["name"]: g for g in checkpoint.load(ckpt)["optimizer"]["param_groups"]}
    assert groups["weights"]["lr0"] == pytest.approx(0.001) and groups["biases"]["lr0"] == pytest.approx(0.002)
    assert groups["head weights"]["lr0"] == pytest.approx(0.005) and groups["head biases"]["lr0"] == pytest.approx(0.01)
    # The resume command keeps --finetune: a fine-tuning run's checkpoint resumes, it does not restart.
    res = _train(four, "-e", "2", *common[:4], "--model-file", str(ckpt), "--finetune", "--lr", "0.001",
                 "--lr-scale", "none", "--head-lr-mult", "5", "-s", str(tmp_path / "b.pt"))
    assert res.exit_code == 0, res.output
    a, b = _weights(tmp_path / "a.pt"), _weights(tmp_path / "b.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _torchvision_pth(path: Path, seed: int) -> Path:
    """A torchvision AlexNet state_dict (features.N / classifier.N keys) with random weights."""
    net = build_model(AlexNetConfig(num_classes=10, crop=224, arch="torchvision"),
                      generator=torch.Generator().manual_seed(seed))
    names = {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6", "conv4": "features.8",
             "conv5": "features.10", "fc6": "classifier.1", "fc7": "classifier.4", "fc8": "classifier.6"}
    state = {}
    for key, value in net.state_dict().items():
        layer, kind = key.split(".")
        state[f"{names[layer]}.{kind}"] = value
    torch.save(state, path)
    return path


def test_imported_weights_test_and_finetune_with_their_own_input(ten, four, tmp_path):
    pth = _torchvision_pth(tmp_path / "alexnet-owt.pth", seed=5)
    runner = CliRunner()
    res = runner.invoke(main, ["import-weights", str(pth), "-o", str(tmp_path / "numbered.pt")])
    assert res.exit_code == 0, res.output
    # Numbered classes cannot be matched to the dataset's: refused, with the way out.
    res = runner.invoke(main, ["test", "-w", str(ten), "-b", "cpu", "--model-file", str(tmp_path / "numbered.pt")])
    assert res.exit_code == 1 and "re-import the weights with --synsets" in res.output
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("".join(f"{c} a {c}\n" for c in reversed(sorted(CLASSES))))
    res = runner.invoke(main, ["import-weights", str(pth), "-o", str(tmp_path / "tv.pt"), "--synsets", str(synsets)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["test", "-w", str(ten), "-b", "cpu", "--model-file", str(tmp_path / "tv.pt"),
                               "--crop", "96", "--no-progress", "-o", str(tmp_path / "t.jsonl")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "t.jsonl").read_text())["samples"] == 10
    # Fine-tuned at crop 96 (torchvision's network takes any crop): the result keeps the source's
    # architecture and input (RGB, 0..1, ImageNet's mean and std), not this dataset's mean.
    res = _train(four, "-e", "1", "--eval-freq", "0", "--model-file", str(tmp_path / "tv.pt"), "--finetune",
                 "--crop", "96", "--lr", "0.001", "-s", str(tmp_path / "ft.pt"))
    assert res.exit_code == 0, res.output
    body = checkpoint.load(tmp_path / "ft.pt")
    assert body["model_config"] == {"num_classes": 4, "crop": 96, "dropout": 0.5, "arch": "torchvision"}
    assert body["data"]["value_range"] == [0, 1] and body["data"]["std_rgb"] == pytest.approx([0.229, 0.224, 0.225])
    assert body["data"]["mean_rgb"] == pytest.approx([0.485, 0.456, 0.406])
    assert body["start"]["imported_from"] == checkpoint.load(tmp_path / "tv.pt")["imported_from"]["format"]
