"""Raw layouts: class folders, flat val with each label file kind, and the ILSVRC tar archives."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from alexnet_pipe.errors import LayoutError
from alexnet_pipe.imaging.read import read_source
from alexnet_pipe.inputs.scan import scan
from alexnet_pipe.inputs.scan_cache import CACHE_VERSION
from tests.helpers.archives import flat_val, make_archives
from tests.helpers.images import CLASSES, make_tree


def test_class_folders(raw_tree):
    found = scan(raw_tree)
    assert found.classes == list(CLASSES)
    assert len(found.splits["train"]) == 18 and len(found.splits["val"]) == 6
    for src in found.splits["train"]:
        assert CLASSES[src.label] == src.name.split("/")[0]


def test_bare_class_tree_is_train_only(tmp_path):
    make_tree(tmp_path / "r", {"train": 2})
    found = scan(tmp_path / "r" / "train")
    assert list(found.splits) == ["train"] and len(found.splits["train"]) == 6


def test_flat_val_with_loc_csv(raw_tree):
    truth = flat_val(raw_tree)
    rows = ["ImageId,PredictionString"] + [f"{s},{w} 1 2 3 4 {w} 5 6 7 8" for s, w in truth.items()]
    (raw_tree / "LOC_val_solution.csv").write_text("\n".join(rows[:-1]) + "\n")  # last image unlabelled
    (raw_tree / "LOC_synset_mapping.txt").write_text("".join(f"{c} the {c}\n" for c in CLASSES))
    found = scan(raw_tree)
    val = found.splits["val"]
    assert len(val) == len(truth) - 1
    for src in val:
        assert CLASSES[src.label] == truth[src.name[:-5]]
    assert [s.reason for s in found.skipped] == ["no label in LOC_val_solution.csv"]
    assert found.class_names["bee"] == "the bee"


def test_flat_val_with_devkit_ground_truth_and_explicit_devkit_order(raw_tree, tmp_path):
    truth = flat_val(raw_tree)
    ilsvrc_order = ["cat", "ant", "bee"]  # the devkit's id order is not alphabetical
    (tmp_path / "devkit_order.txt").write_text("\n".join(ilsvrc_order) + "\n")
    (raw_tree / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{ilsvrc_order.index(truth[s]) + 1}\n" for s in sorted(truth))
    )
    found = scan(raw_tree, synsets=tmp_path / "devkit_order.txt")
    assert found.classes == list(CLASSES)  # labels still follow sorted class names
    assert {s.name[:-5]: CLASSES[s.label] for s in found.splits["val"]} == truth
    assert found.layout["val"].endswith("ground_truth.txt + devkit_order.txt (devkit order)")


def test_ground_truth_without_the_devkit_says_what_to_add(raw_tree):
    truth = flat_val(raw_tree)
    (raw_tree / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n" * len(truth))
    with pytest.raises(LayoutError, match="order is in the devkit's data/meta.mat.*ILSVRC2012_devkit_t12.tar.gz"):
        scan(raw_tree)


def test_ground_truth_shorter_than_the_files(raw_tree, tmp_path):
    """Labels go by image number: images 3..6, which the 2 lines do not cover, are listed as
    skipped, and the 2 labelled ones keep their labels."""
    truth = flat_val(raw_tree)
    (tmp_path / "order.txt").write_text("cat\nant\nbee\n")
    (raw_tree / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{['cat', 'ant', 'bee'].index(truth[s]) + 1}\n" for s in sorted(truth)[:2]))
    found = scan(raw_tree, synsets=tmp_path / "order.txt")
    assert {s.name[:-5]: CLASSES[s.label] for s in found.splits["val"]} == {s: truth[s] for s in sorted(truth)[:2]}
    assert [s.name for s in found.skipped] == [f"{s}.JPEG" for s in sorted(truth)[2:]]
    assert found.warnings == ["val (flat val/ folder): 4 of 6 files have no label in "
                              "ILSVRC2012_validation_ground_truth.txt + order.txt (devkit order) "
                              f"(listed as skipped: {', '.join(s.name for s in found.skipped)})"
                              "; 0 labelled images have no file"]


def test_caffe_val_txt(raw_tree):
    truth = flat_val(raw_tree)
    (raw_tree / "val.txt").write_text("".join(f"{s}.JPEG {CLASSES.index(w)}\n" for s, w in truth.items()))
    found = scan(raw_tree)
    assert {s.name[:-5]: CLASSES[s.label] for s in found.splits["val"]} == truth


def test_flat_val_without_labels_is_explained(raw_tree):
    flat_val(raw_tree)
    with pytest.raises(LayoutError, match="no labels were found.*LOC_val_solution.csv"):
        scan(raw_tree)


def test_empty_input_is_explained(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("x")
    with pytest.raises(LayoutError, match="has no class folders; expected"):
        scan(tmp_path / "raw")


def test_val_class_missing_from_train(raw_tree):
    (raw_tree / "val" / "zebra").mkdir()
    (raw_tree / "val" / "zebra" / "z.jpg").write_bytes((raw_tree / "val" / "ant" / "ant_0.jpg").read_bytes())
    with pytest.raises(LayoutError, match="'zebra'"):
        scan(raw_tree)




def test_ilsvrc_archives_read_in_place(raw_tree, tmp_path):
    truth = flat_val(raw_tree)
    rows = ["ImageId,PredictionString"] + [f"{s},{w} 0 0 1 1" for s, w in truth.items()]
    arch = tmp_path / "archives"
    make_archives(raw_tree, arch)
    (arch / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    found = scan(arch)
    folders = scan_folder_equivalent(raw_tree, rows)
    assert [(s.name, s.label) for s in found.splits["train"]] == [(s.name, s.label) for s in folders.splits["train"]]
    assert [(s.name, s.label) for s in found.splits["val"]] == [(s.name, s.label) for s in folders.splits["val"]]
    # Bytes read by offset from inside the archive are exactly the original files.
    by_name = {s.name: s for s in folders.splits["train"] + folders.splits["val"]}
    for src in found.splits["train"] + found.splits["val"]:
        assert src.path.endswith(".tar") and src.size > 0
        assert read_source(src) == Path(by_name[src.name].path).read_bytes()


def scan_folder_equivalent(raw: Path, rows: list[str]):
    (raw / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return scan(raw)


def test_not_a_tar_is_explained(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ILSVRC2012_img_train.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(LayoutError, match="tar"):
        scan(raw)


def test_loose_files_beside_class_folders_are_listed(raw_tree):
    (raw_tree / "val" / "stray.jpg").write_bytes((raw_tree / "val" / "ant" / "ant_0.jpg").read_bytes())
    found = scan(raw_tree)
    assert [(s.split, s.name) for s in found.skipped] == [("val", "stray.jpg")]
    assert "class folder" in found.skipped[0].reason
    assert len(found.splits["val"]) == 6


@pytest.fixture
def small_tree(tmp_path) -> Path:
    """Like raw_tree with tiny images (fast): 3 classes, 2 train and 2 val images each."""
    make_tree(tmp_path / "raw", {"train": 2, "val": 2}, sizes=((16, 12),))
    return tmp_path / "raw"


@pytest.fixture
def archives(small_tree, tmp_path) -> Path:
    """The archives of small_tree, with LOC_val_solution.csv for the val tar."""
    truth = flat_val(small_tree)
    arch = tmp_path / "archives"
    make_archives(small_tree, arch)
    rows = ["ImageId,PredictionString"] + [f"{s},{w} 0 0 1 1" for s, w in truth.items()]
    (arch / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return arch


@pytest.fixture
def tar_opens(monkeypatch) -> list[str]:
    """The archive files tarfile.open is asked to read (so a test can prove the cache was used);
    the inner per-class tars, opened from a file object, are not listed."""
    opened, real_open = [], tarfile.open

    def counting_open(name=None, *args, **kwargs):
        if name is not None:
            opened.append(Path(name).name)
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(tarfile, "open", counting_open)
    return opened


def test_scan_cache_spares_reading_the_archives(archives, tmp_path, tar_opens):
    cache = tmp_path / "out" / ".scan-cache"  # created, parents too
    first = scan(archives, cache_dir=cache)
    assert {"ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"} <= set(tar_opens)
    assert sorted(p.name.split(".")[0] for p in cache.iterdir()) == ["ILSVRC2012_img_train", "ILSVRC2012_img_val"]
    tar_opens.clear()
    again = scan(archives, cache_dir=cache)
    assert tar_opens == []
    assert again.splits == first.splits and again.layout == first.layout and again.classes == first.classes
    assert again.splits == scan(archives).splits  # and the same as no cache at all


def test_changed_archive_is_listed_again(archives, small_tree, tmp_path, tar_opens):
    cache = tmp_path / "cache"
    first = scan(archives, cache_dir=cache)
    train_tar = archives / "ILSVRC2012_img_train.tar"
    st = train_tar.stat()
    os.utime(train_tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes
    tar_opens.clear()
    assert scan(archives, cache_dir=cache).splits == first.splits
    assert tar_opens == ["ILSVRC2012_img_train.tar"]  # the val tar's cache still held
    # Rewritten without one class, and its old mtime put back: the size still tells.
    st = train_tar.stat()
    for f in (small_tree / "train" / "cat").iterdir():
        f.unlink()
    (small_tree / "train" / "cat").rmdir()
    (archives / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,ant 1\n")
    make_archives(small_tree, archives)
    os.utime(train_tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert scan(archives, cache_dir=cache).classes == ["ant", "bee"]


def _rewrite(cache_file: Path, change) -> None:
    """Load a cache file's arrays, let ``change`` edit the dict, write it back as .npz."""
    with np.load(cache_file, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    with open(cache_file, "wb") as f:
        np.savez(f, **arrays)


def _past_the_end(arrays: dict) -> None:
    arrays["offsets"] = arrays["offsets"].copy()
    arrays["offsets"][0] = json.loads(str(arrays["key"]))["size"]  # points past the end of the archive


@pytest.mark.parametrize("spoil", [
    lambda f: f.write_bytes(b"\x00garbage{"),
    lambda f: _rewrite(f, lambda a: a.pop("sizes")),
    lambda f: _rewrite(f, lambda a: a.update(name_ends=a["name_ends"][:-1])),  # columns of unequal length
    lambda f: _rewrite(f, lambda a: a.update(key=np.array(str(a["key"]).replace(f'"version": {CACHE_VERSION}',
                                                                                '"version": 2')))),
    lambda f: _rewrite(f, _past_the_end),
    lambda f: _rewrite(f, lambda a: a.update(offsets=np.array([object()] * len(a["offsets"])))),
], ids=["not an npz", "missing column", "bad columns", "other version", "offset past the end", "pickled objects"])
def test_bad_cache_file_is_ignored_and_rewritten(archives, tmp_path, tar_opens, spoil):
    cache = tmp_path / "cache"
    first = scan(archives, cache_dir=cache)
    for f in cache.iterdir():
        spoil(f)
    tar_opens.clear()
    assert scan(archives, cache_dir=cache).splits == first.splits
    assert sorted(tar_opens) == ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]
    tar_opens.clear()
    assert scan(archives, cache_dir=cache).splits == first.splits  # rewritten: good again
    assert tar_opens == []


def test_cache_of_another_archive_is_not_used(archives, tmp_path, tar_opens):
    cache = tmp_path / "cache"
    scan(archives, cache_dir=cache)
    copy = tmp_path / "copy"
    shutil.copytree(archives, copy)
    tar_opens.clear()
    found = scan(copy, cache_dir=cache)
    assert sorted(tar_opens) == ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]
    assert all(s.path.startswith(str(copy)) for s in found.splits["train"] + found.splits["val"])


def test_a_cache_whose_skipped_list_is_nested_too_deeply_is_read_again(archives, tmp_path, tar_opens):
    """A crafted cache file (right key, "skipped" nested 100,000 deep) was a RecursionError: now ignored."""
    cache = tmp_path / "cache"
    first = scan(archives, cache_dir=cache)
    for path in cache.iterdir():
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["skipped"] = np.array("[" * 100_000 + "]" * 100_000)
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    tar_opens.clear()
    assert scan(archives, cache_dir=cache).splits == first.splits
    assert sorted(tar_opens) == ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]  # listed again
