"""Inputs users already have: Caffe list files, im2rec .lst files, --val-ratio, --dry-run, and
the one-line errors for inputs with nothing to convert (issue 12)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lmdb
import numpy as np
import pytest
from click.testing import CliRunner

from alexnet_pipe.apps.info import format_summary, plural
from alexnet_pipe.cli import main
from alexnet_pipe.config import ConvertConfig
from alexnet_pipe.convert.dryrun import shard_plan
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.errors import LayoutError
from alexnet_pipe.formats.datum import decode_datum
from alexnet_pipe.formats.recordio import iter_records, unpack_payload
from alexnet_pipe.inputs.holdout import carve_val, holdout_counts
from alexnet_pipe.inputs.listfile import CAFFE, IM2REC, read_list, scan_lists
from alexnet_pipe.inputs.scan import scan
from tests.helpers.images import CLASSES, make_tree, smooth_image, write_jpeg

runner = CliRunner()


def convert(src: Path, dst: Path, **kw) -> dict:
    opts = {"formats": ("lmdb", "recordio"), "shard_size": 4, "workers": 1, "progress": False}
    run_convert(ConvertConfig(src=src, dst=dst, **(opts | kw)))
    return json.loads((dst / "manifest.json").read_text())


def stored_labels(out: Path, split: str) -> dict[str, int]:
    """name -> label of every LMDB record of a split; the RecordIO labels must agree."""
    ds = load_dataset(out)
    labels = {}
    for path in ds.lmdb_paths(split):
        with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
            for key, value in txn.cursor():
                labels[key.decode().split("_", 1)[1]] = decode_datum(value).label
    recs, _ = ds.recordio_paths(split)
    rec_labels = sorted(int(unpack_payload(p)[0].label) for rec in recs for _, p in iter_records(rec))
    assert rec_labels == sorted(labels.values())
    return labels


def one_line_error(args: list[str]) -> str:
    """Run the CLI; it must fail with one "Error:" line and no traceback: exit code 1 and nothing
    else printed, or click's usage error (exit code 2, after the usage lines)."""
    res = runner.invoke(main, args)
    lines = res.output.strip().splitlines()
    assert res.exit_code in (1, 2) and "Traceback" not in res.output, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    assert lines[-1].startswith("Error: ") and (res.exit_code == 2 or len(lines) == 1), res.output
    return lines[-1]


@pytest.fixture
def images(tmp_path) -> Path:
    """RAW with train/<c>/<c>_<i>.jpg (3 classes x 4) and val/<c>/<c>_<i>.jpg (x 2), and one
    file whose name has spaces."""
    root = tmp_path / "images"
    make_tree(root, {"train": 4, "val": 2}, sizes=((40, 30),))
    write_jpeg(root / "train" / "ant" / "an ant 9.jpg", smooth_image(99, 40, 30))
    return root


def caffe_list(lines: list[str], path: Path) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# --- list files ------------------------------------------------------------------------------------


def test_caffe_list_labels_as_given_with_spaces_gaps_and_skips(images, tmp_path):
    # Labels 0, 2, 4 (classes 1 and 3 have no image); a path with spaces; one missing file, one
    # outside RAW, one listed twice with another label, one absolute path inside RAW.
    label = {"ant": 0, "bee": 2, "cat": 4}
    lines = [f"train/{c}/{c}_{i}.jpg {label[c]}" for c in CLASSES for i in range(4)]
    lines[3] = f"{images}/train/ant/ant_3.jpg 0"
    lines += ["train/ant/an ant 9.jpg 0", "train/ant/gone.jpg 0", "../escape.jpg 2", "train/bee/bee_0.jpg 4"]
    (tmp_path / "escape.jpg").write_bytes((images / "train/ant/ant_0.jpg").read_bytes())
    synsets = tmp_path / "synset_words.txt"
    synsets.write_text("n0 ant colony\nn1 nothing\nn2 bee\nn3 none\nn4 cat\nn5 unused\n")
    out = tmp_path / "out"
    m = convert(images, out, train_list=caffe_list(lines, tmp_path / "train.txt"), synsets=synsets)

    assert [(c["id"], c["name"]) for c in m["classes"]] == [
        ("n0", "ant colony"), ("n1", "nothing"), ("n2", "bee"), ("n3", "none"), ("n4", "cat"), ("n5", "unused")]
    assert list(m["splits"]) == ["train"] and m["splits"]["train"]["class_counts"] == [5, 0, 4, 0, 4, 0]
    got = stored_labels(out, "train")
    assert got["train/ant/an ant 9.jpg"] == 0 and got["train/ant/ant_3.jpg"] == 0
    assert {name: lab for name, lab in got.items() if "an ant" not in name} == {
        f"train/{c}/{c}_{i}.jpg": label[c] for c in CLASSES for i in range(4)}
    skipped = {s["name"]: s["reason"] for s in m["skipped"]}
    assert skipped == {
        "train/ant/gone.jpg": "train.txt line 14: no such file under RAW",
        "../escape.jpg": f"train.txt line 15: the path is outside RAW ({images})",
        "train/bee/bee_0.jpg":
            "train.txt line 16: listed again with label 4 (line 5 says 2); the first, line 5, is kept",
    }
    assert m["splits"]["train"]["layout"] == "Caffe list train.txt (path label), paths under RAW"


