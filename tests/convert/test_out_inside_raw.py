"""OUT is never an input: a folder inside RAW is passed over by the scan, and RAW itself (or a
folder holding it) is refused as OUT before anything is written."""

from __future__ import annotations

import json

from click.testing import CliRunner

from alexnet_pipe.cli import main
from tests.helpers.images import CLASSES, make_tree
from tests.helpers.trees import tree_bytes


def convert(*args):
    return CliRunner().invoke(main, ["convert", *map(str, args), "--no-progress", "--workers", "1"])


def classes(out):
    return [c["id"] for c in json.loads((out / "manifest.json").read_text())["classes"]]


def test_out_inside_a_flat_raw_is_never_a_class(tmp_path):
    raw = tmp_path / "rflat"
    make_tree(raw, {"": 2}, sizes=((40, 30),))  # rflat/<class>/*.jpg: train only
    out = raw / "batches"
    res = convert(raw, out)
    assert res.exit_code == 0, res.output
    first = (out / "manifest.json").read_bytes()
    assert classes(out) == list(CLASSES)
    res = convert(raw, out)  # the rerun sees OUT inside RAW: same inputs, nothing to redo
    assert res.exit_code == 0, res.output
    assert (out / "manifest.json").read_bytes() == first
    res = convert(raw, out, "--force")  # before: 'batches' became class 0 and every label shifted
    assert res.exit_code == 0, res.output
    assert classes(out) == list(CLASSES)


def test_out_inside_train_is_never_a_class(tmp_path):
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 2, "val": 1}, sizes=((40, 30),))
    out = raw / "train" / "batches"
    for extra in ((), ("--force",)):
        res = convert(raw, out, *extra)
        assert res.exit_code == 0, res.output
        assert classes(out) == list(CLASSES)


def test_raw_itself_or_a_folder_holding_it_is_refused_as_out(tmp_path):
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 1}, sizes=((40, 30),))
    before = tree_bytes(tmp_path)
    for out in (raw, tmp_path, raw / "train" / ".."):
        for extra in ((), ("--force",)):
            res = convert(raw, out, *extra)
            assert res.exit_code == 1 and "outside the inputs" in res.output and "Traceback" not in res.output
            assert len(res.output.strip().splitlines()) == 1
    assert tree_bytes(tmp_path) == before  # nothing written, nothing removed
