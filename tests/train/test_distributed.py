"""Data-parallel training with real torchrun processes on gloo (localhost, CPU).

The split sizes are chosen so the ranks' shares do not divide evenly: 15 train records over 2
ranks leave one padding sample, 9 val records likewise.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.datasets import shapes_dataset

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
# -z 7 on 2 ranks: the 15 train records end in a step where rank 1's batch is all padding.
COMMON = ["-b", "cpu", "--crop", "67", "-z", "7", "--no_progress_bar", "--data-threads", "1", "--lr", "0.001"]
TEST = ["-b", "cpu", "-z", "7", "--no-progress", "--data-threads", "1"]  # `test` takes no training flags


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """3 classes of drawn shapes, 5 train / 3 val each (15 and 9 records), 4 records per shard."""
    root = tmp_path_factory.mktemp("dist")
    return shapes_dataset(root, classes=("circle", "square", "hstripes"), train=5, val=3, seed=3, shard_size=4)


def torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def cli(*args: str, timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alexnet_pipe", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_ranks_see_the_whole_split_once_per_epoch(data, tmp_path):
    res = torchrun(2, str(WORKER), "samples", str(data), str(tmp_path / "s.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = json.loads((tmp_path / "s.json").read_text())
    seen = [i for r in ranks for i in r["indices"]]
    assert sorted(seen) == list(range(15))  # every record exactly once over both ranks
    assert [r["padding"] for r in ranks] == [0, 1]  # 15 over 2: one padding sample, counted nowhere
    assert ranks[0]["steps"] == ranks[1]["steps"]  # every rank joins every all-reduce
    assert all(r["labels_fed_match_records"] for r in ranks)  # the loader fed exactly those records


def test_one_step_on_two_ranks_equals_one_process_with_the_double_batch(data, tmp_path):
    # 15 records: 2 ranks x 8 (one padding sample) and 1 process x 16 both fill exactly one step.
    one = torchrun(1, str(WORKER), "step", str(data), str(tmp_path / "p1.pt"), "16", "f32")
    two = torchrun(2, str(WORKER), "step", str(data), str(tmp_path / "p2.pt"), "8", "f32")
    bf16 = torchrun(2, str(WORKER), "step", str(data), str(tmp_path / "pb.pt"), "8", "bf16")
    for res in (one, two, bf16):
        assert res.returncode == 0, res.stderr[-3000:]
    p1, p2, pb = (torch.load(tmp_path / f"{n}.pt") for n in ("p1", "p2", "pb"))
    moved = max((p1["after"][k] - p1["before"][k]).abs().max().item() for k in p1["after"])
    assert moved > 1e-4  # the step did something

    def differ(p):
        return max((p1["after"][k] - p["after"][k]).abs().max().item() for k in p1["after"])

    assert differ(p2) < 1e-6  # float32 sums in another order: measured 4e-9 on this machine
    # bf16 all-reduce: gradients rounded to 8 significant bits (0.4% each), so the step differs
    # by about that much of its size (measured 0.5% at the largest element), not more.
    assert differ(pb) < 2e-2 * moved


def test_two_rank_validation_equals_one_process(data, tmp_path):
    weights = tmp_path / "w.pt"
    res = cli("train", "-w", str(data), *COMMON, "-e", "1", "--eval_freq", "0", "-s", str(weights))
    assert res.returncode == 0, res.stderr[-3000:]
    one = cli("test", "-w", str(data), *TEST, "--model-file", str(weights), "-o", str(tmp_path / "one.jsonl"))
    two = cli("test", "-w", str(data), *TEST, "--model-file", str(weights), "-o", str(tmp_path / "two.jsonl"),
              "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    [a], [b] = rows(tmp_path / "one.jsonl"), rows(tmp_path / "two.jsonl")
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["samples"] == b["samples"] == 9  # each val image once, padding excluded
    assert (a["val_top1"], a["val_top5"]) == (b["val_top1"], b["val_top5"])
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert two.stdout.count("LogLoss:") == 1  # one rank prints


def test_checkpoints_move_between_rank_counts_and_only_rank_0_writes(data, tmp_path):
    ckpt2, ckpt1 = tmp_path / "two.ckpt", tmp_path / "one.ckpt"
    metrics = tmp_path / "m.jsonl"
    res = cli("train", "-w", str(data), *COMMON, "-e", "1", "--serialize", "1", "--checkpoint", str(ckpt2),
              "-o", str(metrics), "--nproc", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    [row] = rows(metrics)
    assert (row["world_size"], row["global_batch"], row["samples"]) == (2, 14, 15)
    assert row["lr"] == pytest.approx(0.001 * 14 / 128)  # --lr-scale linear: --lr holds for 128 images
    assert math.isfinite(row["train_loss"])  # the all-padding batch added nothing, not NaN
    # Resume the 2-rank checkpoint on 1 rank, then that one on 2 ranks again.
    res = cli("train", "-w", str(data), *COMMON, "-e", "2", "--model_file", str(ckpt2), "--serialize", "1",
              "--checkpoint", str(ckpt1), "-o", str(metrics), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    # Half the ranks: half the global batch and, by --lr-scale linear, half the lr: said, and recorded.
    assert "world_size 2 -> 1, global_batch 14 -> 7, lr_used 0.000109375 -> 5.46875e-05" in res.stderr
    [resumed] = [r for r in rows(metrics) if r.get("event") == "resumed"]
    assert {k: resumed["changed"][k] for k in ("world_size", "global_batch")} == {"world_size": [2, 1],
                                                                                 "global_batch": [14, 7]}
    assert resumed["changed"]["lr_used"] == pytest.approx([0.001 * 14 / 128, 0.001 * 7 / 128])
    res = cli("train", "-w", str(data), *COMMON, "-e", "3", "--model_file", str(ckpt1), "--serialize", "1",
              "--checkpoint", str(ckpt2), "-o", str(metrics), "--nproc", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    history = [r for r in rows(metrics) if "epoch" in r]
    assert [(r["epoch"], r["world_size"], r["samples"]) for r in history] == [(1, 2, 15), (2, 1, 15), (3, 2, 15)]
    assert [r["after_epoch"] for r in rows(metrics) if r.get("event") == "resumed"] == [1, 2]  # for `plot`
    body = torch.load(ckpt2, weights_only=True)
    assert (body["epoch"], body["world_size"]) == (3, 2)
    assert [r["epoch"] for r in body["history"]] == [1, 2, 3]
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left by any rank


def test_ranks_that_disagree_refuse_to_start(data, tmp_path):
    res = torchrun(2, str(WORKER), "mismatch", str(data), str(tmp_path / "unused"))
    assert res.returncode != 0
    assert "rank 1 disagrees with rank 0 on lr (0.02 vs 0.01)" in res.stderr


def start_job(data: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    """`train --nproc 2` for 500 epochs (it is stopped long before), weights to cwd/w.pt."""
    cmd = [sys.executable, "-m", "alexnet_pipe", "train", "-w", str(data), *COMMON, "-e", "500", "--nproc", "2",
           "-s", "w.pt", "-o", "m.jsonl", *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def wait_for(proc: subprocess.Popen, path: Path) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the job did not get there"
        time.sleep(0.2)


def end_job(proc: subprocess.Popen, timeout: float = 90) -> str:
    """The job's stderr once it ends; a job still running after ``timeout`` s is killed, ranks too
    (they run in sessions of their own), and the test fails."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        for pid in [*_children(proc.pid), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("the job did not end") from None


