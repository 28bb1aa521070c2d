"""Preemption-safe training: a run stopped by SIGTERM or killed by SIGKILL at a random step and
resumed ends with the same weights, bit for bit, as a run never interrupted; damaged checkpoints
are detected and the previous one is used; no output path problem costs a trained model."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alexnet_pipe.errors import CheckpointError
from alexnet_pipe.model import checkpoint
from alexnet_pipe.model.alexnet import AlexNetConfig, build_model
from tests.helpers.datasets import shapes_dataset

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
# 24 train records at -z 4: 6 steps per epoch, 12 in a 2-epoch run.
FLAGS = ["-b", "cpu", "--crop", "67", "-z", "4", "--no_progress_bar", "--data-threads", "1", "--lr", "0.001",
         "--lr-scale", "none", "-e", "2", "--eval_freq", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preempt")
    return shapes_dataset(root, classes=("circle", "square", "hstripes", "vstripes"), train=6, val=1, seed=5)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict:
    """The weights of the same run, never interrupted."""
    out = tmp_path_factory.mktemp("reference")
    res = run(data, out, "-s", str(out / "w.pt"))
    assert res.returncode == 0, res.stderr[-2000:]
    return torch.load(out / "w.pt", weights_only=True)["model"]


def run(data: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "alexnet_pipe", "train", "-w", str(data), *FLAGS, *extra]
    return subprocess.run(cmd, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=300)


def step_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return [r for r in rows if "step" in r]


def interrupt(data: Path, cwd: Path, sig: int, at_step: int, *extra: str) -> subprocess.CompletedProcess:
    """Start the run and send ``sig`` once it has logged ``at_step`` steps (of 12)."""
    metrics = cwd / "m.jsonl"
    cmd = [sys.executable, "-m", "alexnet_pipe", "train", "-w", str(data), *FLAGS, "-s", str(cwd / "w.pt"),
           "-o", str(metrics), *extra]
    proc = subprocess.Popen(cmd, env=ENV, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(step_rows(metrics)) < at_step:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the run did not reach the step"
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_same_weights(path: Path, reference: dict) -> None:
    got = torch.load(path, weights_only=True)["model"]
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.equal(got[k], reference[k]), k


# One seed in `make test`; `make faults` adds five more random steps for each kind of kill.
SEEDS = [0, *(pytest.param(s, marks=pytest.mark.faults) for s in range(1, 6))]


@pytest.mark.parametrize("seed", SEEDS)
def test_sigterm_at_a_random_step_then_resume_gives_identical_weights(data, reference, tmp_path, seed):
    at = random.Random(seed).randint(1, 10)
    res = interrupt(data, tmp_path, signal.SIGTERM, at)
    assert res.returncode == 143, res.stderr[-2000:]
    assert "stopped by SIGTERM" in res.stderr and "Traceback" not in res.stderr
    body = torch.load(tmp_path / "w.ckpt", weights_only=True)
    assert body["epoch"] * 6 + body["partial"]["step"] >= at  # the step in flight was finished, not lost
    epochs = {1: "1 epoch;"}.get(body["epoch"], f"{body['epoch']} epochs;")  # seed 0 stops at step 7: "1 epoch"
    assert f"stopped by SIGTERM after {epochs}" in res.stderr
    assert not (tmp_path / "w.pt").exists()  # no final weights from a stopped run
    resume = next(line for line in res.stderr.splitlines() if line.startswith("resume with: "))
    args = shlex.split(resume.removeprefix("resume with: "))[1:]
    assert args[args.index("--model-file") + 1] == str(tmp_path / "w.ckpt")
    done = subprocess.run([sys.executable, "-m", "alexnet_pipe", *args], env=ENV, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_weights(tmp_path / "w.pt", reference)
    epochs = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if "epoch" in r and "step" not in r] == [1, 2]  # each epoch once
    assert [r for r in epochs if r.get("event") == "resumed"] == [
        {"event": "resumed", "after_epoch": body["epoch"], "after_step": body["partial"]["step"]}]
    steps = [(r["epoch"], r["step"]) for r in epochs if "step" in r]
    assert steps == sorted(set(steps)) and len(steps) == 12  # every step logged once


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_then_resume_from_the_last_periodic_checkpoint(data, reference, tmp_path, seed):
    at = random.Random(100 + seed).randint(3, 10)  # once step k is logged, steps 1..k-1 are checkpointed
    # Every step is due for a checkpoint at 0.00001 minutes; K = 2 files are kept.
    res = interrupt(data, tmp_path, signal.SIGKILL, at, "--checkpoint-minutes", "0.00001", "--keep-checkpoints", "2")
    assert res.returncode == -signal.SIGKILL
    assert (tmp_path / "w.ckpt").exists() and (tmp_path / "w.ckpt.1").exists()
    assert not (tmp_path / "w.ckpt.2").exists()
    res = run(data, tmp_path, "-s", str(tmp_path / "w.pt"), "--model_file", str(tmp_path / "w.ckpt"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same_weights(tmp_path / "w.pt", reference)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    path = tmp_path / "c.ckpt"
    mc = AlexNetConfig(num_classes=2, crop=67)
    state = build_model(mc, generator=torch.Generator().manual_seed(0)).state_dict()
    for epoch in (1, 2, 3):  # a body as train writes it (checkpoint.load checks every field: body_schema.py)
        checkpoint.save(path, {"kind": "checkpoint", "model": state, "model_config": mc.to_dict(), "data": {},
                               "epoch": epoch, "optimizer": {"state": {}, "param_groups": []}}, keep=3)
    assert [checkpoint.load(checkpoint.rotated(path, k))["epoch"] for k in range(3)] == [3, 2, 1]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit inside the tensor data: torch alone would load it silently
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.load(path)
    body, used = checkpoint.load_newest_good(path)
    assert (body["epoch"], used) == (2, checkpoint.rotated(path, 1))
    assert "resuming from the previous checkpoint" in caplog.text
    checkpoint.rotated(path, 1).write_bytes(checkpoint.rotated(path, 1).read_bytes()[:-500])  # truncated
    body, used = checkpoint.load_newest_good(path)
    assert body["epoch"] == 1


def test_output_paths_are_checked_before_training(data, tmp_path):
    (tmp_path / "adir").mkdir()
    for flag in ("-s", "-o", "--checkpoint"):
        res = run(data, tmp_path, flag, str(tmp_path / "adir"))
        assert res.returncode == 1
        assert f"{flag} {tmp_path / 'adir'} is a directory" in res.stderr
        assert "Traceback" not in res.stderr and "epoch 1" not in res.stderr  # refused before any step


def test_an_output_path_under_a_missing_folder_is_refused_not_built(data, tmp_path):
    for flag in ("-s", "-o"):
        res = run(data, tmp_path, flag, str(tmp_path / "typo" / "dir" / "x.pt"))
        assert res.returncode == 1
        assert f"{tmp_path / 'typo'} does not exist; create it first" in res.stderr.splitlines()[-1]
        assert not (tmp_path / "typo").exists()
    res = run(data, tmp_path, "-e", "1", "-s", str(tmp_path / "new" / "w.pt"))  # the file's own folder is made
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "new" / "w.pt").is_file()


def test_without_s_the_weights_go_to_a_printed_default_path(data, tmp_path):
    res = run(data, tmp_path, "-e", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    [weights] = list((tmp_path / "alexnet-runs").glob("*/alexnet.pt"))
    assert f"weights: {weights.relative_to(tmp_path)}" in res.stdout
    announced = res.stderr.index(f"weights will be written to {weights.relative_to(tmp_path)}")
    assert announced < res.stderr.index("epoch 1:")  # at start-up, before any training


def test_a_fresh_run_keeps_an_old_metrics_file_aside(data, tmp_path):
    (tmp_path / "m.jsonl").write_text('{"epoch": 7}\n')
    res = run(data, tmp_path, "-e", "1", "-s", str(tmp_path / "w.pt"), "-o", str(tmp_path / "m.jsonl"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "m.jsonl.1").read_text() == '{"epoch": 7}\n'
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])["epoch"] == 1
