"""--model-file takes neon, Caffe and torchvision weights as they are (model/model_file.py): the
seed's own command lines, unchanged but for ``python`` -> ``alexnet-pipe train``, on a neon v1.4
pickle over a dataset converted with the ILSVRC devkit; a caffemodel through ``test --synsets``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.errors import CheckpointError
from alexnet_pipe.model import checkpoint
from alexnet_pipe.model.model_file import foreign_format, open_model_file
from tests.helpers.archives import DEVKIT_ORDER, GT, devkit_tar_gz, flat_val, ground_truth, meta_mat_bytes
from tests.helpers.images import CLASSES, make_tree
from tests.helpers.pickle_samples import py2_pickle
from tests.helpers.weight_files import caffemodel, caffenet_layers, caffenet_weights, neon_arrays, neon_v14

pytestmark = pytest.mark.usefixtures("torch_threads")

# neon's result line (Top-5 only with more than 5 classes)
RESULT = re.compile(r"LogLoss: [0-9.]+, Accuracy: [0-9.]+ % \(Top-1\)(?:, [0-9.]+ % \(Top-5\))?")


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def result_lines(output: str) -> list[str]:
    return RESULT.findall(output)


def ilsvrc_batches(root: Path, train: int, sizes) -> Path:
    """RAW as ImageNet ships it (train/<wnid>/, a flat val/ of 2 a class, the devkit archive with
    meta.mat and the ground truth, whose ids follow DEVKIT_ORDER, not sorted order), converted with
    the defaults into root/batches."""
    raw = root / "raw"
    make_tree(raw, {"train": train, "val": 2}, sizes=sizes)
    truth = flat_val(raw)
    devkit_tar_gz(raw / "ILSVRC2012_devkit_t12.tar.gz",
                  {"meta.mat": meta_mat_bytes(), GT: ground_truth(truth).encode()})
    res = invoke("convert", raw, root / "batches", "--no-progress")
    assert res.exit_code == 0, res.output
    return root / "batches"


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory) -> Path:
    return ilsvrc_batches(tmp_path_factory.mktemp("ilsvrc"), 2, ((40, 30), (36, 48)))


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """The same classes from class folders alone: no devkit, so no devkit order."""
    root = tmp_path_factory.mktemp("plain")
    make_tree(root / "raw", {"train": 1, "val": 1}, sizes=((40, 30),))
    res = invoke("convert", root / "raw", root / "batches", "--no-progress")
    assert res.exit_code == 0, res.output
    return root / "batches"


@pytest.fixture(scope="module")
def neon_file(tmp_path_factory) -> tuple[Path, dict]:
    """neon's alexnet.p (v1.4 layout, float16) whose fc8 row k is the class of devkit id k + 1."""
    arrays = neon_arrays(seed=5, classes=len(DEVKIT_ORDER))
    path = tmp_path_factory.mktemp("neon") / "alexnet.p"
    path.write_bytes(py2_pickle(neon_v14(arrays)))
    return path, arrays


@pytest.fixture(scope="module")
def caffe_file(tmp_path_factory) -> tuple[Path, Path, dict]:
    """bvlc_reference_caffenet.caffemodel and its synset_words.txt (here in an order of its own)."""
    root = tmp_path_factory.mktemp("caffe")
    w = caffenet_weights(seed=6, classes=len(CLASSES))
    path = root / "bvlc_reference_caffenet.caffemodel"
    path.write_bytes(caffemodel(caffenet_layers(w), "v1"))
    order = ("bee", "cat", "ant")
    words = root / "synset_words.txt"
    words.write_text("".join(f"{c} the {c}\n" for c in order))
    return path, words, w


def test_the_manifest_records_the_devkit_ids(ilsvrc, plain):
    classes = json.loads((ilsvrc / "manifest.json").read_text())["classes"]
    assert [(c["id"], c["devkit_id"]) for c in classes] == [(c, DEVKIT_ORDER.index(c) + 1) for c in CLASSES]
    assert load_dataset(ilsvrc).devkit_order() == list(DEVKIT_ORDER)
    assert all("devkit_id" not in c for c in json.loads((plain / "manifest.json").read_text())["classes"])
    assert load_dataset(plain).devkit_order() is None


