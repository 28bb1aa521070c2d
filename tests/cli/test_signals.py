"""Ctrl-C ends every command alike (issue 21): one line, "stopped by SIGINT (Ctrl-C): ...", exit
130, never click's "Aborted!" and exit 1. `convert` and `verify` say what a stop leaves
(tests/convert/test_job_kills.py, tests/convert/test_verify.py); the group gives every other
command the same ending. A real SIGINT, sent to this process while the command runs."""

from __future__ import annotations

import os
import signal
import threading

from click.testing import CliRunner

from alexnet_pipe.cli import main


def test_ctrl_c_during_any_command_is_one_line_and_130():
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # lands mid-run: it runs for minutes
    timer.start()
    try:
        res = CliRunner().invoke(main, ["benchmark", "-b", "cpu", "--crop", "67", "-z", "2", "--nchw",
                                        "--iterations", "100000"])
    finally:
        timer.cancel()
    assert res.exit_code == 130, res.output
    assert res.output.splitlines() == ["stopped by SIGINT (Ctrl-C): `benchmark` did not finish; rerun it"]