def test_im2rec_lst_with_float_labels_and_a_val_list(images, tmp_path):
    lst = tmp_path / "train.lst"
    rows = [(c, f"train/{name}/{name}_{i}.jpg") for c, name in enumerate(CLASSES) for i in range(4)]
    lst.write_text("".join(f"{k}\t{c}.000000\t{p}\n" for k, (c, p) in enumerate(rows)))
    # A .txt name and CRLF line ends: the format is told by the content.
    val = tmp_path / "val.txt"
    val.write_bytes("".join(f"{k}\t{c:.6f}\tval/{n}/{n}_{i}.jpg\r\n" for k, (c, n, i) in
                            enumerate((c, n, i) for c, n in enumerate(CLASSES) for i in range(2))).encode())
    assert read_list(lst)[0] == IM2REC and read_list(val)[0] == IM2REC
    out = tmp_path / "out"
    m = convert(images, out, train_list=lst, val_list=val)
    assert [c["id"] for c in m["classes"]] == ["0", "1", "2"]
    assert stored_labels(out, "train") == {p: c for c, p in rows}
    assert stored_labels(out, "val") == {f"val/{n}/{n}_{i}.jpg": c for c, n in enumerate(CLASSES) for i in range(2)}
    assert m["splits"]["val"]["layout"].startswith("im2rec .lst val.txt")


def test_reordered_list_converts_identically_and_lists_are_told_apart(images, tmp_path):
    lines = [f"train/{c}/{c}_{i}.jpg {k}" for k, c in enumerate(CLASSES) for i in range(4)]
    a = scan_lists(images, caffe_list(lines, tmp_path / "a.txt"))
    b = scan_lists(images, caffe_list(lines[::-1], tmp_path / "b.txt"))
    assert a.splits["train"] == b.splits["train"] and len(a.splits["train"]) == 12
    tabbed = caffe_list([line.replace(" ", "\t") for line in lines], tmp_path / "tab.txt")  # one tab: Caffe
    assert read_list(tabbed)[0] == CAFFE and scan_lists(images, tabbed).splits["train"] == a.splits["train"]


def test_an_image_in_both_lists_stays_in_train(images, tmp_path):
    train = caffe_list([f"train/ant/ant_{i}.jpg 0" for i in range(4)], tmp_path / "t.txt")
    val = caffe_list(["val/ant/ant_0.jpg 0", "train/ant/ant_1.jpg 0"], tmp_path / "v.txt")
    found = scan_lists(images, train, val)
    assert list(found.splits["val"].names()) == ["val/ant/ant_0.jpg"]
    assert [(s.split, s.name, s.reason) for s in found.skipped] == [
        ("val", "train/ant/ant_1.jpg", "v.txt line 2: also in t.txt (line 2); an image is in one split only")]