def test_seed_test_command_runs_unchanged_on_neons_pickle(ilsvrc, neon_file, tmp_path, caplog):
    """``python -w path/to/dataset/batches --model_file alexnet.p --test_only``, python -> alexnet-pipe train."""
    src, arrays = neon_file
    caplog.set_level("INFO")
    res = invoke("train", "-w", ilsvrc, "--model_file", src, "--test_only")
    assert res.exit_code == 0, res.output
    said = [r.getMessage() for r in caplog.records if "imported in memory" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("alexnet.p: neon 1.4.0 pickle, imported in memory")
    assert f"the devkit order recorded in {ilsvrc / 'manifest.json'}" in said[0]
    seed_line = result_lines(res.output)
    assert len(seed_line) == 1

    # fc8's rows now follow the dataset's (sorted) classes: row k is the neon row of class k's devkit id.
    body = open_model_file(src, devkit_order=load_dataset(ilsvrc).devkit_order()).body
    neon_bias = torch.from_numpy(arrays["fc8"][1].astype(np.float32).reshape(-1))
    expected = torch.stack([neon_bias[DEVKIT_ORDER.index(c)] for c in CLASSES])
    torch.testing.assert_close(body["model"]["fc8.bias"], expected)
    assert body["data"]["classes"] == list(CLASSES)

    # The same result as import-weights with the devkit-order list, then test.
    listing = tmp_path / "devkit-order.txt"
    listing.write_text("".join(f"{c}\n" for c in DEVKIT_ORDER))
    res = invoke("import-weights", src, "-o", tmp_path / "neon.pt", "--synsets", listing)
    assert res.exit_code == 0, res.output
    res = invoke("test", "-w", ilsvrc, "--model-file", tmp_path / "neon.pt")
    assert res.exit_code == 0, res.output
    assert result_lines(res.output) == seed_line
    imported = checkpoint.load(tmp_path / "neon.pt")
    for key, value in imported["model"].items():
        assert torch.equal(value, body["model"][key]), key


def run_seed_lines(batches, weights, epochs: int, caplog) -> None:
    """The seed's second line (``-w BATCHES -s WEIGHTS -e EPOCHS``), then its first on the weights it
    wrote (``--model_file WEIGHTS --test_only``): each exits 0 with one result line. ``caplog`` then
    holds the second command's records."""
    caplog.set_level("INFO")
    res = invoke("train", "-w", batches, "-s", weights, "-e", str(epochs))
    assert res.exit_code == 0, res.output
    assert len(result_lines(res.output)) == 1
    assert any(r.getMessage().startswith(f"epoch {epochs}: train loss") for r in caplog.records)
    assert foreign_format(weights) is None  # our file, whatever its suffix
    caplog.clear()
    res = invoke("train", "-w", batches, "--model_file", weights, "--test_only")
    assert res.exit_code == 0, res.output
    assert len(result_lines(res.output)) == 1


def test_seed_train_command_then_its_test_command(ilsvrc, tmp_path, caplog):
    """``python -w path/to/dataset/batches -s alexnet_weights.p -e 90`` with 2 epochs for 90 (90 CPU
    epochs at crop 224 do not fit the suite; on 6 images neon's lr 0.01 also diverges by epoch 15,
    which train reports in one line), then the first command line on the weights it wrote."""
    weights = tmp_path / "alexnet_weights.p"
    run_seed_lines(ilsvrc, weights, 2, caplog)
    assert not any("imported in memory" in r.getMessage() for r in caplog.records)


def test_caffemodel_tests_with_its_synset_words(ilsvrc, caffe_file, tmp_path, caplog):
    src, words, w = caffe_file
    caplog.set_level("INFO")
    res = invoke("test", "-w", ilsvrc, "--model-file", src, "--synsets", words)
    assert res.exit_code == 0, res.output
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "bvlc_reference_caffenet.caffemodel: " in said and "imported in memory" in said
    assert "permuted from synset_words.txt's order" in said
    direct = result_lines(res.output)
    assert len(direct) == 1
    res = invoke("import-weights", src, "-o", tmp_path / "caffenet.pt", "--synsets", words)
    assert res.exit_code == 0, res.output
    res = invoke("test", "-w", ilsvrc, "--model-file", tmp_path / "caffenet.pt")
    assert res.exit_code == 0, res.output
    assert result_lines(res.output) == direct
    body = open_model_file(src, synsets=words).body
    bias = torch.from_numpy(w["fc8"][1])
    torch.testing.assert_close(body["model"]["fc8.bias"], bias[torch.tensor([2, 0, 1])])  # ant, bee, cat


def test_without_a_class_order_the_run_is_refused_in_one_line(plain, neon_file, caffe_file, tmp_path, caplog):
    for src in (neon_file[0], caffe_file[0]):
        res = invoke("test", "-w", plain, "--model-file", src)
        assert res.exit_code != 0
        assert "Traceback" not in res.output and "--synsets" in res.output
        assert len(res.output.strip().splitlines()) == 1
    res = invoke("test", "-w", plain, "--model-file", neon_file[0])
    assert "convert" in res.output and "devkit" in res.output  # neon: or convert with the devkit
    # A devkit-order list given by hand works on the plain dataset too, as the manifest's order does.
    listing = tmp_path / "devkit-order.txt"
    listing.write_text("".join(f"{c}\n" for c in DEVKIT_ORDER))
    caplog.set_level("INFO")
    res = invoke("test", "-w", plain, "--model-file", neon_file[0], "--synsets", listing)
    assert res.exit_code == 0, res.output
    assert any(f"permuted from {listing.name}'s order" in r.getMessage() for r in caplog.records)


def test_predict_names_a_foreign_files_classes_from_synsets(caffe_file, ilsvrc, tmp_path):
    src, words, _ = caffe_file
    image = next((ilsvrc.parent / "raw" / "train" / "ant").iterdir())
    res = invoke("predict", "-b", "cpu", "--model-file", src, "--synsets", words, "--json", image)
    assert res.exit_code == 0, res.output
    top = json.loads(res.output[res.output.index("["):])[0]["top5"]
    assert sorted(g["id"] for g in top) == list(CLASSES)
    assert {g["id"]: g["name"] for g in top} == {c: f"the {c}" for c in CLASSES}
    res = invoke("predict", "-b", "cpu", "--model-file", src, image)
    assert res.exit_code != 0 and "--synsets" in res.output and "Traceback" not in res.output


def test_finetune_from_a_foreign_file_needs_no_class_order(plain, neon_file, tmp_path):
    res = invoke("train", "-w", plain, "--model-file", neon_file[0], "--finetune", "-e", "1", "-z", "4",
                 "-s", tmp_path / "ft.pt", "--eval-freq", "0", "--no-progress")
    assert res.exit_code == 0, res.output
    body = checkpoint.load(tmp_path / "ft.pt")
    assert body["data"]["classes"] == list(CLASSES)
    assert body["start"]["imported_from"] == "neon 1.4.0 pickle"


def test_own_files_refuse_synsets_and_foreign_formats_are_told_by_content(ilsvrc, neon_file, tmp_path):
    weights = tmp_path / "w.p"
    import shutil

    shutil.copy(neon_file[0], tmp_path / "renamed.pt")  # a neon pickle under a torch suffix
    assert foreign_format(tmp_path / "renamed.pt") == "neon"
    body = open_model_file(tmp_path / "renamed.pt", devkit_order=list(DEVKIT_ORDER)).body
    checkpoint.save(weights, body)
    assert foreign_format(weights) is None
    with pytest.raises(CheckpointError, match="drop --synsets"):
        open_model_file(weights, synsets=tmp_path / "any.txt")


@pytest.mark.faults
def test_the_seed_train_command_runs_unchanged_for_90_epochs(tmp_path, caplog):
    """``python -w path/to/dataset/batches -s alexnet_weights.p -e 90``, only python -> alexnet-pipe
    train, over 24 images converted with the devkit (on 6 the neon recipe's lr 0.01 diverges), then
    the first seed line on the weights it wrote. About 3 CPU minutes: not in make test."""
    batches = ilsvrc_batches(tmp_path, 8, ((96, 72), (72, 96), (120, 90)))
    run_seed_lines(batches, tmp_path / "alexnet_weights.p", 90, caplog)
