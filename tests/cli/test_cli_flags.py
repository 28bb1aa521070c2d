"""One flag style: hyphenated names in --help, the neon spellings still accepted, `test` with its
own option set and the settings of its weights file, -v after the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from alexnet_pipe.cli import main
from tests.helpers.datasets import shapes_dataset, train_one_epoch

NEON = ["--data_dir", "--save_path", "--model_file", "--test_only", "-eval", "--eval_freq", "--device_id",
        "--rng_seed", "--batch_size", "--subset_pct", "--output_file", "--no_progress_bar"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return shapes_dataset(tmp_path_factory.mktemp("flags"), short_side=72)


def test_help_shows_hyphenated_names_only():
    for command in ("train", "test", "benchmark", "inspect"):
        text = CliRunner().invoke(main, [command, "--help"]).output
        assert not any(f"{flag} " in text or f"{flag}," in text for flag in NEON), command
    train_help = CliRunner().invoke(main, ["train", "--help"]).output
    for flag in ("--data-dir", "--save-path", "--model-file", "--eval-freq", "--batch-size", "--no-progress"):
        assert flag in train_help
    assert "Examples:" in train_help


def test_test_has_its_own_options():
    text = CliRunner().invoke(main, ["test", "--help"]).output
    assert "--model-file" in text and "[required]" in text
    for training_only in ("--epochs", "--lr", "--momentum", "--serialize", "--init", "--crop"):
        assert f"{training_only} " not in text


def test_the_seeds_spellings_run_and_test_takes_the_crop_from_the_weights(data, tmp_path):
    runner = CliRunner()
    neon = ["--data_dir", str(data), "-b", "cpu", "--crop", "67", "--batch_size", "4", "--no_progress_bar",
            "--data-threads", "1", "-e", "1", "-eval", "0", "--save_path", str(tmp_path / "w.pt"),
            "--output_file", str(tmp_path / "m.jsonl")]
    res = runner.invoke(main, ["train", *neon, "-v"])  # -v after the command
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])["epoch"] == 1
    # No --crop: the weights say 67. Under the default 224 the network would not even take the input.
    res = runner.invoke(main, ["test", "-w", str(data), "-b", "cpu", "--model-file", str(tmp_path / "w.pt"),
                               "--no-progress", "--data-threads", "1"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("LogLoss:")
    res = runner.invoke(main, ["train", "--data_dir", str(data), "-b", "cpu", "--test_only", "--crop", "67",
                               "--model_file", str(tmp_path / "w.pt"), "--no_progress_bar", "--data-threads", "1"])
    assert res.exit_code == 0 and res.output.startswith("LogLoss:"), res.output  # neon's --test_only line
    res = runner.invoke(main, ["test", "-w", str(data), "-b", "cpu", "--model-file", str(tmp_path / "w.pt"),
                               "--crop", "99"])
    assert res.exit_code == 1
    assert "was trained with --crop 67" in res.output


def _one_line_error(res) -> str:
    assert res.exit_code in (1, 2), res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.output
    return errors[0]


def test_mistakes_give_one_line_with_what_to_do(data, tmp_path):
    runner = CliRunner()
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 20)
    (tmp_path / "notes.txt").write_text("hello\n")
    for bad in ("random.pt", "notes.txt"):
        line = _one_line_error(runner.invoke(main, ["test", "-w", str(data), "-b", "cpu", "--model-file",
                                                    str(tmp_path / bad)]))
        assert "written by alexnet-pipe train or import-weights, or a neon pickle" in line
        assert "weights_only=False" not in line and "KeyError: 101" not in line  # torch's advice stays out
    raw = tmp_path / "raw"
    (raw / "train" / "cat").mkdir(parents=True)
    line = _one_line_error(runner.invoke(main, ["train", "-w", str(raw), "-b", "cpu", "-s", str(tmp_path / "w.pt")]))
    assert f"alexnet-pipe convert {raw} {tmp_path / 'raw-batches'}" in line  # not "convert RAW raw"


def test_per_class_results_agree_with_the_overall_figures(data, tmp_path):
    runner = CliRunner()
    train_one_epoch(data, tmp_path / "w.pt")
    res = runner.invoke(main, ["test", "-w", str(data), "-b", "cpu", "--model-file", str(tmp_path / "w.pt"),
                               "--no-progress", "--data-threads", "1", "-o", str(tmp_path / "t.jsonl"),
                               "--per-class", str(tmp_path / "pc.json")])
    assert res.exit_code == 0, res.output
    assert "(Top-5)" not in res.output  # 2 classes: every label is in any top 5
    [row] = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    body = json.loads((tmp_path / "pc.json").read_text())
    confusion = body["confusion"]
    assert [c["id"] for c in body["classes"]] == ["circle", "square"]
    assert sum(map(sum, confusion)) == row["samples"] == 4
    assert 100.0 * sum(confusion[k][k] for k in range(2)) / 4 == pytest.approx(row["val_top1"])
    for k, c in enumerate(body["classes"]):
        assert c["images"] == sum(confusion[k]) == 2
        assert c["top1"] == pytest.approx(100.0 * confusion[k][k] / 2)
        assert c["top5"] == 100.0
    from PIL import Image

    assert Image.open(tmp_path / "pc.png").size[0] > 100


def test_per_class_table_and_confused_pairs_by_hand(tmp_path):
    import numpy as np

    from alexnet_pipe.train.report import PerClass, write_per_class

    confusion = np.array([[5, 3, 0], [1, 8, 1], [0, 0, 0]])
    pc = PerClass(confusion, np.array([8, 9, 0]))
    table = pc.table(["a", "b", "c"], ["ant", "", "cat"])
    assert [(r["images"], r["top1"], r["top5"]) for r in table] == [(8, 62.5, 100.0), (10, 80.0, 90.0),
                                                                      (0, None, None)]
    assert pc.confused_pairs(5) == [(0, 1, 3), (1, 2, 1), (1, 0, 1)]
    written = write_per_class(pc, ["a", "b", "c"], ["ant", "", "cat"], tmp_path / "r.json")
    assert [p.name for p in written] == ["r.json", "r.png"]
    body = json.loads(written[0].read_text())
    assert body["confused_pairs"][0] == {"true": "a", "predicted": "b", "images": 3}


def test_bgr_and_unit_range_weights_are_fed_what_they_expect(data, tmp_path):
    """The same network re-expressed for BGR input, and for 0..1 input (as import-weights records
    neon, Caffe and torchvision weights), scores exactly as the original: the pipeline follows the
    channel order and value range the weights file records."""
    from alexnet_pipe.model import checkpoint

    runner = CliRunner()
    train_one_epoch(data, tmp_path / "w.pt")
    body = {k: v for k, v in checkpoint.load(tmp_path / "w.pt").items() if k not in ("format", "version", "created_by")}
    bgr = {**body, "model": dict(body["model"]), "data": {**body["data"], "channel_order": "BGR"}}
    bgr["model"]["conv1.weight"] = body["model"]["conv1.weight"].flip(1)  # input channels B, G, R
    unit = {**body, "model": dict(body["model"]),
            "data": {**body["data"], "value_range": [0, 1], "mean_rgb": [m / 255 for m in body["data"]["mean_rgb"]]}}
    unit["model"]["conv1.weight"] = body["model"]["conv1.weight"] * 255  # input /255
    lines = []
    for name, payload in (("w.pt", None), ("bgr.pt", bgr), ("unit.pt", unit)):
        if payload is not None:
            checkpoint.save(tmp_path / name, payload)
        res = runner.invoke(main, ["test", "-w", str(data), "-b", "cpu", "--model-file", str(tmp_path / name),
                                   "--no-progress", "-o", str(tmp_path / f"{name}.jsonl")])
        assert res.exit_code == 0, res.output
        lines.append(json.loads((tmp_path / f"{name}.jsonl").read_text()))
    assert lines[1]["val_loss"] == pytest.approx(lines[0]["val_loss"], rel=1e-5)
    assert lines[2]["val_loss"] == pytest.approx(lines[0]["val_loss"], rel=1e-5)
    assert lines[0]["val_top1"] == lines[1]["val_top1"] == lines[2]["val_top1"]
    # Read as RGB, the BGR network would score differently: the check above can fail.
    rgb_misread = {**bgr, "data": body["data"]}
    checkpoint.save(tmp_path / "misread.pt", rgb_misread)
    res = runner.invoke(main, ["test", "-w", str(data), "-b", "cpu", "--model-file", str(tmp_path / "misread.pt"),
                               "--no-progress", "-o", str(tmp_path / "misread.jsonl")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "misread.jsonl").read_text())["val_loss"] != pytest.approx(lines[0]["val_loss"],
                                                                                             rel=1e-5)
