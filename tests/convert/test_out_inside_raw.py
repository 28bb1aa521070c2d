"""OUT is never an input: a folder inside RAW is passed over by the scan, and RAW itself (or a
folder holding it) is refused as OUT before anything is written."""

from __future__ import annotations

import json

import pytest
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


@pytest.mark.faults
@pytest.mark.parametrize("where", ["flat", "train", "val", "deep", "link"])
def test_out_anywhere_inside_raw_never_changes_the_classes(tmp_path, where):
    """OUT at each place a user may put it inside RAW (a symlink in RAW pointing at OUT too):
    a first run, a rerun and a --force run all give the same classes and labels."""
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 2} if where == "flat" else {"train": 2, "val": 1}, sizes=((40, 30),))
    if where == "flat":
        for cls in CLASSES:
            (raw / "train" / cls).rename(raw / cls)
        (raw / "train").rmdir()
    out = {"flat": raw / "batches", "train": raw / "train" / "batches", "val": raw / "val" / "batches",
           "deep": raw / "train" / "ant" / "out" / "batches", "link": tmp_path / "elsewhere"}[where]
    if where == "link":
        (raw / "train" / "zz-link").symlink_to(out, target_is_directory=True)
        out.mkdir()
    labels = None
    for extra in ((), (), ("--force",)):
        res = convert(raw, out, *extra)
        assert res.exit_code == 0, res.output
        manifest = json.loads((out / "manifest.json").read_text())
        assert [c["id"] for c in manifest["classes"]] == list(CLASSES)
        counts = {s: v["class_counts"] for s, v in manifest["splits"].items()}
        assert labels is None or counts == labels
        labels = counts