def resume_args(err: str) -> list[str]:
    line = next(line for line in err.splitlines() if "resume with: " in line)
    return shlex.split(line.split("resume with: ", 1)[1])[1:]


def test_a_killed_rank_ends_the_job_with_a_message(data, tmp_path):
    proc = start_job(data, tmp_path, "--serialize", "1")
    wait_for(proc, tmp_path / "w.ckpt")  # training is under way once an epoch is checkpointed
    os.kill(_rank_pid(proc.pid, rank=1), signal.SIGKILL)
    killed = time.monotonic()
    err = end_job(proc)
    assert proc.returncode == 1
    assert time.monotonic() - killed < 60
    last = err.splitlines()[-1]
    assert "rank 1 ended with signal SIGKILL" in last and "last checkpoint: w.ckpt" in last
    args = resume_args(last)  # the same job again, from that checkpoint
    assert args[args.index("--nproc") + 1] == "2" and args[args.index("--model-file") + 1] == "w.ckpt"


def test_sigterm_to_one_rank_stops_every_rank(data, tmp_path):
    proc = start_job(data, tmp_path)
    wait_for(proc, tmp_path / "m.jsonl")
    os.kill(_rank_pid(proc.pid, rank=1), signal.SIGTERM)  # as a scheduler preempting one process would
    err = end_job(proc)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err and "failed" not in err and "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_on_the_launcher_stops_in_one_message_and_resumes_on_as_many_ranks(data, tmp_path, sig):
    proc = start_job(data, tmp_path)
    wait_for(proc, tmp_path / "m.jsonl")
    proc.send_signal(sig)  # Ctrl-C reaches the launcher only: torchrun starts each rank in its own session
    err = end_job(proc)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err[-3000:]
    said = [line for line in err.splitlines() if not line.startswith(("INFO ", "WARNING "))]  # our log lines
    assert len(said) == 2, err[-3000:]  # no traceback, no launcher chatter
    assert said[0].startswith(f"stopped by {sig.name} after ") and said[0].endswith("checkpoint: w.ckpt")
    args = resume_args(said[1])
    assert args[args.index("--nproc") + 1] == "2"
    if sig == signal.SIGTERM:
        return
    body = torch.load(tmp_path / "w.ckpt", weights_only=True)
    args[args.index("-e") + 1] = str(body["epoch"] + 1)  # one more epoch, not 500
    res = subprocess.run([sys.executable, "-m", "alexnet_pipe", *args], env=ENV, cwd=tmp_path, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    [resumed] = [r for r in rows(tmp_path / "m.jsonl") if r.get("event") == "resumed"]
    assert "world_size" not in resumed["changed"] and "global_batch" not in resumed["changed"]
    assert rows(tmp_path / "m.jsonl")[-1]["world_size"] == 2


def _children(pid: int) -> list[int]:
    """Every process below ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != pid:
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if _descends(ppid, pid):
                found.append(int(entry))
    return found


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of the worker process whose environment says RANK=rank, below ``launcher``."""
    for _ in range(100):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if f"RANK={rank}".encode() in env and _descends(ppid, launcher):
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} process found")


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def test_more_ranks_than_gpus_is_refused_before_launching(data):
    gpus = torch.cuda.device_count()
    nproc = max(2, gpus + 1)
    res = cli("train", "-w", str(data), "-b", "gpu", "--nproc", str(nproc))
    assert res.returncode == 2
    assert f"--nproc {nproc} runs one rank per GPU, and this machine has {gpus}" in res.stderr