@pytest.mark.parametrize("text, message", [
    ("train/ant/ant_0.jpg 0\ntrain/ant/ant_1.jpg\n", r"list\.txt:2: expected '<path> <label>'"),
    ("train/ant/ant_0.jpg zero\n", r"list\.txt:1: the label 'zero' is not a whole number"),
    ("train/ant/ant_0.jpg 1.5\n", r"list\.txt:1: the label '1.5' is not a whole number"),
    ("train/ant/ant_0.jpg -1\n", r"list\.txt:1: the label -1 is negative"),
    ("train/ant/ant_0.jpg 4000000000\n", r"list\.txt:1: the label 4000000000 would make"),
    ("0\t1\ttrain/ant/ant_0.jpg\n1\t1\t0\ttrain/ant/ant_1.jpg\n", r"list\.txt:2: 2 labels on one line \(a multi-label"),
    ("0\t2.5\ttrain/ant/ant_0.jpg\n", r"list\.txt:1: the label '2.5' is not a whole number"),
    ("x\t1\ttrain/ant/ant_0.jpg\n", r"list\.txt:1: the index 'x' is not an integer"),
    ("0\t1\ttrain/ant/ant_0.jpg\ntrain/ant/ant_1.jpg 1\n", r"list\.txt:2: expected '<index>\\t<label>\\t<path>'"),
    ("\n  \n", r"lists no images"),
    ("a.jpg 0\n\0\0", r"holds NUL bytes"),
])
def test_malformed_list_names_file_and_line(images, tmp_path, text, message):
    path = tmp_path / "list.txt"
    path.write_text(text)
    with pytest.raises(LayoutError, match=message):
        scan_lists(images, path)


def test_list_errors_through_the_cli_are_one_line(images, tmp_path):
    out = str(tmp_path / "out")
    multi = tmp_path / "multi.lst"
    multi.write_text("0\t1\t2\ttrain/ant/ant_0.jpg\n")
    assert "multi.lst:1: 2 labels on one line" in one_line_error(["convert", str(images), out, "--list", str(multi)])
    wrong_root = caffe_list(["ant/ant_0.jpg 0", "ant/ant_1.jpg 0"], tmp_path / "t.txt")
    line = one_line_error(["convert", str(images), out, "--list", str(wrong_root)])
    assert "none of the 2 images listed" in line and "RAW must be the folder the listed paths are relative to" in line
    short = tmp_path / "synsets.txt"
    short.write_text("n0\nn1\n")
    big = caffe_list(["train/ant/ant_0.jpg 0", "train/bee/bee_0.jpg 2"], tmp_path / "b.txt")
    line = one_line_error(["convert", str(images), out, "--list", str(big), "--synsets", str(short)])
    assert "b.txt line 2 has label 2, but" in line and "names only 2 classes" in line
    for args, says in [(["--list-val", str(big)], "--list-val needs --list"),
                       (["--list", str(big), "--val-labels", str(short)], "with --list, give the validation list"),
                       (["--list", str(big), "--list-val", str(big), "--val-ratio", "0.1"], "use one of them"),
                       (["--val-ratio", "1.5"], "--val-ratio")]:
        assert says in one_line_error(["convert", str(images), out, *args])
    assert not (tmp_path / "out").exists()


# --- --val-ratio ------------------------------------------------------------------------------------


def test_holdout_counts_rule():
    counts = np.array([0, 1, 2, 3, 25, 100, 10])
    assert holdout_counts(counts, 0.1).tolist() == [0, 0, 1, 1, 3, 10, 1]
    assert holdout_counts(counts, 0.9).tolist() == [0, 0, 1, 2, 23, 90, 9]  # 22.5 rounds up


def test_val_ratio_is_stratified_seeded_and_independent_of_creation_order(tmp_path):
    def tree(root: Path, order: list[str]) -> Path:
        for cls in order:
            for i in range(20 if cls != "cat" else 1):
                (root / cls).mkdir(parents=True, exist_ok=True)
                (root / cls / f"{i:02d}.jpg").write_bytes(b"x")  # the scan opens no image
        return root

    a = carve_val(scan(tree(tmp_path / "a", ["ant", "bee", "cat"])), 0.25, seed=0)
    b = carve_val(scan(tree(tmp_path / "b", ["cat", "bee", "ant"])), 0.25, seed=0)
    assert list(a.splits["val"].names()) == list(b.splits["val"].names())
    assert np.bincount(a.splits["val"].labels, minlength=3).tolist() == [5, 5, 0]
    assert np.bincount(a.splits["train"].labels, minlength=3).tolist() == [15, 15, 1]
    train, val = set(a.splits["train"].names()), set(a.splits["val"].names())
    assert not train & val and len(train | val) == 41
    other = carve_val(scan(tmp_path / "a"), 0.25, seed=1)
    assert set(other.splits["val"].names()) != val
    assert "seed 0" in a.layout["val"] and any("single image" in w for w in a.warnings)


