"""Broken archives and shifting labels (issue 7, sections 4 and 5): each case reproduced with tiny
real tars and JPEGs, through scan() and through the `convert` command.

A damaged or truncated archive must fail with one line naming the byte, never read as fewer
classes; members that are not plain files are listed as skipped; flat validation labels follow
the image number; system folders are never classes; a synset list pins the class set.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.errors import LayoutError
from alexnet_pipe.imaging.read import read_source
from alexnet_pipe.inputs.scan import scan
from alexnet_pipe.inputs.tarwalk import CorruptArchiveError
from tests.helpers.archives import GT, ground_truth, meta_mat_bytes
from tests.helpers.archives import flat_val as make_flat_val
from tests.helpers.images import CLASSES, make_tree
from tests.helpers.tar_builders import (
    add_bytes,
    add_link,
    build_train_tar,
    build_val_tar,
    file_info,
    flip_bit,
    gnu_sparse_member,
    jpeg_bytes,
    set_size,
    truncate,
    wnids,
)

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
CORRUPT = "incomplete or corrupt archive at byte"


def cli_convert(raw: Path, out: Path, *args: str):
    return CliRunner().invoke(main, ["convert", str(raw), str(out), "--workers", "1", "--no-progress", *args])


def assert_one_line_failure(res, *words: str) -> str:
    """Exit 1, one line "Error: ...", no traceback; returns the line."""
    assert res.exit_code == 1, res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exception
    assert ("Traceback" not in res.output and res.output.startswith("Error: ")
            and res.output.count("\n") == 1), res.output
    for word in words:
        assert word in res.output, res.output
    return res.output


def corrupt_at(match_byte: int):
    return pytest.raises(CorruptArchiveError, match=rf"{CORRUPT} {match_byte} ")


@pytest.fixture
def train_tar(tmp_path):
    """RAW holding a 10-class ILSVRC2012_img_train.tar (3 tiny JPEGs a class)."""
    return build_train_tar(tmp_path / "raw" / TRAIN_TAR)


# ----------------------------------------------------------------------------- section 4: archives


def test_intact_train_tar_reads_every_class(train_tar):
    found = scan(train_tar.path.parent)
    assert found.classes == train_tar.classes and found.skipped == []
    assert {s.name for s in found.splits["train"]} == train_tar.names()
    for src in found.splits["train"]:
        cls, name = src.name.split("/")
        assert found.classes[src.label] == cls and read_source(src) == train_tar.files[cls][name]


def test_flipped_bit_in_the_header_of_class_5_fails_naming_the_byte(train_tar, tmp_path):
    """Before: tarfile stopped at the bad header and 4 classes were converted, relabelled."""
    fifth = train_tar.classes[4]
    flip_bit(train_tar.path, train_tar.class_header[fifth] + 10, 3)  # a bit of the member's name
    with corrupt_at(train_tar.class_header[fifth]) as err:
        scan(train_tar.path.parent)
    assert "bad header checksum" in str(err.value) and TRAIN_TAR in str(err.value)
    line = assert_one_line_failure(cli_convert(train_tar.path.parent, tmp_path / "out"),
                                   f"{CORRUPT} {train_tar.class_header[fifth]}", "re-download", "md5")
    assert TRAIN_TAR in line
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("field", [0, 124, 148, 156, 257, 345])  # name, size, checksum, type, magic, prefix
def test_flipped_bit_in_any_outer_header_field(train_tar, field):
    cls = train_tar.classes[7]
    flip_bit(train_tar.path, train_tar.class_header[cls] + field, 1)
    with corrupt_at(train_tar.class_header[cls]):
        scan(train_tar.path.parent)


def test_flipped_bit_in_an_inner_tar_fails(train_tar, tmp_path):
    """Before: the rest of that class was dropped silently."""
    cls = train_tar.classes[2]
    second = train_tar.file_header[cls][f"{cls}_1.JPEG"]
    flip_bit(train_tar.path, second + 130, 0)  # the size field of the class's second JPEG
    with corrupt_at(second) as err:
        scan(train_tar.path.parent)
    assert f"in {cls}.tar: bad header checksum" in str(err.value)
    assert_one_line_failure(cli_convert(train_tar.path.parent, tmp_path / "out"), f"{CORRUPT} {second}", f"{cls}.tar")


def test_flipped_bit_in_an_inner_end_marker_fails(train_tar):
    cls = train_tar.classes[0]
    # The inner tar's end-of-archive marker follows its last member's data: find it by reading.
    start = train_tar.data_start[cls]
    with tarfile.open(fileobj=io.BytesIO(train_tar.path.read_bytes()[start:start + train_tar.inner_size[cls]])) as t:
        last = t.getmembers()[-1]
        inner_end = start + last.offset_data + -(-last.size // 512) * 512
    flip_bit(train_tar.path, inner_end + 700, 6)  # in the second zero block
    with corrupt_at(inner_end + 512):
        scan(train_tar.path.parent)


@pytest.mark.parametrize("classes_kept", [0, 6, 9])
def test_outer_tar_truncated_at_a_member_boundary_fails(train_tar, tmp_path, classes_kept):
    """A partial download: before, accepted as 6 classes."""
    cut = train_tar.class_header[train_tar.classes[classes_kept]] if classes_kept < 10 else train_tar.end
    truncate(train_tar.path, cut)
    with corrupt_at(cut) as err:
        scan(train_tar.path.parent)
    assert "ends" in str(err.value) or "empty file" in str(err.value)
    assert_one_line_failure(cli_convert(train_tar.path.parent, tmp_path / "out"), f"{CORRUPT} {cut}")


@pytest.mark.parametrize("where", ["inside a header", "inside member data", "inside the end marker",
                                   "before the end marker"])
def test_outer_tar_truncated_elsewhere_fails(train_tar, where):
    cls = train_tar.classes[5]
    cut = {"inside a header": train_tar.class_header[cls] + 100,
           "inside member data": train_tar.data_start[cls] + 5000,
           "inside the end marker": train_tar.end + 700,
           "before the end marker": train_tar.end}[where]
    truncate(train_tar.path, cut)
    with pytest.raises(CorruptArchiveError, match=CORRUPT):
        scan(train_tar.path.parent)


def test_truncated_padding_after_the_end_marker_is_fine(train_tar):
    """GNU tar pads to a 10 KiB record after the marker; losing padding loses nothing."""
    truncate(train_tar.path, train_tar.end + 1024)
    assert scan(train_tar.path.parent).classes == train_tar.classes


@pytest.mark.parametrize("damage", ["zeroed header", "data after the marker", "concatenated tar"])
def test_zeros_or_data_where_the_archive_should_go_on_or_end(train_tar, tmp_path, damage):
    """A hole of zeros over a header (an unfinished multi-connection download keeps the file's
    full size) reads to tarfile as the end of the archive; so does a second archive after the first."""
    data = bytearray(train_tar.path.read_bytes())
    if damage == "zeroed header":
        at = train_tar.class_header[train_tar.classes[3]]
        data[at:at + 4096] = bytes(4096)
    elif damage == "data after the marker":
        at = train_tar.end + 1024 + 100
        data[at] = 1
    else:
        other = build_train_tar(tmp_path / "other" / TRAIN_TAR, n_classes=2)
        at = len(data)
        data += other.path.read_bytes()
    train_tar.path.write_bytes(bytes(data))
    with pytest.raises(CorruptArchiveError, match=CORRUPT):
        scan(train_tar.path.parent)


def test_negative_member_size_fails_instead_of_looping(train_tar):
    """A base-256 size of -512 would send tarfile back to the header it just read, forever."""
    data = bytearray(train_tar.path.read_bytes())
    cls = train_tar.classes[1]
    at = train_tar.class_header[cls]
    data[at:at + 512] = set_size(bytes(data[at:at + 512]), b"\xff" * 10 + b"\xfe\x00")
    train_tar.path.write_bytes(bytes(data))
    with corrupt_at(at) as err:
        scan(train_tar.path.parent)
    assert "negative member size" in str(err.value)


def test_not_a_tar_and_a_gzipped_tar(tmp_path):
    raw = tmp_path / "raw"
    build_train_tar(tmp_path / "plain" / TRAIN_TAR, n_classes=2)
    raw.mkdir()
    import gzip

    (raw / TRAIN_TAR).write_bytes(gzip.compress((tmp_path / "plain" / TRAIN_TAR).read_bytes()))
    with pytest.raises(CorruptArchiveError, match=rf"{CORRUPT} 0 \(gzip-compressed data, not an uncompressed tar\)"):
        scan(raw)
    (raw / TRAIN_TAR).write_bytes(b"not a tar at all" * 100)
    with pytest.raises(CorruptArchiveError, match=rf"{CORRUPT} 0 \(invalid header\)"):
        scan(raw)
    (raw / TRAIN_TAR).write_bytes(b"")
    with pytest.raises(CorruptArchiveError, match=rf"{CORRUPT} 0 \(empty file\)"):
        scan(raw)


def _inner_oddities(cls: str, tar: tarfile.TarFile) -> None:
    """Members of a class tar that are not plain files, as real archives hold them."""
    if cls != wnids(10)[3]:
        return
    add_link(tar, f"{cls}_link.JPEG", f"{cls}_0.JPEG")  # symlink
    add_link(tar, f"{cls}_hard.JPEG", f"{cls}_1.JPEG", hard=True)
    tar.fileobj.write(gnu_sparse_member(f"{cls}_sparse.JPEG", [(0, jpeg_bytes(99))], real_size=1 << 20))
    tar.offset = tar.fileobj.tell()
    fifo = file_info(f"{cls}_fifo", 0)
    fifo.type = tarfile.FIFOTYPE
    tar.addfile(fifo)
    folder = file_info(f"{cls}_folder", 0)
    folder.type = tarfile.DIRTYPE
    tar.addfile(folder)
    add_bytes(tar, f".{cls}_hidden.JPEG", jpeg_bytes(98))  # ignored: hidden, as in folders
    add_bytes(tar, f"@eaDir/{cls}_0.JPEG/SYNOFILE_THUMB_M.jpg", jpeg_bytes(97))
    add_bytes(tar, f"{cls}_junk.JPEG", b"")  # a regular (empty) file: read, then skipped by imaging


def _outer_oddities(tar: tarfile.TarFile) -> None:
    add_link(tar, "n09999999.tar", "n00001000.tar")
    add_bytes(tar, "README.txt", b"not a class")
    add_bytes(tar, "__MACOSX/._n00001000.tar", b"\0" * 10)
    tar.fileobj.write(gnu_sparse_member("n09999998.tar", [(0, b"x" * 600)], real_size=1 << 20))
    tar.offset = tar.fileobj.tell()


def test_links_sparse_and_other_members_are_skipped_with_reasons(tmp_path):
    built = build_train_tar(tmp_path / "raw" / TRAIN_TAR, inner_extra=_inner_oddities, outer_extra=_outer_oddities)
    found = scan(built.path.parent)
    assert found.classes == built.classes  # no link, sparse file or README became a class
    cls = built.classes[3]
    skipped = {s.name: s.reason for s in found.skipped}
    assert set(skipped) == {
        f"{cls}/{cls}_link.JPEG", f"{cls}/{cls}_hard.JPEG", f"{cls}/{cls}_sparse.JPEG", f"{cls}/{cls}_fifo",
        f"{cls}/@eaDir/", "n09999999.tar", "README.txt", "__MACOSX/._n00001000.tar", "n09999998.tar"}
    assert skipped[f"{cls}/{cls}_link.JPEG"].startswith("symbolic link to")
    assert skipped[f"{cls}/{cls}_hard.JPEG"].startswith("hard link to")
    assert "sparse" in skipped[f"{cls}/{cls}_sparse.JPEG"] and "sparse" in skipped["n09999998.tar"]
    assert "FIFO" in skipped[f"{cls}/{cls}_fifo"] and "Synology" in skipped[f"{cls}/@eaDir/"]
    assert "not a per-class" in skipped["README.txt"] and "macOS" in skipped["__MACOSX/._n00001000.tar"]
    names = {s.name for s in found.splits["train"]}
    assert names == built.names() | {f"{cls}/{cls}_junk.JPEG"}
    for src in found.splits["train"]:  # nothing is read from a link or a sparse member
        assert src.size < 1 << 19
    # The member lists, skipped ones included, come back the same from the scan cache.
    cache = tmp_path / "cache"
    first = scan(built.path.parent, cache_dir=cache)
    again = scan(built.path.parent, cache_dir=cache)
    assert again.skipped == first.skipped == found.skipped and again.splits == found.splits


def test_links_and_sparse_members_end_to_end(tmp_path):
    built = build_train_tar(tmp_path / "raw" / TRAIN_TAR, n_classes=4, per_class=2, inner_extra=_inner_oddities)
    res = cli_convert(built.path.parent, tmp_path / "out")
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [c["id"] for c in manifest["classes"]] == built.classes
    assert manifest["splits"]["train"]["records"] == 8
    reasons = {s["name"]: s["reason"] for s in manifest["skipped"]}
    cls = built.classes[3]
    assert "sparse" in reasons[f"{cls}/{cls}_sparse.JPEG"] and "link" in reasons[f"{cls}/{cls}_link.JPEG"]
    assert "empty" in reasons[f"{cls}/{cls}_junk.JPEG"]


def test_val_tar_damage_and_odd_members(tmp_path):
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 1, "val": 2}, sizes=((16, 12),))
    truth = make_flat_val(raw)
    rows = ["ImageId,PredictionString"] + [f"{s},{w} 0 0 1 1" for s, w in truth.items()]
    (raw / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    files = {f"{s}.JPEG": (raw / "val" / f"{s}.JPEG").read_bytes() for s in sorted(truth)}
    shutil.rmtree(raw / "val")

    def odd(tar):
        add_link(tar, "ILSVRC2012_val_00000099.JPEG", "ILSVRC2012_val_00000001.JPEG")
        tar.fileobj.write(gnu_sparse_member("ILSVRC2012_val_00000098.JPEG", [(0, b"y" * 700)], 1 << 20))
        tar.offset = tar.fileobj.tell()

    build_val_tar(raw / VAL_TAR, files, odd)
    found = scan(raw)
    assert {s.name for s in found.splits["val"]} == set(files)
    assert {s.name: s.reason.split()[0] for s in found.skipped} == {
        "ILSVRC2012_val_00000099.JPEG": "symbolic", "ILSVRC2012_val_00000098.JPEG": "GNU"}
    data = (raw / VAL_TAR).read_bytes()
    truncate(raw / VAL_TAR, len(data) // 2 // 512 * 512)
    with pytest.raises(CorruptArchiveError, match=rf"{VAL_TAR}: {CORRUPT}"):
        scan(raw)


def test_synset_list_catches_a_well_formed_but_incomplete_train_tar(tmp_path):
    """A tar written from a partial copy ends properly; the synset list still names what is missing."""
    built = build_train_tar(tmp_path / "raw" / TRAIN_TAR, n_classes=9)
    (built.path.parent / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {w}\n" for w in wnids(10)))
    with pytest.raises(LayoutError,
                       match=rf"has 9 classes but LOC_synset_mapping.txt lists 10; missing: {wnids(10)[9]}"):
        scan(built.path.parent)
    assert_one_line_failure(cli_convert(built.path.parent, tmp_path / "out"), wnids(10)[9])


def test_tar_classes_matching_the_devkit(tmp_path):
    built = build_train_tar(tmp_path / "raw" / TRAIN_TAR, n_classes=4)
    (built.path.parent / "meta.mat").write_bytes(meta_mat_bytes(tuple(reversed(built.classes))))
    assert scan(built.path.parent).classes == built.classes
    (built.path.parent / "meta.mat").write_bytes(meta_mat_bytes(tuple(built.classes[:3]) + ("n07777777",)))
    with pytest.raises(LayoutError, match=rf"1 class that meta.mat does not list: {built.classes[3]}"):
        scan(built.path.parent)


# ----------------------------------------------------------------------------- section 5: labels


@pytest.fixture
def flat_val(tmp_path):
    """RAW with train/<class>/ and a flat val/ of 6 images labelled by the devkit's ground
    truth (meta.mat in devkit order); returns (raw, {stem: class})."""
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 1, "val": 2}, sizes=((16, 12),))
    truth = make_flat_val(raw)
    order = ("cat", "ant", "bee")
    (raw / GT).write_text(ground_truth(truth, order))
    (raw / "meta.mat").write_bytes(meta_mat_bytes(order))
    return raw, truth


def _missing_one_plus_thumbs_db(raw: Path, truth: dict[str, str]) -> str:
    """Delete image 5 and add a Thumbs.db: the file count still equals the label count."""
    gone = sorted(truth)[4]
    (raw / "val" / f"{gone}.JPEG").unlink()
    (raw / "val" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 thumbnails")
    return gone


def _check_by_number(found, truth: dict[str, str], gone: str) -> None:
    got = {Path(s.name).stem: CLASSES[s.label] for s in found.splits["val"]}
    assert got == {s: w for s, w in truth.items() if s != gone}
    assert [(s.name, s.reason.split(" + ")[0]) for s in found.skipped] == [("Thumbs.db", f"no label in {GT}")]
    assert len(found.warnings) == 1
    assert "1 of 6 files have no label" in found.warnings[0] and "Thumbs.db" in found.warnings[0]
    assert f"1 labelled image has no file ({gone})" in found.warnings[0]


def test_flat_val_folder_labels_follow_the_image_number(flat_val, caplog):
    """Before: labels by position in the sorted list, so every label after the gap shifted."""
    raw, truth = flat_val
    gone = _missing_one_plus_thumbs_db(raw, truth)
    with caplog.at_level(logging.WARNING):
        found = scan(raw)
    _check_by_number(found, truth, gone)
    assert any(gone in r.message and r.levelno == logging.WARNING for r in caplog.records)


def test_flat_val_tar_labels_follow_the_image_number(flat_val, tmp_path):
    raw, truth = flat_val
    gone = _missing_one_plus_thumbs_db(raw, truth)
    files = {p.name: p.read_bytes() for p in sorted((raw / "val").iterdir())}
    shutil.rmtree(raw / "val")
    build_val_tar(raw / VAL_TAR, files)
    _check_by_number(scan(raw), truth, gone)
    res = cli_convert(raw, tmp_path / "out")
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["val"]["records"] == 5
    assert manifest["splits"]["val"]["class_counts"] == [
        sum(1 for s, w in truth.items() if w == c and s != gone) for c in CLASSES]
    assert [s["name"] for s in manifest["skipped"]] == ["Thumbs.db"]


def test_ground_truth_needs_ilsvrc_file_names(flat_val):
    raw, truth = flat_val
    for k, stem in enumerate(sorted(truth)):
        (raw / "val" / f"{stem}.JPEG").rename(raw / "val" / f"img{k}.jpg")
    with pytest.raises(LayoutError, match="labels images by number.*ILSVRC2012_val_"):
        scan(raw)


@pytest.fixture
def junk_tree(tmp_path):
    """Class folders ant, bee, cat beside the folders that file systems and OSes make."""
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 2, "val": 1}, sizes=((16, 12),))
    jpeg = (raw / "train" / "ant" / "ant_0.jpg").read_bytes()
    for junk in ("__MACOSX/ant/x.jpg", "lost+found/#12345", ".Trash-1000/files/y.jpg", "@eaDir/z.jpg",
                 "$RECYCLE.BIN/S-1-5-21/a.jpg", "System Volume Information/IndexerVolumeGuid"):
        (raw / "train" / junk).parent.mkdir(parents=True, exist_ok=True)
        (raw / "train" / junk).write_bytes(jpeg)
    (raw / "train" / "empty").mkdir()
    (raw / "train" / "only_hidden").mkdir()
    (raw / "train" / "only_hidden" / ".DS_Store").write_bytes(b"x")
    (raw / "train" / "ant" / "@eaDir" / "ant_0.jpg").mkdir(parents=True)
    (raw / "train" / "ant" / "@eaDir" / "ant_0.jpg" / "SYNOFILE_THUMB_M.jpg").write_bytes(jpeg)
    return raw


def _macosx(folder: Path) -> None:
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._x.jpg").write_bytes(b"\0\5\26\7")
    (folder / "__MACOSX" / "x.jpg").write_bytes(b"\0\5\26\7")


def test_system_and_empty_folders_are_not_classes(junk_tree):
    """Before: __MACOSX and lost+found became classes 0 and 1."""
    _macosx(junk_tree / "val")
    found = scan(junk_tree)
    assert found.classes == list(CLASSES)
    skipped = {f"{s.split}/{s.name}": s.reason for s in found.skipped}
    assert set(skipped) == {"train/__MACOSX/", "train/lost+found/", "train/.Trash-1000/", "train/@eaDir/",
                            "train/$RECYCLE.BIN/", "train/System Volume Information/", "train/empty/",
                            "train/only_hidden/", "train/ant/@eaDir/", "val/__MACOSX/"}
    assert skipped["train/empty/"] == "empty folder (no files), not a class"
    assert skipped["train/__MACOSX/"] == "macOS archive metadata folder, not a class"
    assert skipped["train/ant/@eaDir/"] == "Synology thumbnail folder, not read"
    assert len(found.splits["train"]) == 6 and len(found.splits["val"]) == 3


def test_caffe_val_txt_cannot_point_at_a_system_folder(junk_tree, tmp_path):
    truth = make_flat_val(junk_tree)
    _macosx(junk_tree / "val")  # a flat val/ beside a system folder is still flat
    (junk_tree / "val.txt").write_text("".join(f"{s}.JPEG {CLASSES.index(w)}\n" for s, w in truth.items()))
    found = scan(junk_tree)
    assert {s.name[:-5]: CLASSES[s.label] for s in found.splits["val"]} == truth
    (junk_tree / "val.txt").write_text("".join(f"{s}.JPEG {CLASSES.index(w) + 3}\n" for s, w in truth.items()))
    with pytest.raises(LayoutError, match=r"label \d outside 0..2"):
        scan(junk_tree)
    res = cli_convert(junk_tree, tmp_path / "out")
    assert_one_line_failure(res, "val.txt has label")


def test_class_folder_outside_the_synset_list_is_an_error(raw_tree, tmp_path):
    (raw_tree / "LOC_synset_mapping.txt").write_text("".join(f"{c} the {c}\n" for c in CLASSES))
    assert scan(raw_tree).class_names["ant"] == "the ant"
    shutil.copytree(raw_tree / "train" / "ant", raw_tree / "train" / "dog")
    with pytest.raises(LayoutError, match=r"train/ has 1 class that LOC_synset_mapping.txt does not list: dog"):
        scan(raw_tree)
    assert_one_line_failure(cli_convert(raw_tree, tmp_path / "out"), "dog", "LOC_synset_mapping.txt")


def test_class_missing_from_the_folders_is_an_error(raw_tree, tmp_path):
    (raw_tree / "synsets.txt").write_text("".join(f"{c}\n" for c in CLASSES + ("dog", "elk")))
    with pytest.raises(LayoutError, match=r"has 3 classes but synsets.txt lists 5; missing: dog, elk"):
        scan(raw_tree)
    # A deliberate subset: --synsets names the classes kept.
    (tmp_path / "kept.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    assert scan(raw_tree, synsets=tmp_path / "kept.txt").classes == list(CLASSES)


def test_empty_class_folder_with_a_synset_list_is_a_missing_class(raw_tree):
    (raw_tree / "synsets.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    for f in (raw_tree / "train" / "bee").iterdir():
        f.unlink()
    with pytest.raises(LayoutError, match="missing: bee"):
        scan(raw_tree)
