"""tools/same_bytes.py: one quick run against HEAD passes, and its comparisons see every kind of difference."""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import same_bytes

REPO = same_bytes.REPO


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def kept(tmp_path_factory) -> Iterator[tuple[int, str, Path]]:
    """One --quick run, outputs kept: HEAD against this working tree, or, where alexnet_pipe/ has
    uncommitted changes (an intended change in progress would fail a HEAD comparison until it is
    committed), this working tree against itself."""
    try:
        dirty = _git("status", "--porcelain", "--", "alexnet_pipe").strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    before = str(REPO) if dirty else "HEAD"
    worktrees = _git("worktree", "list", "--porcelain")
    work = tmp_path_factory.mktemp("same-bytes") / "work"
    out = io.StringIO()
    real_stdout, sys.stdout = sys.stdout, out
    try:
        rc = same_bytes.main(["--before", before, "--quick", "--work", str(work), "--keep"])
    finally:
        sys.stdout = real_stdout
    assert _git("worktree", "list", "--porcelain") == worktrees, "a worktree was left behind"
    yield rc, out.getvalue(), work
    shutil.rmtree(work, ignore_errors=True)  # two 86 MB weights files: not for pytest's kept temp dirs


@pytest.mark.slow
def test_head_against_the_working_tree_is_the_same(kept):
    rc, report, work = kept
    assert rc == 0, report
    assert "VERDICT: SAME" in report and "DIFFERS" not in report
    assert "after: parts == both; repair-verify == both" in report
    for step in ("convert", "convert-part-0/2", "convert-part-1/2", "verify-repair", "train", "test"):
        assert f"after: {step}: exit 0" in report
    # What was compared is there: the damaged copy was repaired, training wrote rows and weights.
    after = work / "after"
    log = {o["name"]: o for o in json.loads((work / "after.log.json").read_text())}
    assert "REPAIRED train-00001" in log["verify-repair"]["stdout"]
    assert "ILSVRC2012_devkit_t12.tar.gz" in (after / "both" / "manifest.json").read_text()
    skipped = json.loads((after / "both" / "manifest.json").read_text())["skipped"]
    assert {s["reason"].split(" (")[0] for s in skipped} >= {"empty file", "truncated or corrupt image data"}
    assert [r["epoch"] for r in same_bytes.read_rows(after / "train" / "metrics.jsonl") if "step" not in r] == [1]
    assert same_bytes.read_rows(after / "train" / "test.jsonl")[0]["event"] == "test"


