"""The typed manifest and completion records: JSON in, the same JSON out (key for key, in order, the
very bytes convert and upgrade write), and every check refusing a damaged manifest with its one line."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.convert.upgrade import run_upgrade
from alexnet_pipe.dataset import parts
from alexnet_pipe.dataset.layout import MANIFEST_FILE, PARTS_DIR
from alexnet_pipe.dataset.manifest import load_dataset, unknown_fields
from alexnet_pipe.dataset.parts import Part
from alexnet_pipe.dataset.schema import JsonRecord, LmdbFiles, Manifest, SplitEntry
from alexnet_pipe.errors import DatasetError
from alexnet_pipe.fsutil import atomic_write_json
from tests.helpers.images import make_tree

FORMATS = {"both": ("lmdb", "recordio"), "lmdb": ("lmdb",), "recordio": ("recordio",)}
REWRITE = ("the manifest is damaged or was edited: rerun the alexnet-pipe convert command that made {root} (it "
           "rewrites the manifest from its shards), or reconvert")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """One conversion per format choice: 3 classes x (6 train + 2 val), shards of 5."""
    base = tmp_path_factory.mktemp("schema")
    make_tree(base / "raw", {"train": 6, "val": 2})
    out = {}
    for name, formats in FORMATS.items():
        out[name] = base / name
        run_convert(ConvertConfig(src=base / "raw", dst=out[name], formats=formats, image=ImageSettings(short_side=64),
                                  shard_size=5, workers=1, progress=False))
    return out


@pytest.fixture
def data(converted, tmp_path) -> Path:
    """A copy of the two-format conversion to edit."""
    import shutil

    dst = tmp_path / "data"
    shutil.copytree(converted["both"], dst)
    return dst


def written_bytes(obj: dict, tmp_path: Path) -> bytes:
    """What the writers (convert's finalize, upgrade) put on disk for ``obj``."""
    path = tmp_path / "written.json"
    atomic_write_json(path, obj)
    return path.read_bytes()


def same_json(a, b) -> bool:
    """Equal and with the same key order everywhere (== on dicts ignores order)."""
    return json.dumps(a) == json.dumps(b)


def made_in_code(record):
    """``record`` as if built field by field in code: no key order read from a file."""
    if isinstance(record, JsonRecord):
        changes = {f.name: made_in_code(getattr(record, f.name)) for f in dataclasses.fields(record)
                   if f.name != "key_order"}
        return dataclasses.replace(record, **changes, key_order=())
    if isinstance(record, tuple):
        return tuple(made_in_code(r) for r in record)
    if isinstance(record, dict):
        return {k: made_in_code(v) for k, v in record.items()}
    return record


@pytest.mark.parametrize("formats", FORMATS)
def test_a_conversions_manifest_round_trips_to_its_bytes(converted, formats, tmp_path):
    root = converted[formats]
    raw = (root / MANIFEST_FILE).read_bytes()
    data = json.loads(raw)
    manifest = Manifest.from_json(data, root)
    assert same_json(manifest.to_json(), data)
    assert written_bytes(manifest.to_json(), tmp_path) == raw
    assert Manifest.from_json(manifest.to_json()) == manifest
    # Built in code (no key order to follow), it writes what convert wrote.
    assert written_bytes(made_in_code(manifest).to_json(), tmp_path) == raw
    ds = load_dataset(root)
    assert ds.meta == manifest and same_json(ds.manifest, data)
    assert unknown_fields(ds.meta) == unknown_fields(ds.manifest) == []


@pytest.mark.parametrize("formats", FORMATS)
def test_completion_records_round_trip(converted, formats):
    root = converted[formats]
    records = sorted((root / PARTS_DIR).glob("*.json"))
    assert len(records) == 6  # 4 train + 2 val shards
    for path in records:
        data = json.loads(path.read_text())
        part = Part.from_json(data)
        assert same_json(part.to_json(), data)
        assert Part.from_json(part.to_json()) == part
        assert same_json(made_in_code(part).to_json(), data)  # the order convert writes
        assert part.files() == [f for f in (data.get("lmdb", {}).get("path"), data.get("recordio", {}).get("rec"),
                                            data.get("recordio", {}).get("idx"), data.get("mean_sums")) if f]


def test_the_typed_fields(converted):
    ds = load_dataset(converted["both"])
    m = ds.meta
    assert m.settings.formats == ("lmdb", "recordio") and m.settings.short_side == 64 and m.settings.shard_size == 5
    assert [c.id for c in m.classes] == [c["id"] for c in ds.classes] and ds.num_classes == 3
    val = ds.split_entry("val")
    assert isinstance(val, SplitEntry) and val.records == ds.split("val")["records"] == 6
    assert [s.records for s in ds.shard_entries("train")] == [5, 5, 5, 3]
    assert isinstance(val.shards[0].lmdb, LmdbFiles) and val.shards[0].files("recordio") is val.shards[0].recordio
    assert ds.lmdb_paths("val") == [converted["both"] / s.lmdb.path for s in val.shards]
    assert ds.recordio_paths("val") == ([converted["both"] / s.recordio.rec for s in val.shards],
                                        converted["both"] / "recordio/val.idx")
    assert m.mean == "mean.json" and m.mean_image.size == 64 and m.record_id_width == 8
    with pytest.raises(DatasetError, match=r"has no 'test' split \(it has: train, val\)"):
        ds.split_entry("test")


def test_completion_records_are_read_as_before(converted, tmp_path):
    import shutil

    root = tmp_path / "out"
    shutil.copytree(converted["lmdb"], root)
    plan = SimpleNamespace(name="val-00000")  # a ShardPlan: only its name is read
    path = root / PARTS_DIR / f"{plan.name}.json"
    good = json.loads(path.read_text())
    assert same_json(parts.read(root, plan).to_json(), good) and parts.load(root, plan) == Part.from_json(good)
    for damaged in ([], {**good, "name": "val-00001"}, {**good, "records": True}, {**good, "records": "5"},
                    {**good, "lmdb": None}, {**good, "recordio": []}, {k: v for k, v in good.items() if k != "name"}):
        path.write_text(json.dumps(damaged))
        assert parts.read(root, plan) is None and parts.load(root, plan) is None
    path.write_text("{")
    assert parts.read(root, plan) is None
    lenient = {"name": "val-00000", "records": 0, "odd": [1], "labels": "x"}  # redone only when unreadable
    path.write_text(json.dumps(lenient))
    assert same_json(parts.read(root, plan).to_json(), lenient) and parts.load(root, plan).extra == {"odd": [1]}
    path.write_text(json.dumps(good))
    shutil.rmtree(root / good["lmdb"]["path"])
    assert parts.read(root, plan) is not None and parts.load(root, plan) is None


def _edited(data: Path, edit) -> dict:
    m = json.loads((data / MANIFEST_FILE).read_text())
    edit(m)
    (data / MANIFEST_FILE).write_text(json.dumps(m))
    return m


def test_older_and_edited_manifests_give_back_what_they_hold(data, tmp_path):
    """Fields missing (older versions), extra fields in odd places, keys in another order, values the
    checks let through: all come back as read, and verify's list of unknown fields is as before."""
    def edit(m):
        m["version"] = 1
        m["settings"].pop("upscale")
        for key in ("resize", "record_id_width", "created_by"):
            m.pop(key)
        m["zz_top"] = {"a": [1, {"b": None}]}
        m["classes"][0].pop("name")
        m["classes"][2]["note"] = 3
        val = m["splits"]["val"]
        for key in ("short_side_counts", "min_short_side", "inputs", "passthrough"):
            val.pop(key)
        val["shards"][0] = dict(reversed(list(val["shards"][0].items())))
        val["shards"][1]["lmdb"]["x"] = 1
        val["shards"][1]["recordio"].pop("bytes")
        val["extra"] = None
        m["mean_image"]["y"] = "z"
        m["skipped"] = [1, "two", {"three": 3}]
        m["splits"] = dict(reversed(list(m["splits"].items())))
    m = _edited(data, edit)
    ds = load_dataset(data)
    assert same_json(ds.meta.to_json(), m) and same_json(ds.manifest, m)
    assert ds.meta.resize is None and ds.meta.classes[0].name is None and ds.split_entry("val").inputs is None
    assert unknown_fields(ds.meta) == ["zz_top", "classes[2].note", "mean_image.y", "splits.val.extra",
                                       "splits.val.shards[1].lmdb.x"]
    assert ds.smaller_than(100) == {"train": 18, "val": 6}  # val: from the short-side setting, no histogram
    assert ds.all_at_least("val", 64) is True  # no upscale setting: taken as True, as always
    # An upgrade-style edit of the typed record writes what editing the JSON did.
    shard = ds.meta.splits["val"].shards[1]
    lmdb = dataclasses.replace(shard.lmdb, bytes=123)
    splits = dict(ds.meta.splits, val=dataclasses.replace(
        ds.meta.splits["val"], shards=(ds.meta.splits["val"].shards[0], dataclasses.replace(shard, lmdb=lmdb))))
    settings = dataclasses.replace(ds.meta.settings, values={**ds.meta.settings.values, "upscale": False})
    upgraded = dataclasses.replace(ds.meta, version=2, upgraded_from=1, settings=settings, splits=splits)
    edit = copy.deepcopy(m)
    edit["splits"]["val"]["shards"][1]["lmdb"]["bytes"] = 123
    edit["settings"].setdefault("upscale", False)
    edit["version"] = 2
    edit["upgraded_from"] = 1
    assert same_json(upgraded.to_json(), edit)


def test_the_checks_let_through_what_they_did(data):
    """Values no check covers are kept whatever their JSON type: a format's entry when that format was
    not written, a null split index, a class index written 1.0."""
    def edit(m):
        m["settings"]["formats"] = ["lmdb"]
        m["splits"]["val"]["recordio_index"] = None
        m["splits"]["val"]["shards"][0]["recordio"] = 7
        m["splits"]["train"]["shards"][0]["recordio"] = {"rec": 5}
        m["classes"][1]["index"] = 1.0
        m["created_by"] = ["x"]
    m = _edited(data, edit)
    ds = load_dataset(data)
    assert same_json(ds.meta.to_json(), m)
    assert ds.meta.splits["val"].shards[0].recordio == 7 and ds.meta.splits["train"].shards[0].recordio.rec == 5


def test_an_upgraded_manifest_round_trips_to_its_bytes(data, tmp_path):
    _edited(data, lambda m: (m.__setitem__("version", 1), m["settings"].pop("upscale")))
    run_upgrade(data)
    raw = (data / MANIFEST_FILE).read_bytes()
    ds = load_dataset(data)
    assert ds.meta.upgraded_from == 1 and list(ds.meta.settings.values)[-1] == "upscale"
    assert written_bytes(ds.meta.to_json(), tmp_path) == raw


def _at(*path):
    def get(m):
        for key in path:
            m = m[key]
        return m
    return get


def _set(where, key, value):
    return lambda m: where(m).__setitem__(key, value)


def _del(where, key):
    return lambda m: where(m).pop(key)


TOP, SETTINGS, VAL, TRAIN, MEAN_IMAGE = _at(), _at("settings"), _at("splits", "val"), _at("splits", "train"), \
    _at("mean_image")
T1, T1_LMDB, V1_REC = _at("splits", "train", "shards", 1), _at("splits", "train", "shards", 1, "lmdb"), \
    _at("splits", "val", "shards", 1, "recordio")

# Every check of the manifest, and the field and problem its line names (the messages of before).
CHECKS = [
    (_set(TOP, "settings", []), "settings is list, expected an object"),
    (_del(SETTINGS, "formats"), "settings.formats is null, expected a list"),
    (_set(SETTINGS, "formats", []), "settings.formats is [], expected one or both of 'lmdb', 'recordio'"),
    (_set(SETTINGS, "formats", ["lmdb", "lmdb"]),
     "settings.formats is ['lmdb', 'lmdb'], expected one or both of 'lmdb', 'recordio'"),
    (_set(SETTINGS, "formats", ["lmdb", "zip"]),
     "settings.formats is ['lmdb', 'zip'], expected one or both of 'lmdb', 'recordio'"),
    (_del(SETTINGS, "short_side"), "settings.short_side is null, expected an integer >= 0 and <= 65536"),
    (_set(SETTINGS, "short_side", 64.0), "settings.short_side is 64.0, expected an integer >= 0 and <= 65536"),
    (_set(SETTINGS, "shard_size", 0), "settings.shard_size is 0, expected an integer >= 1"),
    (_set(TOP, "classes", {}), "classes is dict, expected a list"),
    (_set(TOP, "classes", []), "classes is empty"),
    (_set(_at("classes"), 1, "bee"), 'classes[1] is "bee", expected an object'),
    (_set(_at("classes", 1), "index", 2), "classes[1].index is 2, expected 1"),
    (_set(_at("classes", 1), "index", True), "classes[1].index is True, expected 1"),
    (_del(_at("classes", 0), "id"), "classes[0].id is null, expected a string"),
    (_set(_at("classes", 0), "name", 5), "classes[0].name is 5, expected a string"),
    (_set(TOP, "splits", []), "splits is list, expected an object"),
    (_set(_at("splits"), "val", None), "splits.val is null, expected an object"),
    (_set(VAL, "records", "6"), 'splits.val.records is "6", expected an integer >= 0'),
    (_set(VAL, "records", True), "splits.val.records is true, expected an integer >= 0"),
    (_del(VAL, "class_counts"), "splits.val.class_counts is null, expected a list"),
    (_set(VAL, "class_counts", [2, 4]), "splits.val.class_counts has 2 entries for 3 classes"),
    (_set(VAL, "class_counts", [2, 5, -1]), "splits.val.class_counts[2] is -1, expected an integer >= 0"),
    (_set(VAL, "class_counts", [2, 2, 3]), "splits.val.class_counts sum to 7, the split says 6 records"),
    (_del(VAL, "skipped"), "splits.val.skipped is null, expected an integer >= 0"),
    (_set(VAL, "inputs", "6"), 'splits.val.inputs is "6", expected an integer >= 0'),
    (_set(VAL, "passthrough", -1), "splits.val.passthrough is -1, expected an integer >= 0"),
    (_set(VAL, "min_short_side", "64"), 'splits.val.min_short_side is "64", expected an integer >= 0'),
    (_set(VAL, "short_side_counts", []), "splits.val.short_side_counts is list, expected an object"),
    (_set(VAL, "short_side_counts", {"6x": 6}),
     "splits.val.short_side_counts has the key '6x', expected a number of pixels"),
    (_set(VAL, "short_side_counts", {"\u0666": 6}),
     "splits.val.short_side_counts has the key '\u0666', expected a number of pixels"),
    (_set(VAL, "short_side_counts", {"64": 6.0}),
     "splits.val.short_side_counts['64'] is 6.0, expected an integer >= 0"),
    (_set(VAL, "layout", None), "splits.val.layout is null, expected a string"),
    (_set(VAL, "shards", {}), "splits.val.shards is dict, expected a list"),
    (_set(_at("splits", "train", "shards"), 1, "x"), 'splits.train.shards[1] is "x", expected an object'),
    (_del(T1, "name"), "splits.train.shards[1].name is null, expected a string"),
    (_set(_at("splits", "train", "shards", 0), "records", "5"),
     'splits.train.shards[0].records is "5", expected an integer >= 0'),
    (_del(T1, "first_id"), "splits.train.shards[1].first_id is null, expected an integer >= 0"),
    (_set(T1, "lmdb", None), "splits.train.shards[1].lmdb is null, expected an object"),
    (_set(T1_LMDB, "path", "/etc"),
     "splits.train.shards[1].lmdb.path is '/etc': shard paths must be relative to the dataset directory, without '..'"),
    (_set(T1_LMDB, "path", "lmdb/../../x"), "splits.train.shards[1].lmdb.path is 'lmdb/../../x': shard paths must "
                                            "be relative to the dataset directory, without '..'"),
    (_set(T1_LMDB, "path", "lmdb\\x"), "splits.train.shards[1].lmdb.path is 'lmdb\\\\x': shard paths must "
                                       "be relative to the dataset directory, without '..'"),
    (_set(T1_LMDB, "path", ""),
     "splits.train.shards[1].lmdb.path is '': shard paths must be relative to the dataset directory, without '..'"),
    (_set(T1_LMDB, "path", "lmdb/\0"), "splits.train.shards[1].lmdb.path is 'lmdb/\\x00': shard paths must "
                                       "be relative to the dataset directory, without '..'"),
    (_set(T1_LMDB, "path", "./lmdb/train-00000"),
     "splits.train.shards[1].lmdb.path is './lmdb/train-00000', the same file as splits.train.shards[0].lmdb.path"),
    (_set(T1_LMDB, "checksum", "md5:00"),
     "splits.train.shards[1].lmdb.checksum is 'md5:00', expected 'sha256:' and 64 hex digits"),
    (_set(T1_LMDB, "checksum", "sha256:" + "A" * 64),
     f"splits.train.shards[1].lmdb.checksum is 'sha256:{'A' * 64}', expected 'sha256:' and 64 hex digits"),
    (_set(T1_LMDB, "bytes", -5), "splits.train.shards[1].lmdb.bytes is -5, expected an integer >= 0"),
    (_set(_at("splits", "val", "shards", 1), "recordio", []),
     "splits.val.shards[1].recordio is list, expected an object"),
    (_set(V1_REC, "rec", 7), "splits.val.shards[1].recordio.rec is 7, expected a string"),
    (_set(V1_REC, "idx", "recordio/val-00001.rec"),
     "splits.val.shards[1].recordio.idx is 'recordio/val-00001.rec', the same file as "
     "splits.val.shards[1].recordio.rec"),
    (_del(V1_REC, "checksum"), "splits.val.shards[1].recordio.checksum is None, expected 'sha256:' and 64 hex digits"),
    (_set(V1_REC, "bytes", "1"), 'splits.val.shards[1].recordio.bytes is "1", expected an integer >= 0'),
    (lambda m: (TRAIN(m).__setitem__("records", 17), TRAIN(m).__setitem__("class_counts", [6, 6, 5])),
     "splits.train.records is 17, its shards hold 18"),
    (_del(VAL, "recordio_index"), "splits.val.recordio_index is null, expected a string"),
    (_set(VAL, "recordio_index", "../val.idx"),
     "splits.val.recordio_index is '../val.idx': shard paths must be relative to the dataset directory, without '..'"),
    (_set(TOP, "mean", "/tmp/mean.json"),
     "mean is '/tmp/mean.json': shard paths must be relative to the dataset directory, without '..'"),
    (_set(TOP, "mean", 1), "mean is 1, expected a string"),
    (_set(TOP, "mean_image", []), "mean_image is list, expected an object"),
    (_del(MEAN_IMAGE, "npy"), "mean_image.npy is null, expected a string"),
    (_set(MEAN_IMAGE, "binaryproto", "mean_image.npy"),
     "mean_image.binaryproto is 'mean_image.npy', the same file as mean_image.npy"),
    (_set(MEAN_IMAGE, "size", -1), "mean_image.size is -1, expected an integer >= 0"),
    (_set(MEAN_IMAGE, "images", "3"), 'mean_image.images is "3", expected an integer >= 0'),
    (_set(TOP, "record_id_width", 0), "record_id_width is 0, expected an integer >= 1 and <= 18"),
    (_set(TOP, "record_id_width", 19), "record_id_width is 19, expected an integer >= 1 and <= 18"),
    (_set(TOP, "skipped", {}), "skipped is dict, expected a list"),
    (_del(TOP, "skipped"), "skipped is null, expected a list"),
]


@pytest.mark.parametrize("edit, problem", CHECKS, ids=[p for _, p in CHECKS])
def test_every_check_refuses_with_its_line(data, edit, problem):
    m = _edited(data, edit)
    with pytest.raises(DatasetError) as raised:
        load_dataset(data)
    assert str(raised.value) == f"{data / MANIFEST_FILE}: {problem}; {REWRITE.format(root=data)}"
    with pytest.raises(DatasetError) as raised:  # without a directory: the same check, named generically
        Manifest.from_json(m)
    assert str(raised.value) == f"{MANIFEST_FILE}: {problem}; {REWRITE.format(root='the dataset')}"


@pytest.mark.parametrize("edit, line", [
    (_set(TOP, "format", "x"), "{path} is not an alexnet-pipe manifest"),
    (_del(TOP, "format"), "{path} is not an alexnet-pipe manifest"),
    (lambda m: m.clear(), "{path} is not an alexnet-pipe manifest"),
    (_set(TOP, "version", "2"), "{path} has format version '2'; this alexnet-pipe reads versions 1, 2: reconvert the "
                                "dataset, or use a newer alexnet-pipe"),
    (_set(TOP, "version", 3), "{path} has format version 3; this alexnet-pipe reads versions 1, 2: reconvert the "
                              "dataset, or use a newer alexnet-pipe"),
    (_set(TOP, "version", True), "{path} has format version True; this alexnet-pipe reads versions 1, 2: reconvert "
                                 "the dataset, or use a newer alexnet-pipe"),
])
def test_a_file_that_is_no_manifest_of_this_version_is_refused(data, edit, line):
    _edited(data, edit)
    with pytest.raises(DatasetError) as raised:
        load_dataset(data)
    assert str(raised.value) == line.format(path=data / MANIFEST_FILE)
    with pytest.raises(DatasetError, match="is not an alexnet-pipe manifest"):
        Manifest.from_json([])


def test_paths_are_checked_on_disk_only_with_a_directory(data, tmp_path):
    outside = tmp_path / "elsewhere"
    (data / "lmdb" / "train-00002").rename(outside)
    (data / "lmdb" / "train-00002").symlink_to(outside)
    m = json.loads((data / MANIFEST_FILE).read_text())
    with pytest.raises(DatasetError, match="lmdb/train-00002', which leads outside"):
        load_dataset(data)
    assert Manifest.from_json(m).splits["train"].shards[2].lmdb.path == "lmdb/train-00002"