def test_val_ratio_convert_end_to_end_and_refused_with_a_val_split(images, tmp_path):
    train_only = tmp_path / "train_only"
    make_tree(train_only, {"train": 4}, sizes=((40, 30),))
    out = tmp_path / "out"
    m = convert(train_only / "train", out, val_ratio=0.25, seed=3)
    assert m["settings"]["val_ratio"] == 0.25
    assert m["splits"]["train"]["class_counts"] == [3, 3, 3] and m["splits"]["val"]["class_counts"] == [1, 1, 1]
    val = stored_labels(out, "val")
    assert all(CLASSES[label] == name.split("/")[0] for name, label in val.items())
    assert not set(val) & set(stored_labels(out, "train"))
    line = one_line_error(["convert", str(images), str(tmp_path / "o2"), "--val-ratio", "0.1"])
    assert "already has a validation split" in line and "drop --val-ratio" in line
    # With a train list and no val list, the split is carved from the list.
    lines = [f"train/{c}/{c}_{i}.jpg {k}" for k, c in enumerate(CLASSES) for i in range(4)]
    lst = caffe_list(lines, tmp_path / "l.txt")
    found = carve_val(scan_lists(images, lst), 0.5, seed=0)
    assert np.bincount(found.splits["val"].labels).tolist() == [2, 2, 2]


# --- --dry-run ----------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_dry_run_reports_and_writes_nothing(images, tmp_path):
    (images / "train" / "notes.txt").write_text("not an image")
    (images / "train" / "__MACOSX").mkdir()
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    res = runner.invoke(main, ["convert", str(images), str(out), "--dry-run", "--shard-size", "5"])
    assert res.exit_code == 0, res.output
    assert snapshot(tmp_path) == before and not out.exists()
    text = res.output
    assert "layout    train: class folders train/<class>/" in text and "val: class folders val/<class>/" in text
    assert "classes   3: ant, bee, cat" in text
    assert "train     13 images, 4 to 5 a class -> 3 shards: 2 of 5 records, the last of 3" in text
    assert "val       6 images, 2 a class -> 2 shards: 1 of 5 records, the last of 1" in text
    assert "skipped   2 inputs:" in text and "train notes.txt: not inside a class folder (no label)" in text
    assert "train __MACOSX/: macOS archive metadata folder, not a class" in text
    assert f"output    {out} would be created" in text

    convert(images, out, formats=("lmdb",), shard_size=5)
    before = snapshot(tmp_path)
    res = runner.invoke(main, ["convert", str(images), str(out), "--dry-run", "--shard-size", "5"])
    assert res.exit_code == 0 and snapshot(tmp_path) == before
    assert "holds this conversion, 5 of 5 shards complete: the run resumes it" in res.output
    res = runner.invoke(main, ["convert", str(images), str(out), "--dry-run", "--shard-size", "4"])
    assert "holds a conversion with other settings or input (shard_size: 5 -> 4); the run would stop" in res.output
    assert res.exit_code == 1  # as the run would: a script that checks first stops here
    res = runner.invoke(main, ["convert", str(images), str(out), "--dry-run", "--shard-size", "4", "--force"])
    assert "--force: it would be discarded" in res.output and res.exit_code == 0
    assert snapshot(tmp_path) == before


def test_dry_run_into_the_input_itself_exits_1_as_the_run_would(images):
    before = snapshot(images)
    res = runner.invoke(main, ["convert", str(images), str(images), "--dry-run"])
    assert "output    the run would stop: " in res.output
    assert res.exit_code == 1
    real = runner.invoke(main, ["convert", str(images), str(images)])
    assert real.exit_code == 1 and snapshot(images) == before


