"""The convert job end to end: output layout, determinism, shuffling, resume, refusal, verify."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.config import ConvertConfig, ImageSettings, VerifyConfig
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.convert.verify import run_verify
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.dataset.mean import read_mean_file
from alexnet_pipe.errors import DatasetError, SettingsMismatchError
from alexnet_pipe.formats.datum import decode_datum
from alexnet_pipe.formats.recordio import iter_records, unpack_payload
from tests.helpers.archives import flat_val, make_archives
from tests.helpers.images import CLASSES, make_tree
from tests.helpers.trees import tree_bytes


def convert(src: Path, dst: Path, **kw) -> None:
    opts = {"formats": ("lmdb", "recordio"), "shard_size": 5, "workers": 1, "progress": False}
    opts.update(kw)
    run_convert(ConvertConfig(src=src, dst=dst, **opts))


def lmdb_records(path: Path) -> list[tuple[bytes, object]]:
    with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
        return [(k, decode_datum(v)) for k, v in txn.cursor()]


def test_output_layout_and_manifest(raw_tree, tmp_path):
    out = tmp_path / "out"
    convert(raw_tree, out)
    ds = load_dataset(out)
    m = ds.manifest
    assert m["settings"]["short_side"] == 256 and m["settings"]["formats"] == ["lmdb", "recordio"]
    assert [c["id"] for c in m["classes"]] == list(CLASSES)
    assert m["splits"]["train"]["records"] == 18 and m["splits"]["val"]["records"] == 6
    assert [s["records"] for s in m["splits"]["train"]["shards"]] == [5, 5, 5, 3]
    assert m["splits"]["train"]["class_counts"] == [6, 6, 6]
    for shard in m["splits"]["train"]["shards"]:
        assert shard["lmdb"]["checksum"].startswith("sha256:")
        assert not (out / shard["lmdb"]["path"] / "lock.mdb").exists()
    # every Datum is an encoded RGB JPEG whose label matches its source folder
    keys = []
    for path in ds.lmdb_paths("train"):
        for key, datum in lmdb_records(path):
            name = key.decode().split("_", 1)[1]
            assert CLASSES[datum.label] == name.split("/")[0]
            assert datum.encoded and datum.channels == 3 and datum.data[:2] == b"\xff\xd8"
            keys.append(name)
    assert sorted(keys) == sorted(f"{c}/{c}_{i}.jpg" for c in CLASSES for i in range(6))
    mean = read_mean_file(out / "mean.json")
    assert mean.channel_order == "RGB" and mean.images == 18 and all(0 < v < 255 for v in mean.mean)
    assert not (out / ".staging").exists()


def test_combined_recordio_index_offsets_are_global(raw_tree, tmp_path):
    out = tmp_path / "out"
    convert(raw_tree, out)
    recs, index = load_dataset(out).recordio_paths("train")
    blob = b"".join(p.read_bytes() for p in recs)
    entries = [line.split("\t") for line in index.read_text().splitlines()]
    assert len(entries) == 18
    for key, offset in entries:
        header, _ = unpack_payload(_record_at(blob, int(offset)))
        assert header.id == int(key)


def _record_at(blob: bytes, offset: int) -> bytes:
    import io

    from alexnet_pipe.formats.recordio import read_record

    f = io.BytesIO(blob)
    f.seek(offset)
    return read_record(f)


def test_same_input_same_bytes_and_mixed_order(raw_tree, tmp_path):
    convert(raw_tree, tmp_path / "a", workers=1)
    convert(raw_tree, tmp_path / "b", workers=2)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    # ... the mean image and the per-shard sums included
    assert {"mean_image.npy", "mean.binaryproto", ".parts/train-00000.mean.npz"} <= tree_bytes(tmp_path / "b").keys()
    labels = [d.label for p in load_dataset(tmp_path / "a").lmdb_paths("train") for _, d in lmdb_records(p)]
    # stored order is shuffled: not class by class
    assert labels != sorted(labels)
    assert len(set(labels[:6])) > 1
    convert(raw_tree, tmp_path / "c", seed=1)
    other = [d.label for p in load_dataset(tmp_path / "c").lmdb_paths("train") for _, d in lmdb_records(p)]
    assert sorted(other) == sorted(labels) and other != labels


def test_archives_give_the_same_records_as_folders(raw_tree, tmp_path, monkeypatch):
    truth = flat_val(raw_tree)
    rows = ["ImageId,PredictionString"] + [f"{s},{w} 0 0 1 1" for s, w in truth.items()]
    (raw_tree / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    make_archives(raw_tree, tmp_path / "arch")
    (tmp_path / "arch" / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    convert(raw_tree, tmp_path / "from_folders")
    convert(tmp_path / "arch", tmp_path / "from_tars")
    a, b = (load_dataset(tmp_path / d).manifest for d in ("from_folders", "from_tars"))
    for split in ("train", "val"):
        assert [s["lmdb"]["checksum"] for s in a["splits"][split]["shards"]] == [
            s["lmdb"]["checksum"] for s in b["splits"][split]["shards"]
        ]
    # The archives' member lists are cached in OUT: a rerun (resume, --part) reads no tar header.
    assert len(list((tmp_path / "from_tars" / ".scan-cache").glob("*.npz"))) == 2
    import tarfile
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    convert(tmp_path / "arch", tmp_path / "from_tars")
    assert opened == []


def test_rerun_is_a_no_op_and_other_settings_are_refused(raw_tree, tmp_path):
    out = tmp_path / "out"
    convert(raw_tree, out)
    before = tree_bytes(out)
    convert(raw_tree, out)
    assert tree_bytes(out) == before
    with pytest.raises(SettingsMismatchError, match=r"quality: 90 -> 80.*--force"):
        convert(raw_tree, out, image=ImageSettings(quality=80))
    assert tree_bytes(out) == before
    convert(raw_tree, out, image=ImageSettings(quality=80), force=True)
    assert load_dataset(out).manifest["settings"]["quality"] == 80


def test_foreign_nonempty_output_is_refused(raw_tree, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(SettingsMismatchError, match="not empty"):
        convert(raw_tree, out)
    assert (out / "thesis.tex").read_text() == "precious"


def test_recordio_alone_is_the_recordio_of_both_formats(tmp_path, monkeypatch):
    """RecordIO alone is written through a scratch file in arrival order, without LMDB: its
    shards are byte for byte those written next to LMDB. Chunks of 2 make the records of a shard
    arrive out of their stored order (inputs are read in path order)."""
    import alexnet_pipe.convert.encode as encode

    monkeypatch.setattr(encode, "CHUNK", 2)
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 9, "val": 3})
    convert(raw, tmp_path / "both", shard_size=7)
    convert(raw, tmp_path / "rec", shard_size=7, formats=("recordio",))
    both, alone = tree_bytes(tmp_path / "both"), tree_bytes(tmp_path / "rec")
    rec_files = {k for k in both if k.startswith("recordio/")}
    assert len(rec_files) >= 6 and rec_files == {k for k in alone if k.startswith("recordio/")}
    assert all(both[k] == alone[k] for k in rec_files)
    assert not any(".scratch" in k for k in alone)  # the scratch file is gone
    ids = [int(line.split()[0]) for line in alone["recordio/train-00001.idx"].decode().splitlines()]
    assert ids == sorted(ids) and len(ids) == 7


def test_lost_shard_is_rewritten_on_rerun(raw_tree, tmp_path):
    out = tmp_path / "out"
    convert(raw_tree, out)
    before = tree_bytes(out)
    import shutil

    shutil.rmtree(out / "lmdb" / "train-00001")
    convert(raw_tree, out)
    assert tree_bytes(out) == before


def test_kill_and_rerun_matches_clean_run(tmp_path):
    """SIGKILL a converting subprocess mid-way; the rerun's output equals an uninterrupted run."""
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 30, "val": 4}, sizes=((400, 300), (320, 480)))
    cmd = [sys.executable, "-m", "alexnet_pipe", "convert", str(raw), str(tmp_path / "killed"),
           "--format", "both", "--shard-size", "6", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed" / ".parts"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("*.json"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "conversion finished before it could be killed; make the input larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists()
    with pytest.raises(DatasetError, match="rerun the same alexnet-pipe convert"):
        load_dataset(tmp_path / "killed")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    convert(raw, tmp_path / "clean", shard_size=6)
    killed, clean = tree_bytes(tmp_path / "killed"), tree_bytes(tmp_path / "clean")
    assert killed.keys() == clean.keys()
    assert {"mean.json", "mean_image.npy", "mean.binaryproto"} <= clean.keys()
    assert killed == clean


def test_verify_passes_then_finds_corruption(raw_tree, tmp_path):
    out = tmp_path / "out"
    convert(raw_tree, out)
    ok = run_verify(VerifyConfig(out, workers=1, progress=False))
    assert ok.ok and ok.records == 2 * 24
    # corrupt one JPEG inside one RecordIO shard without changing its length
    rec = out / "recordio" / "train-00002.rec"
    records = list(iter_records(rec))
    offset, payload = records[1]
    blob = bytearray(rec.read_bytes())
    start = offset + 8 + 24 + 200
    blob[start : start + 400] = b"\x00" * 400
    rec.write_bytes(bytes(blob))
    # and one LMDB record's label
    path = out / "lmdb" / "val-00000"
    with lmdb.open(str(path), lock=False) as env, env.begin(write=True) as txn:
        key, value = next(iter(txn.cursor()))
        txn.put(key, value.replace(b"\x28" + bytes([decode_datum(value).label]), b"\x28\x09"))
    bad = run_verify(VerifyConfig(out, workers=1, progress=False))
    text = [str(p) for p in bad.problems]
    assert any("recordio/train-00002.rec" in t and "checksum" in t for t in text)
    assert any("lmdb/val-00000" in t and key.decode() in t and "label 9 outside 0..2" in t for t in text)
    result = CliRunner().invoke(main, ["verify", str(out), "--workers", "1", "--no-progress"])
    assert result.exit_code == 1 and ("problems in" in result.output or "1 problem in" in result.output)


def test_cli_convert_info_and_errors(raw_tree, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(main, ["convert", str(raw_tree), str(out), "--workers", "1", "--no-progress",
                               "--shard-size", "7"])
    assert res.exit_code == 0, res.output
    assert "train 18, val 6 records, 0 skipped" in res.output
    res = runner.invoke(main, ["info", str(out)])
    assert res.exit_code == 0
    assert "classes   3: ant, bee, cat" in res.output and "train     18 records in 3 shards" in res.output
    info = json.loads(runner.invoke(main, ["info", str(out), "--json"]).output)
    assert info["mean"]["channel_order"] == "RGB" and len(info["splits"]["val"]["shards"]) == 1
    res = runner.invoke(main, ["convert", str(raw_tree), str(out), "--quality", "50", "--no-progress"])
    assert res.exit_code == 1 and "--force" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["info", str(tmp_path)])
    assert res.exit_code == 1 and "has no manifest.json" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(main, ["convert", str(empty), str(tmp_path / "o2")])
    assert res.exit_code == 1 and "has no class folders" in res.output


def test_odd_file_names_and_nested_folders(tmp_path):
    """Spaces, unicode, undecodable bytes and subfolders of a class folder all convert."""
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 2})
    cls = raw / "train" / "ant"
    (cls / "sub" / "deeper").mkdir(parents=True)
    src = (cls / "ant_0.jpg").read_bytes()
    (cls / "sub" / "deeper" / "nested.jpg").write_bytes(src)
    (cls / "with space é.JPG").write_bytes(src)
    with open(os.fsencode(cls) + b"/raw\xff\xfebytes.jpg", "wb") as f:
        f.write(src)
    (cls / ".hidden.jpg").write_bytes(src)
    out = tmp_path / "out"
    convert(raw, out)
    names = [k.decode("utf-8", "surrogateescape").split("_", 1)[1]
             for p in load_dataset(out).lmdb_paths("train") for k, _ in lmdb_records(p)]
    assert "ant/sub/deeper/nested.jpg" in names and "ant/with space é.JPG" in names
    assert any(n.startswith("ant/raw") and n.endswith("bytes.jpg") for n in names)
    assert not any("hidden" in n for n in names)
    assert len(names) == 6 + 3
    assert run_verify(VerifyConfig(out, workers=1, progress=False)).ok


