"""Damaged records are named (verify), refused (train) and repaired byte-identical (--repair).

Every case damages the files of a real converted dataset (LMDB + RecordIO) the way a disk
does: a byte flipped inside a JPEG's entropy-coded data (the JPEG still decodes), an LMDB page
overwritten, a .rec cut short, a .idx deleted. Repairs are compared file by file with a clean run.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lmdb
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from alexnet_pipe.cli import main
from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.dataset.records import RecordReader, record_table
from alexnet_pipe.formats.datum import decode_datum
from alexnet_pipe.formats.recordio import iter_records, unpack_payload
from alexnet_pipe.loading.epoch_source import EpochSource
from alexnet_pipe.loading.order import OrderConfig
from tests.helpers.images import make_tree, smooth_image, write_jpeg

REPO = Path(__file__).resolve().parents[2]
PAGE = 4096
CONVERT = ["--format", "both", "--short-side", "72", "--shard-size", "5", "--workers", "1", "--no-progress"]


def convert(raw: Path, out: Path) -> None:
    """The conversion of CONVERT's options: 3 classes x (6 train + 2 val) -> train 4 shards, val 2."""
    run_convert(ConvertConfig(src=raw, dst=out, formats=("lmdb", "recordio"), image=ImageSettings(short_side=72),
                              shard_size=5, workers=1, progress=False))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("repair")
    make_tree(base / "raw", {"train": 6, "val": 2})
    convert(base / "raw", base / "data")
    return base / "data"


@pytest.fixture
def data(pristine, tmp_path) -> Path:
    """A copy of the clean conversion to damage (it records the same raw inputs)."""
    return Path(shutil.copytree(pristine, tmp_path / "data", symlinks=True))


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path: two runs are identical when these are equal."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def flip_jpeg_byte(path: Path, nth: int) -> None:
    """Flip the low bit of one byte in the middle of the entropy-coded data of the ``nth`` JPEG
    stored in ``path`` (chosen so that no marker is made or broken: the JPEG still decodes)."""
    data = bytearray(path.read_bytes())
    start = -1
    for _ in range(nth + 1):
        start = data.index(b"\xff\xd8\xff", start + 1)
    sos = data.index(b"\xff\xda", start)
    scan = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    pos = (scan + data.index(b"\xff\xd9", scan)) // 2
    while data[pos] in (0x00, 0xFE, 0xFF) or data[pos - 1] == 0xFF:
        pos += 1
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


def changed_lmdb_keys(clean: Path, damaged: Path) -> list[str]:
    """Keys whose values differ between two LMDB shards (the damage kept the B-tree intact)."""
    def values(path: Path) -> dict[bytes, bytes]:
        with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
            return dict(txn.cursor())

    a, b = values(clean), values(damaged)
    assert a.keys() == b.keys()
    return [k.decode() for k in a if a[k] != b[k]]


def changed_rec_keys(clean: Path, damaged: Path) -> list[str]:
    a, b = list(iter_records(clean)), list(iter_records(damaged))
    assert len(a) == len(b)
    return [str(unpack_payload(x[1])[0].id) for x, y in zip(a, b) if x != y]