def test_dry_run_with_lists_and_val_ratio_caps_the_skipped_listing(images, tmp_path):
    lines = ["train/ant/ant_0.jpg 0", "train/ant/ant_1.jpg 0"] + [f"missing/{i}.jpg 1" for i in range(30)]
    lst = caffe_list(lines, tmp_path / "t.txt")
    res = runner.invoke(main, ["convert", str(images), str(tmp_path / "out"), "--list", str(lst), "--dry-run",
                               "--val-ratio", "0.5"])
    assert res.exit_code == 0, res.output
    assert "skipped   30 inputs:" in res.output and "... 10 more" in res.output
    for split in ("train", "val"):
        assert f"{split:<9} 1 image, 1 a class (1 class without any) -> 1 shard of 1 record\n" in res.output
    assert "val: --val-ratio 0.5: 1 of the 2 train images held out, per class (seed 0)" in res.output
    single = caffe_list(lines[:1], lst)
    line = one_line_error(["convert", str(images), str(tmp_path / "out"), "--list", str(single), "--val-ratio", "0.5"])
    assert "holds out no image: every class has a single image" in line
    assert not (tmp_path / "out").exists()


def test_shard_plan_wording():
    assert shard_plan(0, 5) == "no shard" and shard_plan(1, 5) == "1 shard of 1 record"
    assert shard_plan(10, 5) == "2 shards of 5 records"
    assert shard_plan(6, 5) == "2 shards: 1 of 5 records, the last of 1"


# --- nothing to convert; plurals ----------------------------------------------------------------------


def test_empty_class_folders_say_what_to_do(tmp_path):
    bare, nested, no_val = tmp_path / "bare", tmp_path / "nested", tmp_path / "no_val"
    (bare / "cat").mkdir(parents=True)
    (nested / "train" / "cat").mkdir(parents=True)
    make_tree(no_val, {"train": 1}, sizes=((16, 12),))
    (no_val / "val" / "cat").mkdir(parents=True)
    line = one_line_error(["convert", str(bare), str(tmp_path / "o")])
    assert "has no class folders with images (cat/: empty folder (no files))" in line
    assert "put each class's images in its folder" in line
    line = one_line_error(["convert", str(nested), str(tmp_path / "o")])
    assert f"{nested / 'train'} has no class folders with images (cat/: empty folder (no files))" in line
    line = one_line_error(["convert", str(no_val), str(tmp_path / "o")])
    assert "val holds no images (cat/: empty folder (no files))" in line and "--val-ratio" in line
    assert "holds no files" not in line and not (tmp_path / "o").exists()


def test_one_shard_is_singular(tmp_path):
    raw = tmp_path / "raw"
    write_jpeg(raw / "train" / "ant" / "a.jpg", smooth_image(1, 40, 30))
    out = tmp_path / "out"
    convert(raw, out, formats=("lmdb",))
    res = runner.invoke(main, ["info", str(out)])
    assert "train     1 record in 1 shard," in res.output and "train-00000  1 record " in res.output
    assert "over 1 train image:" in res.output and "shards" not in res.output.replace("shard_size", "")
    assert plural(2, "class", "classes") == "2 classes" and plural(1, "class", "classes") == "1 class"
    summary = {"root": "r", "created_by": "x", "version": 2, "classes": [], "mean": {"error": "none"},
               "settings": {}, "skipped": [], "splits": {"train": {
                   "records": 7, "skipped": 0, "layout": "l", "bytes": 0,
                   "shards": [{"name": f"s{k}", "records": 1, "bytes": 0} for k in range(7)]}}}
    assert "... 1 more shard\n" in format_summary(summary, max_shards=6) + "\n"


def test_paths_with_os_separators_are_names_under_raw(images, tmp_path):
    lst = caffe_list([f"./train/ant/../ant/ant_{i}.jpg 0" for i in range(2)], tmp_path / "t.txt")
    found = scan_lists(images, lst)
    assert list(found.splits["train"].names()) == ["train/ant/ant_0.jpg", "train/ant/ant_1.jpg"]
    assert [s.path for s in found.splits["train"]] == [os.path.join(images, f"train/ant/ant_{i}.jpg") for i in range(2)]