def test_parts_split_across_machines_give_the_single_run_output(raw_tree, tmp_path):
    """Two --part runs in separate directories, gathered into one, finish as one run would."""
    import shutil

    convert(raw_tree, tmp_path / "single")
    for i in range(2):
        run_convert(ConvertConfig(src=raw_tree, dst=tmp_path / f"m{i}", formats=("lmdb", "recordio"), shard_size=5,
                                  workers=1, progress=False, part=(i, 2)))
        assert not (tmp_path / f"m{i}" / "manifest.json").exists()
    gathered = tmp_path / "gathered"
    shutil.copytree(tmp_path / "m0", gathered)
    for sub in (".parts", "lmdb", "recordio"):
        shutil.copytree(tmp_path / "m1" / sub, gathered / sub, dirs_exist_ok=True)
    res = CliRunner().invoke(main, ["convert", str(raw_tree), str(gathered), "--format", "both",
                                    "--shard-size", "5", "--workers", "1", "--no-progress"])
    assert res.exit_code == 0 and "(0 images in" in res.output  # nothing left to convert
    assert tree_bytes(gathered) == tree_bytes(tmp_path / "single")
    res = CliRunner().invoke(main, ["convert", str(raw_tree), str(tmp_path / "x"), "--part", "2/2"])
    assert res.exit_code == 2 and "0 <= I < N" in res.output


