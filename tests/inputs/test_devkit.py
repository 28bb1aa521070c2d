"""The devkit's validation ground truth: ids in meta.mat order, never paired with a sorted list."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.errors import LayoutError
from alexnet_pipe.inputs.scan import scan
from tests.helpers.archives import (
    DEVKIT_ORDER,
    GT,
    MAT_FIELDS,
    devkit_tar_gz,
    flat_val,
    ground_truth,
    make_archives,
    map_clsloc_text,
    meta_mat_bytes,
)
from tests.helpers.images import CLASSES, make_tree


def assert_devkit_labels(found, truth: dict[str, str]) -> None:
    got = {Path(s.name).stem: CLASSES[s.label] for s in found.splits["val"]}
    assert got == truth
    wrong_with_sorted = {stem: sorted(DEVKIT_ORDER)[DEVKIT_ORDER.index(w)] for stem, w in truth.items()}
    assert all(got[stem] != wrong_with_sorted[stem] for stem in truth)


@pytest.fixture
def flat(tmp_path) -> tuple[Path, dict[str, str]]:
    """RAW with train/<class>/ and a flat val/ of 6 tiny JPEGs; {val stem: wnid}."""
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 1, "val": 2}, sizes=((16, 12),))
    return raw, flat_val(raw)


def test_hand_made_meta_mat_reads_like_the_devkits(tmp_path):
    """What scripts written against the real meta.mat index also works on ours."""
    (tmp_path / "meta.mat").write_bytes(meta_mat_bytes())
    synsets = scipy.io.loadmat(tmp_path / "meta.mat")["synsets"]
    assert synsets.shape == (5, 1) and synsets.dtype.names == MAT_FIELDS
    row = synsets[0]
    assert row[0][0][0][0] == 1 and row[0][1][0] == "cat" and row[0][5].shape == (1, 0)
    squeezed = scipy.io.loadmat(tmp_path / "meta.mat", squeeze_me=True)["synsets"]
    assert list(zip(*squeezed))[4] == (0, 0, 0, 3, 1)  # torchvision's num_children column
    assert list(squeezed[3]["children"]) == [1, 2, 3]


@pytest.mark.parametrize("where", ["meta.mat", "map_clsloc.txt", "extracted devkit"])
def test_ground_truth_follows_the_devkit_order(flat, where):
    raw, truth = flat
    # Sorted lists beside it must not matter: they give names, never the id order.
    (raw / "synsets.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    (raw / "LOC_synset_mapping.txt").write_text("".join(f"{c} the {c}\n" for c in CLASSES))
    if where == "extracted devkit":
        data = raw / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        (data / "meta.mat").write_bytes(meta_mat_bytes())
        (data / GT).write_text(ground_truth(truth))
    else:
        (raw / GT).write_text(ground_truth(truth))
        if where == "meta.mat":
            (raw / "meta.mat").write_bytes(meta_mat_bytes())
        else:
            (raw / "map_clsloc.txt").write_text(map_clsloc_text())
    found = scan(raw)
    assert found.classes == list(CLASSES)  # labels still index the sorted classes
    assert_devkit_labels(found, truth)
    assert found.layout["val"] == f"flat val/ folder labelled by {GT} + {where.replace('extracted devkit', 'meta.mat')}"


def test_devkit_archive_in_raw_labels_the_val_archive(flat, tmp_path):
    """Nothing extracted: val images from ILSVRC2012_img_val.tar, ground truth and meta.mat from
    ILSVRC2012_devkit_t12.tar.gz."""
    raw, truth = flat
    arch = tmp_path / "archives"
    make_archives(raw, arch)
    devkit_tar_gz(arch / "ILSVRC2012_devkit_t12.tar.gz",
                  {"meta.mat": meta_mat_bytes(), GT: ground_truth(truth).encode()})
    found = scan(arch)
    assert_devkit_labels(found, truth)
    inside = "in ILSVRC2012_devkit_t12.tar.gz"
    assert found.layout["val"] == f"ILSVRC2012_img_val.tar labelled by {GT} {inside} + meta.mat {inside}"
    assert sorted(p.name for p in arch.iterdir()) == [
        "ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]


@pytest.mark.parametrize("given", ["meta.mat", "map_clsloc.txt", "ILSVRC2012_devkit_t12.tar.gz", "order.txt"])
def test_explicit_id_order(flat, tmp_path, given):
    raw, truth = flat
    (raw / GT).write_text(ground_truth(truth))
    path = tmp_path / "elsewhere" / given
    path.parent.mkdir()
    if given == "meta.mat":
        path.write_bytes(meta_mat_bytes())
    elif given == "map_clsloc.txt":
        path.write_text(map_clsloc_text())
    elif given.endswith(".tar.gz"):
        devkit_tar_gz(path, {"meta.mat": meta_mat_bytes()})
    else:  # a plain list that is not sorted: taken as an export in devkit order
        path.write_text("".join(f"{c}\n" for c in DEVKIT_ORDER))
    assert_devkit_labels(scan(raw, synsets=path), truth)


def test_devkit_archive_as_val_labels(flat, tmp_path):
    raw, truth = flat
    path = devkit_tar_gz(tmp_path / "devkit.tar.gz", {"meta.mat": meta_mat_bytes(), GT: ground_truth(truth).encode()})
    found = scan(raw, val_labels=path)
    assert_devkit_labels(found, truth)
    assert found.layout["val"].endswith(f"{GT} in devkit.tar.gz + meta.mat in devkit.tar.gz")


def test_sorted_synset_list_is_never_paired_with_the_ground_truth(flat):
    raw, truth = flat
    (raw / GT).write_text(ground_truth(truth))
    (raw / "synsets.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    with pytest.raises(LayoutError) as err:
        scan(raw)
    message = str(err.value)
    assert "data/meta.mat" in message and "ILSVRC2012_devkit_t12.tar.gz" in message and "--synsets" in message
    assert "synsets.txt is not used" in message and "\n" not in message


def test_auto_detected_unsorted_list_is_not_trusted_either(flat):
    raw, truth = flat
    (raw / GT).write_text(ground_truth(truth))
    (raw / "synsets.txt").write_text("".join(f"{c}\n" for c in DEVKIT_ORDER))
    with pytest.raises(LayoutError, match="meta.mat"):
        scan(raw)


def test_explicit_sorted_list_is_refused(flat, tmp_path):
    raw, truth = flat
    (raw / GT).write_text(ground_truth(truth))
    (tmp_path / "sorted.txt").write_text("".join(f"{c} the {c}\n" for c in CLASSES))
    with pytest.raises(LayoutError, match=r"sorted.txt is in sorted wnid order.*meta\.mat"):
        scan(raw, synsets=tmp_path / "sorted.txt")


def _bad_meta_mat(kind: str) -> bytes:
    if kind == "corrupt":
        return meta_mat_bytes()[:200]
    if kind == "not a mat file":
        return b"this is not MATLAB" * 20
    buf = io.BytesIO()
    if kind == "no synsets":
        scipy.io.savemat(buf, {"classes": np.arange(3.0)})
    else:  # a struct array without num_children
        synsets = np.zeros((1, 1), dtype=[("ILSVRC2012_ID", object), ("WNID", object)])
        synsets[0, 0]["ILSVRC2012_ID"], synsets[0, 0]["WNID"] = np.array([[1.0]]), "cat"
        scipy.io.savemat(buf, {"synsets": synsets})
    return buf.getvalue()


@pytest.mark.parametrize("kind, message", [
    ("corrupt", "is not a readable MATLAB meta.mat"),
    ("not a mat file", "is not a readable MATLAB meta.mat"),
    ("no synsets", "holds no 'synsets' variable"),
    ("no num_children", "missing num_children"),
])
def test_bad_meta_mat_is_one_clear_line(flat, kind, message):
    raw, truth = flat
    (raw / GT).write_text(ground_truth(truth))
    (raw / "meta.mat").write_bytes(_bad_meta_mat(kind))
    with pytest.raises(LayoutError, match=message) as err:
        scan(raw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("gt_line, message", [
    ("4", "id 4 is not a class of meta.mat"),  # an internal node: not a class
    ("99", "id 99 is not a class of meta.mat"),
    ("x", "expected an integer label"),
])
def test_ground_truth_ids_outside_the_classes(flat, gt_line, message):
    raw, truth = flat
    lines = ground_truth(truth).splitlines()
    lines[2] = gt_line
    (raw / GT).write_text("\n".join(lines) + "\n")
    (raw / "meta.mat").write_bytes(meta_mat_bytes())
    with pytest.raises(LayoutError, match=f"{GT} line 3: .*{message}"):
        scan(raw)


def test_devkit_of_other_classes_is_refused(flat):
    raw, truth = flat
    (raw / GT).write_text(ground_truth(truth))
    (raw / "meta.mat").write_bytes(meta_mat_bytes(("cat", "ant", "yak")))
    truth_ids = ground_truth(truth).splitlines()
    assert "3" in truth_ids  # some image is a bee, id 3, which this meta.mat calls yak
    # The devkit is the only class list: the class set is checked against it first.
    with pytest.raises(LayoutError, match="train/ has 1 class that meta.mat does not list: bee"):
        scan(raw)
    # With a synset list of the right classes, the ground truth's ids still meet the wrong devkit.
    (raw / "synsets.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    with pytest.raises(LayoutError, match="id 3 is yak in meta.mat, which is not among the 3 training classes"):
        scan(raw)


@pytest.mark.parametrize("text, message", [
    ("cat 1 a\nant 1 b\nbee 3 c\n", "class id 1 is given twice"),
    ("cat 1 a\ncat 2 b\nbee 3 c\n", "cat has two class ids"),
    ("cat 1 a\nant two b\n", "line 2: expected '<wnid> <id> <name>'"),
])
def test_bad_map_clsloc(flat, text, message):
    raw, truth = flat
    (raw / GT).write_text(ground_truth(truth))
    (raw / "map_clsloc.txt").write_text(text)
    with pytest.raises(LayoutError, match=message):
        scan(raw)


def test_corrupt_devkit_archive(flat):
    raw, truth = flat
    (raw / GT).write_text(ground_truth(truth))
    (raw / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"not gzip" * 50)
    with pytest.raises(LayoutError, match="is not a readable devkit archive"):
        scan(raw)


def test_val_only_takes_its_classes_from_the_devkit(tmp_path, flat):
    raw, truth = flat
    val_only = tmp_path / "val_only"
    val_only.mkdir()
    (raw / "val").rename(val_only / "val")
    devkit_tar_gz(val_only / "ILSVRC2012_devkit_t12.tar.gz",
                  {"meta.mat": meta_mat_bytes(), GT: ground_truth(truth).encode()})
    found = scan(val_only)
    assert found.classes == list(CLASSES) and list(found.splits) == ["val"]
    assert_devkit_labels(found, truth)


def test_cli_refuses_a_sorted_list_in_one_line(flat, tmp_path):
    raw, truth = flat
    (raw / GT).write_text(ground_truth(truth))
    (raw / "synsets.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    runner = CliRunner()
    res = runner.invoke(main, ["convert", str(raw), str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.startswith("Error: ILSVRC2012_validation_ground_truth.txt holds devkit class ids")
    assert "data/meta.mat" in res.output and res.output.count("\n") == 1
    res = runner.invoke(main, ["convert", str(raw), str(tmp_path / "out"), "--no-progress",
                               "--synsets", str(raw / "synsets.txt")])
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert "synsets.txt is in sorted wnid order" in res.output
    assert not (tmp_path / "out").exists()
