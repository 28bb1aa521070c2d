"""The runnable examples in examples/ work: own_model.py trains a network that is not AlexNet on
``alexnet_pipe.loader`` batches, on the CPU, and it learns."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_own_model_example_learns(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "examples" / "own_model.py"), "--work", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    losses = [float(x) for x in re.findall(r"^epoch \d+ loss ([\d.]+)$", done.stdout, re.M)]
    accuracy = float(re.search(r"^val accuracy ([\d.]+)%", done.stdout, re.M).group(1))
    assert len(losses) == 2, done.stdout
    # Seeded runs give a loss of about 1.4 then 1.15, and 50-58% on 4 classes (chance: 25%).
    assert losses[1] < losses[0], done.stdout
    assert accuracy > 35.0, done.stdout
    assert (tmp_path / "data" / "manifest.json").is_file()