def test_a_part_that_finishes_while_another_runs_leaves_the_manifest_to_it(raw_tree, tmp_path, monkeypatch):
    """Part 1 runs start to finish while part 0 is mid-way (part 0 already looked at OUT): the
    manifest must still appear, written by part 0, which now finishes last."""
    import alexnet_pipe.convert.job as conv

    out = tmp_path / "shared"
    original = conv.encoded_chunks
    other_done = []

    def interleaved(*args):
        for item in original(*args):
            if not other_done:  # once, in part 0: part 1 (whose own calls come here too) runs whole
                other_done.append(None)
                other_done[0] = run_convert(ConvertConfig(src=raw_tree, dst=out, formats=("lmdb", "recordio"),
                                                          shard_size=5, workers=1, progress=False, part=(1, 2)))
            yield item

    monkeypatch.setattr(conv, "encoded_chunks", interleaved)
    first = run_convert(ConvertConfig(src=raw_tree, dst=out, formats=("lmdb", "recordio"), shard_size=5,
                                      workers=1, progress=False, part=(0, 2)))
    assert other_done[0].remaining_shards > 0  # part 1 ended first and left the manifest to part 0
    assert first.remaining_shards == 0 and (out / "manifest.json").exists()
    monkeypatch.setattr(conv, "encoded_chunks", original)
    convert(raw_tree, tmp_path / "single")
    assert tree_bytes(out) == tree_bytes(tmp_path / "single")


