"""A metrics file on a full disk (/dev/full: every write fails with ENOSPC) costs a warning, not
the run (train/loop.py writes the epoch's checkpoint before its row); a device is never renamed
aside as an old metrics file."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.errors import AlexnetPipeError
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
