"""Progress in a log (issue 21, item 12): with stderr not a terminal, `convert`, `verify` and `test`
write plain progress lines (at most one every 30 s, and one at the end), never a bar's
carriage-return frames, as `train` does; --no-progress writes neither."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alexnet_pipe.apps.synthetic import SynthConfig, make_image_tree
from tests.helpers.datasets import train_one_epoch

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    """The real CLI in its own process, stderr a pipe (not a terminal), as in a batch job's log."""
    res = subprocess.run([sys.executable, "-m", "alexnet_pipe", *args], capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_convert_verify_and_test_log_plain_lines_when_not_on_a_terminal(tmp_path):
    make_image_tree(SynthConfig(tmp_path / "raw", 4, 2, (96, 72), ("circle", "square"), seed=2))
    data = tmp_path / "data"
    convert = cli("convert", str(tmp_path / "raw"), str(data), "--shard-size", "5", "--workers", "1",
                  "--short-side", "72")
    verify = cli("verify", str(data), "--workers", "1")
    weights = train_one_epoch(data, tmp_path / "w.pt")
    test = cli("test", "-w", str(data), "-b", "cpu", "-z", "2", "--data-threads", "1", "--model-file", str(weights))
    for res, line in ((convert, "INFO convert: 12/12 img in "), (verify, "INFO verify: 12/12 rec in "),
                      (test, "INFO eval: 2/2 batch in ")):
        assert "\r" not in res.stderr + res.stdout, res.stderr[-2000:]  # no tqdm frames in the log
        assert any(entry.startswith(line) for entry in res.stderr.splitlines()), res.stderr[-2000:]
    quiet = cli("verify", str(data), "--workers", "1", "--no-progress")
    assert "INFO verify:" not in quiet.stderr and "\r" not in quiet.stderr