def test_two_concurrent_parts_into_one_directory(raw_tree, tmp_path):
    """Two `--part` processes started together into one directory: one of them writes the manifest."""
    out = tmp_path / "shared"
    cmds = [[sys.executable, "-m", "alexnet_pipe", "convert", str(raw_tree), str(out), "--format", "both",
             "--shard-size", "5", "--workers", "1", "--no-progress", "--part", f"{i}/2"] for i in range(2)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in cmds]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    # The last run to take the lock writes the manifest; if both end after all shards are in, both
    # do, one after the other, with the same bytes.
    assert sum("wrote" in o for o, _ in outputs) >= 1
    convert(raw_tree, tmp_path / "single")
    assert tree_bytes(out) == tree_bytes(tmp_path / "single")


def test_a_second_convert_into_the_same_output_is_refused_while_one_runs(raw_tree, tmp_path):
    import fcntl
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".convert.lock", "a+b") as held:  # as a running convert holds it
        fcntl.lockf(held, fcntl.LOCK_EX)
        res = subprocess.run([sys.executable, "-m", "alexnet_pipe", "convert", str(raw_tree), str(out),
                              "--no-progress", "--workers", "1"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 1
        assert "another alexnet-pipe convert is writing" in res.stderr and "Traceback" not in res.stderr
        assert not (out / "manifest.json").exists() and not (out / ".convert.json").exists()
    res = subprocess.run([sys.executable, "-m", "alexnet_pipe", "convert", str(raw_tree), str(out),
                          "--no-progress", "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr  # the lock went with its holder
    assert (out / "manifest.json").exists()