def cli(*args: str) -> tuple[int, str, str]:
    """The CLI through click in this process: (exit code, stdout, stderr); a crash fails the test."""
    res = CliRunner().invoke(main, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def problems(stderr: str) -> list[str]:
    return sorted(line for line in stderr.splitlines() if line.startswith("PROBLEM "))


# ---------------------------------------------------------------- naming the damaged record


def test_verify_names_each_damaged_record_in_lmdb_and_recordio(data, pristine):
    flip_jpeg_byte(data / "lmdb/train-00001/data.mdb", 1)
    flip_jpeg_byte(data / "recordio/val-00000.rec", 2)
    [lmdb_key] = changed_lmdb_keys(pristine / "lmdb/train-00001", data / "lmdb/train-00001")
    [rec_key] = changed_rec_keys(pristine / "recordio/val-00000.rec", data / "recordio/val-00000.rec")
    with lmdb.open(str(data / "lmdb/train-00001"), readonly=True, lock=False) as env, env.begin() as txn:
        Image.open(io.BytesIO(decode_datum(txn.get(lmdb_key.encode())).data)).load()  # still decodes
    advice = f"the record's bytes differ from the checksum convert recorded for it (damaged on disk); run " \
             f"alexnet-pipe verify {data} --repair"
    for extra in ([], ["--quick"]):
        code, _, err = cli("verify", str(data), "--no-progress", *extra)
        assert code == 1 and "Traceback" not in err
        assert problems(err) == [f"PROBLEM lmdb/train-00001 key {lmdb_key}: {advice}",
                                 f"PROBLEM recordio/val-00000.rec key {rec_key}: {advice}"], err


def test_a_damaged_checksum_file_is_named_not_the_records(data):
    flip_jpeg_byte(data / "lmdb/train-00000/data.mdb", 0)  # one real damage beside it
    crc = data / ".parts/train-00003.lmdb.crc"
    raw = bytearray(crc.read_bytes())
    raw[-1] ^= 0xFF
    crc.write_bytes(bytes(raw))
    code, _, err = cli("verify", str(data), "--no-progress", "--quick")
    assert code == 1
    lines = problems(err)
    assert len(lines) == 2 and lines[0].startswith("PROBLEM .parts/train-00003.lmdb.crc: does not match the records "
                                                   "of lmdb/train-00003 (whose checksum does)")
    assert lines[1].startswith("PROBLEM lmdb/train-00000 key ")


# ---------------------------------------------------------------- training refuses it


def test_train_refuses_a_damaged_record_with_one_line(data, pristine, tmp_path):
    flip_jpeg_byte(data / "lmdb/train-00001/data.mdb", 0)
    flip_jpeg_byte(data / "recordio/train-00002.rec", 3)
    [lmdb_key] = changed_lmdb_keys(pristine / "lmdb/train-00001", data / "lmdb/train-00001")
    [rec_key] = changed_rec_keys(pristine / "recordio/train-00002.rec", data / "recordio/train-00002.rec")
    common = ["train", "-w", str(data), "-b", "cpu", "--crop", "67", "-z", "4", "-e", "1", "--data-threads", "1",
              "--no_progress_bar"]
    tail = f"the record's bytes differ from the checksum convert recorded (damaged on disk), so it is not used; " \
           f"run alexnet-pipe verify {data} --repair"
    # LMDB, read in the training process (the command line through click, in this process).
    code, _, err = cli(*common, "--reader", "lmdb", "-s", str(tmp_path / "a.pt"))
    assert code == 1 and "Traceback" not in err, err
    assert err.splitlines()[-1] == f"Error: train shard lmdb/train-00001 key {lmdb_key}: {tail}"
    # RecordIO, read in a DALI reader process (--read-workers 1) that passes the error on: the real
    # command line in a process of its own.
    res = subprocess.run([sys.executable, "-m", "alexnet_pipe", *common, "--reader", "recordio", "--read-workers", "1",
                          "-s", str(tmp_path / "b.pt")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines()[-1] == f"Error: train shard recordio/train-00002.rec key {rec_key}: {tail}"


def test_record_sums_are_read_per_shard_on_first_use_and_never_pickled(data):
    table = record_table(load_dataset(data), "train", "lmdb")
    source = EpochSource(table, OrderConfig(len(table), True, 0, 0, 1, 100.0), 4, 0)
    source(type("Info", (), {"epoch_idx": 0, "iteration": 0})())  # one batch: 4 records
    cached = source._reader._sums
    shards_read = {int(table.shard[i]) for i in source.share(0).indices[:4]}
    assert set(cached) == shards_read and len(shards_read) < len(table.paths)
    counts = [s["records"] for s in load_dataset(data).shards("train")]
    assert all(isinstance(cached[k], np.ndarray) and len(cached[k]) == counts[k] for k in shards_read)
    assert pickle.loads(pickle.dumps(source))._reader is None
    source.close()


# ---------------------------------------------------------------- repair


def test_verify_repair_rewrites_each_damaged_shard_byte_identical(data, pristine):
    flip_jpeg_byte(data / "lmdb/train-00000/data.mdb", 2)  # a JPEG byte
    mdb = data / "lmdb/train-00002/data.mdb"  # a page overwritten: LMDB says MDB_CORRUPTED
    with open(mdb, "r+b") as f:
        f.seek(2 * PAGE)
        f.write(b"\xa5" * PAGE)
    reader = ("import lmdb, sys\nenv = lmdb.open(sys.argv[1], readonly=True, lock=False)\n"
              "with env.begin() as txn:\n    print(sum(len(v) for _, v in txn.cursor()))\n")
    plain = subprocess.run([sys.executable, "-c", reader, str(mdb.parent)], capture_output=True, text=True, timeout=60)
    assert "lmdb.CorruptedError" in plain.stderr
    rec = data / "recordio/train-00001.rec"  # cut short
    os.truncate(rec, rec.stat().st_size - 100)
    (data / "recordio/val-00001.idx").unlink()
    flip_jpeg_byte(data / "recordio/val-00000.rec", 1)
    crc = data / ".parts/train-00003.recordio.crc"  # a damaged checksum file of an intact shard
    crc.write_bytes(crc.read_bytes()[:-4])
    combined = data / "recordio/train.idx"  # the files convert writes last, from the completion records
    combined.write_bytes(combined.read_bytes()[:-3])
    (data / "mean.json").write_text((data / "mean.json").read_text().replace('"mean": [', '"mean": [1'))
    assert cli("verify", str(data), "--no-progress", "--quick")[0] == 1

    code, out, err = cli("verify", str(data), "--no-progress", "--repair")
    assert code == 0, err
    repaired = [line for line in out.splitlines() if line.startswith("REPAIRED ")]
    assert [line.split(":")[0] for line in repaired] == [
        "REPAIRED train-00000", "REPAIRED train-00001", "REPAIRED train-00002", "REPAIRED val-00000",
        "REPAIRED val-00001", "REPAIRED mean.json", "REPAIRED recordio/train.idx"]
    assert "key " in repaired[0] and "is " in repaired[1] and "MDB_CORRUPTED" in repaired[2]
    assert "recordio/val-00001.idx missing" in repaired[4]
    assert "per-record checksums for 1 intact shard" in out and "ok: 24 images" in out
    assert files(data) == files(pristine)


def test_convert_repair_rewrites_what_a_plain_rerun_leaves(data, pristine):
    raw = pristine.parent / "raw"
    flip_jpeg_byte(data / "recordio/train-00003.rec", 0)
    damaged = files(data)
    code, _, _ = cli("convert", str(raw), str(data), *CONVERT)
    assert code == 0 and files(data) == damaged  # the rerun finds every shard complete
    code, out, err = cli("convert", str(raw), str(data), *CONVERT, "--repair")
    assert code == 0, err
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("REPAIRED")] == ["REPAIRED train-00003"]
    assert files(data) == files(pristine)
    code, out, _ = cli("convert", str(raw), str(data), *CONVERT, "--repair")
    assert code == 0 and "nothing to repair" in out and files(data) == files(pristine)
    new = data.parent / "new"
    code, _, err = cli("convert", str(raw), str(new), *CONVERT, "--repair")
    assert code == 1 and "holds no conversion to repair" in err and not new.exists()
    code, _, err = cli("convert", str(raw), str(data), *CONVERT, "--repair", "--shard-size", "4")
    assert code == 1 and "shard_size: 5 -> 4" in err and "nothing was changed" in err
    assert files(data) == files(pristine)


def test_repair_changes_nothing_when_the_raw_inputs_are_gone_or_changed(pristine, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "data"
    shutil.copytree(pristine.parent / "raw", raw)
    convert(raw, out)
    flip_jpeg_byte(out / "lmdb/train-00001/data.mdb", 0)
    before = files(out)

    def refused(*needles: str) -> None:
        code, _, err = cli("verify", str(out), "--no-progress", "--repair")
        assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert all(n in err for n in needles), err
        assert files(out) == before

    raw.rename(tmp_path / "moved")
    refused(f"the raw inputs of {out} were in {raw}, which is gone; nothing was changed")
    (tmp_path / "moved").rename(raw)
    one = raw / "train/bee/bee_0.jpg"
    kept = one.read_bytes()
    one.unlink()
    refused("the input files or their labels changed", "nothing was changed")
    # Same names, other pixels, in the damaged shard: only the rewritten shard can tell.
    with lmdb.open(str(out / "lmdb/train-00001"), readonly=True, lock=False) as env, env.begin() as txn:
        name = next(iter(txn.cursor()))[0].decode().split("_", 1)[1]
    one.write_bytes(kept)
    write_jpeg(raw / "train" / name, smooth_image(999, *Image.open(raw / "train" / name).size))
    refused("train-00001 was not rewritten: its raw inputs changed", "left as it is")


def test_a_dataset_without_per_record_sums_still_verifies_and_repair_adds_them(data, pristine):
    # What convert wrote before per-record sums: no .crc files, no record_sums, no inputs record.
    for crc in (data / ".parts").glob("*.crc"):
        crc.unlink()
    for path in (data / ".parts").glob("*.json"):
        part = json.loads(path.read_text())
        part.pop("record_sums", None)
        path.write_text(json.dumps(part, indent=1) + "\n")
    (data / ".convert-inputs.json").unlink()
    code, out, err = cli("verify", str(data), "--no-progress")
    assert code == 0 and err == "" and "ok: 24 images" in out

    flip_jpeg_byte(data / "lmdb/train-00001/data.mdb", 0)
    table = record_table(load_dataset(data), "train", "lmdb")
    reader = RecordReader(table)
    assert len([reader.read(i) for i in range(len(table))]) == 18  # nothing to check records against
    reader.close()
    code, _, err = cli("verify", str(data), "--no-progress")
    assert code == 1
    assert problems(err) == ["PROBLEM lmdb/train-00001: checksum differs from the manifest (records changed or lost)"]
    assert f"NOTE {data} has no per-record checksums" in err and "rerun with --repair" in err
    before = files(data)
    code, _, err = cli("verify", str(data), "--no-progress", "--repair")
    assert code == 1 and "does not record where its raw inputs are" in err and files(data) == before

    code, out, err = cli("convert", str(pristine.parent / "raw"), str(data), *CONVERT, "--repair")
    assert code == 0, err
    assert "REPAIRED train-00001: rewritten from the raw inputs (lmdb/train-00001: checksum differs" in out
    assert "per-record checksums for 5 intact shards" in out
    assert files(data) == files(pristine)


# ---------------------------------------------------------------- seeded fuzz: every damage repaired


REPAIR_FULL = {"data.mdb": 60, ".rec": 40, ".idx": 30, ".crc": 30, "combined .idx": 10, "manifest.json": 15,
               "mean.json": 15}
REPAIR_QUICK = {"data.mdb": 1, ".rec": 1}


@pytest.fixture(scope="module")
def fuzz_pristine(tmp_path_factory) -> Path:
    """verify's fuzz dataset (values inside LMDB leaf pages and on overflow pages), with its raw inputs."""
    base = tmp_path_factory.mktemp("repair-fuzz")
    make_tree(base / "raw", {"train": 4, "val": 2}, sizes=((40, 30), (160, 120), (30, 40)))
    run_convert(ConvertConfig(src=base / "raw", dst=base / "data", formats=("lmdb", "recordio"),
                              image=ImageSettings(short_side=0), shard_size=4, workers=1, progress=False))
    return base / "data"


def run_repair_mutant(pristine: Path, work: Path, seed: int, kind: str, clean: dict[str, bytes],
                      expected: str) -> tuple[str, str]:
    """(verdict, detail) of ``verify --repair`` over one seeded mutant, in a process of its own.

    Verdicts: "repaired" (every file equals a clean run's), "benign" (verify passed the mutant as
    it was: only bytes no reader uses changed, and readers get the original data), "unchanged"
    (the mutation changed nothing); failures: "crash", "unrepaired", "lost"."""
    from tests.helpers.mutation import mutant, mutation_targets, snapshot_in_child

    crcs = sorted(p.relative_to(pristine) for p in pristine.glob(".parts/*.crc"))
    targets = {**mutation_targets(pristine), ".crc": crcs}
    root = work / f"r{seed}"
    with mutant(pristine, root, targets, kind, random.Random(seed)) as (target, what, changed):
        if not changed:
            return "unchanged", what
        res = subprocess.run([sys.executable, "-m", "alexnet_pipe", "verify", str(root), "--repair", "--no-progress",
                              "--workers", "1"], capture_output=True, text=True, timeout=300, cwd=REPO)
        where = f"{target}, {what}: rc {res.returncode}: {(res.stdout + res.stderr)[-1500:]}"
        if res.returncode not in (0, 1) or "Traceback" in res.stdout + res.stderr:
            return "crash", where
        if res.returncode == 1:
            return "unrepaired", where
        now = files(root)
        if now == clean:
            return "repaired", what
        differ = {k for k in now.keys() | clean.keys() if now.get(k) != clean.get(k)}
        if differ == {str(target)} and snapshot_in_child(root) == expected and "REPAIRED" not in res.stdout:
            return "benign", f"{target}: {what}"
        return "lost", f"{where}; files differ: {sorted(differ)}"


def run_repair_fuzz(pristine: Path, work: Path, plan: dict[str, int], first_seed: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from tests.helpers.mutation import snapshot_in_child

    clean, expected = files(pristine), snapshot_in_child(pristine)
    jobs = [(first_seed + k, kind) for k, kind in enumerate(k for k, n in plan.items() for _ in range(n))]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda job: (job[1], *run_repair_mutant(pristine, work, job[0], job[1], clean,
                                                                        expected)), jobs))
    report = {"mutants": sum(v != "unchanged" for _, v, _ in results),
              "by_kind": {kind: dict(Counter(v for k, v, _ in results if k == kind)) for kind in plan},
              "benign": [d for _, v, d in results if v == "benign"],
              "failures": [(k, v, d) for k, v, d in results if v in ("crash", "unrepaired", "lost")]}
    print("\nrepair fuzz:", json.dumps(report, indent=1))
    return report


def test_repair_fuzz_quick(fuzz_pristine, tmp_path):
    """A few seeded mutants (the fast subset of the fault suite below)."""
    report = run_repair_fuzz(fuzz_pristine, tmp_path, REPAIR_QUICK, first_seed=700_000)
    assert report["failures"] == [] and report["mutants"] >= 2


@pytest.mark.faults
def test_repair_fuzz_full(fuzz_pristine, tmp_path):
    """200 seeded mutants of the shard, index, checksum, manifest and mean files: `verify --repair`
    never crashes, and leaves every file byte-identical to a clean run, or (bytes no reader uses)
    readers get exactly the original data."""
    report = run_repair_fuzz(fuzz_pristine, tmp_path, REPAIR_FULL, first_seed=1)
    assert report["failures"] == [], json.dumps(report["failures"], indent=1)[:6000]
    assert report["mutants"] >= 180
