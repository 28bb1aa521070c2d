"""A metrics file on a full disk (/dev/full: every write fails with ENOSPC) costs a warning, not
the run (train/loop.py writes the epoch's checkpoint before its row); a device is never renamed
aside as an old metrics file."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.errors import AlexnetPipeError
from alexnet_pipe.model import checkpoint
from alexnet_pipe.train.loggers import Loggers, MetricsLog
from tests.helpers.datasets import shapes_dataset

FULL = Path("/dev/full")
pytestmark = pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full (Linux)")


def test_a_full_disk_is_one_warning_and_leaves_no_half_row(tmp_path, caplog):
    raw = MetricsLog(FULL)
    with pytest.raises(OSError) as exc:
        raw.write({"epoch": 1})
    assert exc.value.errno == errno.ENOSPC
    logs = Loggers(MetricsLog(FULL))
    with caplog.at_level(logging.WARNING):
        logs.write({"epoch": 1})
        logs.write({"epoch": 2})  # still failing: no second warning
    warned = [r.getMessage() for r in caplog.records if "could not write the metrics" in r.getMessage()]
    assert len(warned) == 1 and "/dev/full" in warned[0] and "training goes on" in warned[0]


def test_a_device_as_metrics_file_is_refused_never_renamed(tmp_path):
    with pytest.raises(AlexnetPipeError, match="not a regular file"):
        MetricsLog(Path(os.devnull)).start(None)
    assert Path(os.devnull).exists() and not Path(os.devnull + ".1").exists()
    data = shapes_dataset(tmp_path / "d")
    res = CliRunner().invoke(main, ["train", "-w", str(data), "-b", "cpu", "-e", "1", "--crop", "67",
                                    "-o", os.devnull, "-s", str(tmp_path / "w.pt")])
    assert res.exit_code == 1 and "not a regular file" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "w.pt").exists()


def test_a_second_training_on_the_same_outputs_is_refused(tmp_path):
    """Two runs with the same -s used to interleave their metrics and checkpoints."""
    data = shapes_dataset(tmp_path / "d")
    weights = tmp_path / "w.pt"
    # Another process holds the metrics file's lock (POSIX locks are per process): the CLI refuses
    # in one line before any work.
    import subprocess
    import sys
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from alexnet_pipe.fsutil import output_lock\n"
        f"with output_lock(Path({str(tmp_path / 'm.jsonl')!r}), 'alexnet-pipe train'):\n"
        "    print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = CliRunner().invoke(main, ["train", "-w", str(data), "-b", "cpu", "-e", "1", "--crop", "67",
                                        "-s", str(weights), "-o", str(tmp_path / "m.jsonl"), "--no-progress"])
        assert res.exit_code == 1 and "another alexnet-pipe train is writing" in res.output, res.output
        assert not weights.exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder gone (killed: the kernel released its lock), the same command runs, and leaves no lock file.
    res = CliRunner().invoke(main, ["train", "-w", str(data), "-b", "cpu", "-e", "1", "--crop", "67", "-z", "4",
                                    "--eval-freq", "0", "-s", str(weights), "-o", str(tmp_path / "m.jsonl"),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    assert weights.is_file() and not list(tmp_path.glob(".*.lock"))


def test_resuming_into_a_file_that_is_not_this_runs_metrics_keeps_it(tmp_path):
    from alexnet_pipe.train.loggers import MetricsLog

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nmore notes\n")
    MetricsLog(notes).start(3, 0)
    assert (tmp_path / "notes.txt.1").read_text() == "my notes\nmore notes\n"
    assert json.loads(notes.read_text()) == {"event": "resumed", "after_epoch": 3, "after_step": 0}
    ours = tmp_path / "m.jsonl"
    ours.write_text('{"epoch": 1, "lr": 0.1}\n{"epoch": 2, "lr": 0.1}\n{"epoch": 3, "st')  # cut by a crash
    MetricsLog(ours).start(1, 0)
    assert not (tmp_path / "m.jsonl.1").exists()  # its own rows: trimmed in place, as before
    assert [json.loads(x).get("epoch") for x in ours.read_text().splitlines()] == [1, None]


@pytest.mark.faults
def test_a_real_full_disk_under_the_metrics_file_keeps_training(tmp_path, caplog):
    """-o on a tmpfs filled to the last byte (real ENOSPC), the checkpoints elsewhere: every epoch
    is trained and checkpointed; each failing row is a warning, not the end of the run."""
    from tests.convert.test_job_storage import small_disk

    data = shapes_dataset(tmp_path / "d")
    with small_disk(tmp_path / "disk", "64k") as disk:
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # fill it to the last byte
            while os.write(fd, bytes(4096)):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        metrics = disk / "m.jsonl"
        with caplog.at_level(logging.WARNING):
            res = CliRunner().invoke(main, ["train", "-w", str(data), "-b", "cpu", "-e", "2", "--crop", "67",
                                            "-z", "4", "--serialize", "1", "-s", str(tmp_path / "w.pt"),
                                            "-o", str(metrics), "--no-progress", "--log-every", "1"])
        assert res.exit_code == 0, res.output
        warned = [r for r in caplog.records if "could not write the metrics" in r.getMessage()]
        assert len(warned) >= 1 and "Traceback" not in res.output
        body = checkpoint.load(tmp_path / "w.ckpt")
        assert body["epoch"] == 2 and [row["epoch"] for row in body["history"]] == [1, 2]
        assert not metrics.exists() or all(json.loads(x) for x in metrics.read_text().splitlines())  # no half row