def test_a_changed_byte_or_file_in_the_outputs_is_found(kept):
    rc, report, work = kept
    if not (work / "after").is_dir():
        pytest.skip(f"the run did not finish: {report[-500:]}")
    before, after = work / "before", work / "after"
    assert same_bytes.compare_trees(before / "both", after / "both") == []
    rec = after / "both" / "recordio" / "val-00000.rec"
    data = bytearray(rec.read_bytes())
    data[len(data) // 2] ^= 1
    rec.write_bytes(bytes(data))
    (after / "both" / "extra.txt").write_text("x")
    (before / "both" / "mean.json").chmod(0o600)
    mode = (after / "both" / "mean.json").stat().st_mode & 0o7777
    found = same_bytes.compare_trees(before / "both", after / "both")
    assert found == ["only in after: extra.txt", f"mean.json: mode 600 in before, {mode:o} in after",
                     f"recordio/val-00000.rec: differs ({len(data)} vs {len(data)} bytes, "
                     f"first difference at byte {len(data) // 2})"]


def test_metrics_rows_are_compared_value_by_value_without_timing():
    row = {"epoch": 1, "lr": 0.000625, "train_loss": 1.2320700935695483, "samples": 23, "img_per_s": 12.0,
           "seconds": 1.9, "loader": {"read_workers": 0}, "val_loss": float("nan"), "val_top5": None}
    timing_only = dict(row, img_per_s=6.2, seconds=3.7)
    assert same_bytes.compare_rows([row], [timing_only]) == []
    one_ulp = math.nextafter(row["train_loss"], 2)  # the smallest change a float can have
    assert same_bytes.compare_rows([row], [dict(row, train_loss=one_ulp)]) == [
        f"row 1/train_loss: 1.2320700935695483 vs {one_ulp!r}"]
    assert same_bytes.compare_rows([row], [dict(row, samples=23.0)]) == ["row 1/samples: 23 vs 23.0"]
    assert same_bytes.compare_rows([row], [dict(row, loader={"read_workers": 1})]) == [
        "row 1/loader/read_workers: 0 vs 1"]
    assert same_bytes.compare_rows([row, row], [row]) == ["2 rows vs 1"]
    missing = {k: v for k, v in row.items() if k != "seconds"}
    assert same_bytes.compare_rows([row], [missing])[0].startswith("row 1: keys [")


def _weights(path: Path, payload: dict) -> Path:
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    path.write_bytes(body + same_bytes.TRAILER + hashlib.sha256(body).hexdigest().encode() + b"\n")
    return path


def test_weights_are_compared_tensor_by_tensor_without_the_historys_timing(tmp_path):
    def payload(w=1.0, seconds=1.0, loss=0.5):
        return {"model": {"fc8.weight": torch.full((2, 3), w)}, "epoch": 2,
                "history": [{"epoch": 1, "train_loss": loss, "seconds": seconds, "img_per_s": 24 / seconds}]}

    a = _weights(tmp_path / "a.pt", payload())
    assert same_bytes.compare_weights(a, _weights(tmp_path / "b.pt", payload(seconds=2.5))) == []
    assert same_bytes.compare_weights(a, _weights(tmp_path / "c.pt", payload(loss=0.25))) == [
        "/history[0]/train_loss: 0.5 vs 0.25"]
    assert same_bytes.compare_weights(a, _weights(tmp_path / "d.pt", payload(w=1.0 + 2**-20))) == [
        "/model/fc8.weight: tensor values differ (max |a-b| 9.54e-07)"]
    damaged = tmp_path / "e.pt"
    data = bytearray((tmp_path / "b.pt").read_bytes())
    data[-10] = ord("0") if data[-10] != ord("0") else ord("1")
    damaged.write_bytes(bytes(data))
    assert same_bytes.compare_weights(a, damaged) == ["after: its SHA-256 trailer does not match its bytes"]


def test_output_lines_lose_only_durations_speeds_and_paths():
    repl = {"/tmp/w": "<WORK>", "/tmp/code": "<CODE>"}
    text = ("wrote /tmp/w/run/both: train 23, val 8 records, 6 skipped (35 images in 0.9 s, 41 img/s)\n"
            "INFO epoch 1: train loss 1.2321, 1,204 img/s\n"
            'File "/tmp/code/alexnet_pipe/cli.py", line 3\n')
    assert same_bytes.normalise(text, repl) == [
        "wrote <WORK>/run/both: train 23, val 8 records, 6 skipped (35 images in <T>, <R> img/s)",
        "INFO epoch 1: train loss 1.2321, <R> img/s",
        'File "<CODE>/alexnet_pipe/cli.py", line 3']


def test_exit_codes_and_output_lines_are_compared():
    def outcome(rc=0, out="ok: 31 images (in 1.0 s)\n", err=""):
        return same_bytes.Outcome("verify", ["verify"], rc, out, err, 1.0)

    same = same_bytes.compare_outcomes([outcome()], [outcome(out="ok: 31 images (in 9.5 s)\n")], {}, {})
    assert same == []
    assert same_bytes.compare_outcomes([outcome()], [outcome(rc=1)], {}, {}) == ["verify: exit 0 before, 1 after"]
    assert same_bytes.compare_outcomes([outcome()], [outcome(err="WARNING new\n")], {}, {}) == [
        "verify stderr: +WARNING new"]
    assert same_bytes.compare_outcomes([outcome()], [outcome(out="ok: 30 images (in 1.0 s)\n")], {}, {}) == [
        "verify stdout: -ok: 31 images (in <T>)", "verify stdout: +ok: 30 images (in <T>)"]


def test_the_input_is_the_same_on_every_build(tmp_path):
    same_bytes.build_input(tmp_path / "a")
    same_bytes.build_input(tmp_path / "b")
    assert same_bytes.tree_digest(tmp_path / "a") == same_bytes.tree_digest(tmp_path / "b")
    names = {p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert {"raw/ILSVRC2012_devkit_t12.tar.gz", "raw/train/n01000002/cmyk.JPEG", "raw/train/notes.txt",
            "raw/val/ILSVRC2012_val_00000005.JPEG", "mean_bgr.npy"} <= names
