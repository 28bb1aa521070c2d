"""verify and the dataset parsers report damaged or hostile datasets, one line a problem; they never
crash (issue 7, section 6). Each case is crafted on a real converted dataset and run through the CLI
in its own process: exit status 1, a PROBLEM line (or one Error line), never a traceback.

The seeded mutation fuzz of every dataset file is in the fault suite (``make faults``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb
import pytest
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.config import ConvertConfig, ImageSettings, VerifyConfig
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.convert.verify import run_verify
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.dataset.mean import load_dataset_mean
from alexnet_pipe.dataset.records import record_table
from alexnet_pipe.errors import DatasetError, FormatError
from alexnet_pipe.formats.recordio import parse_index
from tests.helpers.images import make_tree

REPO = Path(__file__).resolve().parents[2]
PAGE = 4096


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """3 classes x (6 train + 2 val) images in LMDB and RecordIO shards of 5 (4 train, 2 val shards)."""
    base = tmp_path_factory.mktemp("pristine")
    make_tree(base / "raw", {"train": 6, "val": 2})
    out = base / "data"
    run_convert(ConvertConfig(src=base / "raw", dst=out, formats=("lmdb", "recordio"),
                              image=ImageSettings(short_side=64), shard_size=5, workers=1, progress=False))
    return out


@pytest.fixture
def data(pristine, tmp_path) -> Path:
    """A fresh copy of the converted dataset to damage."""
    dst = tmp_path / "data"
    shutil.copytree(pristine, dst, symlinks=True)
    return dst


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real CLI in its own process (a signal there would show as a negative return code)."""
    return subprocess.run([sys.executable, "-m", "alexnet_pipe", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def verify_cli(root: Path, *extra: str, process: bool = False) -> Run:
    """``alexnet-pipe verify ROOT``: in its own process, or (faster) through click in this one.
    Either way every shard is read in verify's own checker processes."""
    if process:
        res = cli("verify", str(root), "--no-progress", *extra)
        return Run(res.returncode, res.stdout, res.stderr)
    res = CliRunner().invoke(main, ["verify", str(root), "--no-progress", *extra])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # a crash: show its traceback
    return Run(res.exit_code, res.stdout, res.stderr)



def assert_reported(res: Run, *needles: str) -> list[str]:
    """Exit 1, nothing but PROBLEM/NOTE/Error lines, and each needle in some PROBLEM or Error line."""
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    lines = res.stderr.splitlines()
    assert lines and all(line.startswith(("PROBLEM ", "NOTE ", "Error: ")) for line in lines), res.stderr
    for needle in needles:
        assert any(needle in line for line in lines if not line.startswith("NOTE ")), (needle, res.stderr)
    return lines


def set_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


# ---------------------------------------------------------------- LMDB: death by signal


def truncate_mid_data(shard: Path) -> None:
    """Cut data.mdb to half its pages: LMDB maps the stored size, so a page past the end is SIGBUS."""
    mdb = shard / "data.mdb"
    pages = mdb.stat().st_size // PAGE
    os.truncate(mdb, max(2, pages // 2) * PAGE)


def test_truncated_lmdb_kills_a_plain_reader_with_sigbus_and_verify_reports_it(data):
    shard = data / "lmdb" / "train-00001"
    truncate_mid_data(shard)
    # The premise: reading that shard with no protection is a death by SIGBUS (what verify did).
    reader = ("import lmdb, sys\n"
              "env = lmdb.open(sys.argv[1], readonly=True, lock=False)\n"
              "with env.begin() as txn:\n"
              "    print(sum(len(v) for _, v in txn.cursor()))\n")
    plain = subprocess.run([sys.executable, "-c", reader, str(shard)], capture_output=True, timeout=60)
    assert plain.returncode == -signal.SIGBUS
    # Another shard has a wrong label: verify must go on past the dead checker and find it too.
    with lmdb.open(str(data / "lmdb" / "val-00000"), lock=False) as env, env.begin(write=True) as txn:
        key, value = next(iter(txn.cursor()))
        label_at = value.rindex(b"\x28")  # field 5 (label), a varint; field 7 follows
        txn.put(key, value[: label_at + 1] + b"\x09" + value[label_at + 2 :])
    for workers in ("1", "2"):
        res = verify_cli(data, "--workers", workers, process=True)
        lines = assert_reported(res,
                                "lmdb/train-00001: the checker died (killed by signal SIGBUS) while reading it: "
                                "the shard is corrupt",
                                f"delete {shard} and rerun the alexnet-pipe convert command",
                                "lmdb/val-00000 key", "label 9 outside 0..2")
        assert sum("the checker died" in line for line in lines) == 1
    result = run_verify(VerifyConfig(data, workers=2, progress=False))
    # all 12 shards checked; the dead one's records are not counted
    assert result.shards == 12 and result.records == 48 - 5


def test_a_checker_stuck_in_a_shard_is_stopped_and_reported(data):
    """A FIFO in place of a .rec file: opening it blocks forever, as a loop in corrupt data would."""
    rec = data / "recordio" / "val-00001.rec"
    rec.unlink()
    os.mkfifo(rec)
    result = run_verify(VerifyConfig(data, workers=2, progress=False), stall_seconds=2)
    text = [str(p) for p in result.problems]
    assert any(t.startswith("recordio/val-00001.rec: the checker made no progress for 2 s") for t in text), text
    assert result.shards == 12


def test_fifos_in_place_of_files_the_parent_reads_do_not_block(data):
    for rel in ("mean.json", "recordio/train.idx"):
        (data / rel).unlink()
        os.mkfifo(data / rel)
    assert_reported(verify_cli(data, "--quick"), "mean.json: cannot read", "not a regular file", "recordio/train.idx")


def test_many_shards_and_deaths_with_a_pool(tmp_path):
    """Deaths in a pool of checkers cost only their own shard: every other shard is checked."""
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 10}, sizes=((40, 30),))
    out = tmp_path / "data"
    run_convert(ConvertConfig(src=raw, dst=out, formats=("lmdb",), image=ImageSettings(short_side=32),
                              shard_size=1, workers=1, progress=False))
    shards = load_dataset(out).lmdb_paths("train")
    assert len(shards) == 30
    broken = shards[3::7]
    for path in broken:
        truncate_mid_data(path)
    res = verify_cli(out, "--workers", "2", "--quick", process=True)
    lines = assert_reported(res)
    dead = sorted(line.split(":")[0].removeprefix("PROBLEM ") for line in lines if "the checker died" in line)
    assert dead == sorted(f"lmdb/{p.name}" for p in broken)


# ---------------------------------------------------------------- RecordIO index


IDX_CASES = {
    "non-ASCII byte": (lambda t: t.replace(b"\t", b"\t\xe9", 1), "byte 0xe9"),
    "non-integer field": (lambda t: t.replace(b"\t", b"\tx", 1), "byte 0x78 'x'"),
    "a third column": (lambda t: t.replace(b"\n", b"\t7\n", 1), "expected 'key<TAB>offset', got 3 fields"),
    "one column": (lambda t: t.split(b"\t", 1)[0] + b"\n" + t.split(b"\n", 1)[1], "got 1 fields"),
    "negative offset": (lambda t: t.replace(b"\t0\n", b"\t-0\n", 1), "byte 0x2d '-'"),
    "offset past the end": (lambda t: t.rstrip(b"\n").rsplit(b"\t", 1)[0] + b"\t99999999\n",
                            "past the end of the data"),
    "duplicated key": (lambda t: t + t.split(b"\t", 1)[0] + b"\t%d\n" % (int(t.split()[-1]) + 1), "appears twice"),
    "offsets out of order": (lambda t: b"".join(reversed(t.splitlines(keepends=True))), "offsets must increase"),
    "huge number": (lambda t: t.replace(b"\t0\n", b"\t" + b"9" * 40 + b"\n", 1), "number too large"),
}


@pytest.mark.parametrize("case", sorted(IDX_CASES))
def test_a_tampered_shard_index_is_a_problem_of_that_shard(data, case):
    edit, needle = IDX_CASES[case]
    idx = data / "recordio" / "train-00002.idx"
    idx.write_bytes(edit(idx.read_bytes()))
    res = verify_cli(data, "--workers", "1", "--quick")
    lines = assert_reported(res, "recordio/train-00002.idx", needle)
    assert len([line for line in lines if "train-00002.idx" in line and needle in line]) >= 1
    # Training reads the same index: one clear error, not a numpy or Python exception.
    with pytest.raises(DatasetError, match=r"train-00002\.idx.*run alexnet-pipe verify"):
        record_table(load_dataset(data), "train", "recordio")


def test_a_tampered_combined_index_is_reported(data):
    idx = data / "recordio" / "train.idx"
    idx.write_bytes(idx.read_bytes() + b"12\t\xff\n")
    assert_reported(verify_cli(data, "--workers", "1", "--quick"), "recordio/train.idx", "byte 0xff")


def test_the_index_parser_accepts_what_writers_write():
    assert parse_index(b"", "x").shape == (0, 2)
    assert parse_index(b"3\t0\n1\t40\n2\t80", "x").tolist() == [[3, 0], [1, 40], [2, 80]]  # no final newline
    assert parse_index(b"3 0\r\n1 40\r\n", "x", 41).tolist() == [[3, 0], [1, 40]]
    with pytest.raises(FormatError, match=r"x:2: offset 40 is past the end of the data \(40 bytes\)"):
        parse_index(b"3\t0\n1\t40\n", "x", 40)


# ---------------------------------------------------------------- mean.json


MEAN_CASES = {
    "NaN": ("mean", '[NaN, 120.0, 110.0]', "mean[0] is nan"),
    "Infinity": ("mean", '[120.0, Infinity, 110.0]', "mean[1] is inf"),
    "minus infinity in std": ("std", '[1.0, 2.0, -Infinity]', "std[2] is -inf"),
    "a boolean": ("mean", '[true, 120.0, 110.0]', "mean[0] is True"),
    "two channels": ("mean", '[120.0, 110.0]', "expected one value per channel"),
    "four channels": ("std", '[1, 2, 3, 4]', "expected one value per channel"),
    "a string": ("mean", '"120 110 100"', "expected one value per channel"),
    "a string value": ("mean", '[120.0, "110", 100.0]', "mean[1] is '110'"),
    "out of range": ("mean", '[120.0, 1e300, 100.0]', "expected a finite number in 0..255"),
    "negative": ("std", '[-1.0, 2.0, 3.0]', "std[0] is -1.0"),
    "images a float": ("images", "18.0", "images is 18.0"),
}


@pytest.mark.parametrize("case", sorted(MEAN_CASES))
def test_a_bad_mean_json_fails_verify_and_is_refused_by_readers(data, case):
    key, text, needle = MEAN_CASES[case]
    path = data / "mean.json"
    obj = json.loads(path.read_text())
    obj[key] = "@@"
    path.write_text(json.dumps(obj).replace('"@@"', text))
    assert_reported(verify_cli(data, "--workers", "1", "--quick"), "mean.json", needle)
    with pytest.raises(DatasetError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        load_dataset_mean(data)  # what training and inspect call


def test_a_bad_mean_json_stops_training_with_one_line(data):
    set_json(data / "mean.json", lambda m: m["mean"].__setitem__(0, float("nan")))  # json writes NaN
    res = CliRunner().invoke(main, ["train", "-w", str(data), "-b", "cpu", "--crop", "67", "--no_progress_bar"])
    assert res.exit_code == 1 and "mean.json: mean[0] is nan" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_an_edited_mean_value_disagrees_with_the_recorded_pixel_sums(data):
    set_json(data / "mean.json", lambda m: m["mean"].__setitem__(1, m["mean"][1] + 0.5))
    assert_reported(verify_cli(data, "--workers", "1", "--quick"), "mean.json",
                    "is not what the pixel sums convert recorded")
    set_json(data / "mean.json", lambda m: m["mean"].__setitem__(1, m["mean"][1] - 0.5))
    ok = verify_cli(data, "--workers", "1", "--quick")
    assert ok.returncode == 0, ok.stderr
    set_json(data / "mean.json", lambda m: m.__setitem__("images", m["images"] + 1))
    assert_reported(verify_cli(data, "--workers", "1", "--quick"),
                    "says it averages 19 images, the train split holds 18 records")


# ---------------------------------------------------------------- manifest


def test_edited_class_counts_fail_verify(data):
    set_json(data / "manifest.json", lambda m: m["splits"]["train"].__setitem__("class_counts", [7, 5, 6]))
    assert_reported(verify_cli(data, "--workers", "1", "--quick"),
                    "manifest train: class_counts do not match the labels read from the lmdb shards",
                    "class 0: 7 stated, 6 read", "class 1: 5 stated, 6 read",
                    "class_counts do not match the labels read from the recordio shards")
    # A count that no longer sums to the split's records is refused at load, for every reader.
    set_json(data / "manifest.json", lambda m: m["splits"]["val"].__setitem__("class_counts", [2, 2, 3]))
    assert_reported(verify_cli(data, "--quick"), "splits.val.class_counts sum to 7, the split says 6 records")
    with pytest.raises(DatasetError, match="class_counts sum to 7"):
        load_dataset(data)


def test_edited_short_side_counts_and_unknown_fields_fail_verify(data):
    set_json(data / "manifest.json", lambda m: m["splits"]["val"].__setitem__("short_side_counts", {"63": 6}))
    assert_reported(verify_cli(data, "--quick"), "manifest val: short_side_counts {'63': 6} do not match the images "
                                                 "in the lmdb shards ({'64': 6})")
    set_json(data / "manifest.json", lambda m: m["splits"]["val"].__setitem__("short_side_counts", {"64": 6}))
    set_json(data / "manifest.json", lambda m: m["splits"]["val"].__setitem__("min_short_side", 60))
    assert_reported(verify_cli(data, "--quick"),
                    "min_short_side is 60, the smallest image in the recordio shards is 64")
    set_json(data / "manifest.json", lambda m: m["splits"]["val"].__setitem__("min_short_side", 64))
    assert verify_cli(data, "--quick").returncode == 0
    # A field renamed (readers would take it as absent, as in older datasets) is a problem.
    set_json(data / "manifest.json", lambda m: m["splits"]["val"].__setitem__(
        "short_sade_counts", m["splits"]["val"].pop("short_side_counts")))
    assert_reported(verify_cli(data, "--quick"),
                    "has fields this alexnet-pipe never writes ('splits.val.short_sade_counts')")


def test_a_missing_or_wrong_mean_image_fails_verify(data):
    import numpy as np

    np.save(data / "mean_image.npy", np.zeros((8, 8, 3), np.float32))
    assert_reported(verify_cli(data, "--quick"), "mean_image.npy: holds float32 (8, 8, 3)",
                    "expected float32 (64, 64, 3)")
    (data / "mean_image.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': 'x")
    assert_reported(verify_cli(data, "--quick"), "mean_image.npy: is not a readable .npy")
    (data / "mean.binaryproto").unlink()
    assert_reported(verify_cli(data, "--quick"), "mean.binaryproto: is missing")


def _set_shard(key: str, field: str, value):
    return lambda m: m["splits"]["train"]["shards"][1][key].__setitem__(field, value)


@pytest.mark.parametrize("case, edit, needle", [
    ("absolute", _set_shard("lmdb", "path", "/etc"), "'/etc': shard paths must be relative"),
    ("dotdot", _set_shard("recordio", "rec", "recordio/../../outside.rec"), "without '..'"),
    ("dotdot index", lambda m: m["splits"]["val"].__setitem__("recordio_index", "../val.idx"), "without '..'"),
    ("same shard twice", _set_shard("lmdb", "path", "lmdb/train-00000"), "the same file as splits.train.shards[0]"),
    ("mean image", lambda m: m["mean_image"].__setitem__("npy", "/tmp/x.npy"), "mean_image.npy is '/tmp/x.npy'"),
])
def test_manifest_paths_outside_the_dataset_are_refused(data, case, edit, needle):
    set_json(data / "manifest.json", edit)
    with pytest.raises(DatasetError, match="refusing|must be relative|the same file"):
        load_dataset(data)  # training and every other reader load through this
    lines = assert_reported(verify_cli(data, "--workers", "1", "--quick"), needle)
    assert len(lines) == 1


def test_symlinks_leading_out_of_the_dataset_are_refused(data, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shard = data / "lmdb" / "train-00002"
    shutil.move(shard, outside / "train-00002")
    shard.symlink_to(outside / "train-00002")
    assert_reported(verify_cli(data, "--quick"), "splits.train.shards[2].lmdb.path is 'lmdb/train-00002', which leads "
                                                 f"outside {data} (to {outside / 'train-00002'})")
    # data.mdb alone linked out
    shard.unlink()
    shard.mkdir()
    (shard / "data.mdb").symlink_to(outside / "train-00002" / "data.mdb")
    with pytest.raises(DatasetError, match="leads outside"):
        load_dataset(data)
    # a symlink that stays inside the dataset is fine
    (shard / "data.mdb").unlink()
    shutil.move(outside / "train-00002" / "data.mdb", data / "moved.mdb")
    (shard / "data.mdb").symlink_to(data / "moved.mdb")
    assert verify_cli(data, "--quick").returncode == 0


@pytest.mark.parametrize("case, edit, needle", [
    ("records a string", lambda m: m["splits"]["train"]["shards"][0].__setitem__("records", "5"), "records is \"5\""),
    ("records a boolean", lambda m: m["splits"]["val"].__setitem__("records", True), "records is true"),
    ("records negative", lambda m: m["splits"]["val"]["shards"][0].__setitem__("records", -1),
     "expected an integer >= 0"),
    ("no shards", lambda m: m["splits"]["train"].pop("shards"), "shards is null, expected a list"),
    ("formats", lambda m: m["settings"].__setitem__("formats", ["lmdb", "zip"]), "settings.formats"),
    ("checksum", _set_shard("lmdb", "checksum", "md5:00"), "expected 'sha256:' and 64 hex digits"),
    ("classes", lambda m: m["classes"].__setitem__(1, "bee"), "classes[1] is \"bee\", expected an object"),
    ("a list", lambda m: m.clear(), "is not an alexnet-pipe manifest"),
    ("split records", lambda m: m["splits"]["train"].__setitem__("records", 17), "the split says 17 records"),
])
def test_a_damaged_manifest_is_one_line(data, case, edit, needle):
    path = data / "manifest.json"
    set_json(path, edit)
    lines = assert_reported(verify_cli(data, "--quick"), needle)
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    res = CliRunner().invoke(main, ["info", str(data)])
    assert res.exit_code == 1 and needle in res.output and "Traceback" not in res.output


def test_unparsable_json_is_one_line(data):
    (data / "mean.json").write_text("[" * 100_000)  # deeper than Python's JSON parser can go
    assert_reported(verify_cli(data, "--quick"), "mean.json", "cannot read")
    (data / "manifest.json").write_text("[" * 100_000)
    assert_reported(verify_cli(data, "--quick"), "cannot read", "manifest.json")
    (data / "manifest.json").write_bytes(b"\xff\xfe{}")
    assert_reported(verify_cli(data, "--quick"), "cannot read")


def test_a_checker_exception_is_a_problem_of_its_shard(data, monkeypatch):
    """Anything a damaged shard makes a reader raise is reported against that shard."""
    from alexnet_pipe.convert import verify
    from alexnet_pipe.formats import lmdb as lmdb_format

    def broken(_value):
        raise MemoryError("a hostile length")

    monkeypatch.setattr(lmdb_format, "decode_datum", broken)
    entry = load_dataset(data).shard_entries("train")[0]
    out = verify._verify_task(verify._Task(data, "train", "lmdb", entry, 3, False, 2), verify.Ticker())
    assert out.labels is None and len(out.problems) == 1
    assert str(out.problems[0]).startswith("lmdb/train-00000: the checker failed (MemoryError: a hostile length); "
                                           f"to repair it, run alexnet-pipe verify {data} --repair (or delete "
                                           f"{data / 'lmdb/train-00000'} and rerun")


def test_the_pristine_dataset_passes(data):
    res = verify_cli(data, "--workers", "2", process=True)
    assert (res.returncode == 0 and res.stderr == ""
            and "ok: 24 images in 2 formats (48 records in 12 shards)" in res.stdout)
    assert not math.isnan(load_dataset_mean(data).mean[0])


def _checkers(pid: int) -> list[int]:
    """The grandchildren of ``pid``: verify's checker processes (forked by its checker server)."""
    def children(of: int) -> list[int]:
        try:
            return [int(c) for c in Path(f"/proc/{of}/task/{of}/children").read_text().split()]
        except OSError:  # it ended meanwhile
            return []
    return [g for c in children(pid) for g in children(c)]


def _verify_stopped_by(data: Path, sig: signal.Signals) -> tuple[int, str, str] | None:
    """verify held (SIGSTOP, the whole group) once a checker runs, sent ``sig``, released; None when it
    finished before it could be held (a fast machine: try again)."""
    proc = subprocess.Popen([sys.executable, "-m", "alexnet_pipe", "verify", str(data), "--workers", "1",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _checkers(proc.pid):  # a checker runs: verify is in its check
            if proc.poll() is not None:
                return None
            assert time.monotonic() < deadline, "no checker started"
            time.sleep(0.001)
        os.killpg(proc.pid, signal.SIGSTOP)  # held mid-run: the signal cannot land after the end
        # Ctrl-C reaches the terminal's whole group (verify and its checkers); `kill PID` verify alone.
        (os.killpg if sig == signal.SIGINT else os.kill)(proc.pid, sig)
        os.killpg(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode == 0:  # it had finished its check as it was held
        return None
    return proc.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_verify_in_one_line(data, sig):
    """Issue 21: Ctrl-C printed click's "Aborted!" and exit 1. Now one line, 130 (143 for SIGTERM)."""
    for _ in range(5):
        if (run := _verify_stopped_by(data, sig)) is not None:
            break
    else:
        pytest.fail("verify finished before it could be held, 5 times")
    code, out, err = run
    assert code == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], (out, err[-3000:])
    assert out == "" and err.splitlines() == [
        f"stopped by {sig.name}{' (Ctrl-C)' if sig == signal.SIGINT else ''}: nothing was changed; "
        "rerun to verify again"], err[-3000:]


@pytest.mark.parametrize("fmt", ["lmdb", "recordio"])
def test_an_edited_shard_size_fails_verify(data, fmt):
    """The records' checksums do not cover a shard's recorded size (the verify fuzz found an edited
    `bytes` passing); verify compares it with the files."""
    def edit(m):
        entry = m["splits"]["val"]["shards"][0][fmt]
        entry["bytes"] += 40000

    set_json(data / "manifest.json", edit)
    assert_reported(verify_cli(data, "--workers", "1", "--quick"), "the manifest says")
    (data / "lmdb" / "val-00000" / "lock.mdb").write_bytes(bytes(8192))  # a reader's lock file is not data
    set_json(data / "manifest.json", lambda m: m["splits"]["val"]["shards"][0][fmt].__setitem__(
        "bytes", m["splits"]["val"]["shards"][0][fmt]["bytes"] - 40000))
    assert verify_cli(data, "--workers", "1", "--quick").returncode == 0
