"""Hostile caffemodels: millions of empty layers, blobs or fields, and names made to flood a message.
Each is refused in one line, fast and at the cost of the file, through the real CLI."""

from __future__ import annotations

import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.model.weights.caffe import MAX_BLOBS, MAX_LAYERS
from tests.helpers.weight_files import caffemodel, fld

EMPTY_LAYER = b"\xa2\x06\x00"  # field 100 (LayerParameter), length 0


def _import(tmp_path, data: bytes, traced: bool = True) -> tuple[str, float, int]:
    """``import-weights`` on ``data``: its output, the seconds it took and the peak of traced memory
    (0 untraced: tracing makes each of a million fields several times slower)."""
    src = tmp_path / "bomb.caffemodel"
    src.write_bytes(data)
    if traced:
        tracemalloc.start()
    try:
        start = time.perf_counter()
        res = CliRunner().invoke(main, ["import-weights", str(src), "-o", str(tmp_path / "w.pt")])
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.exit_code == 1 and "Traceback" not in res.output and "MemoryError" not in res.output, res.output[:2000]
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "w.pt").exists()
    return res.output, seconds, peak


def test_nine_mb_of_empty_layers_is_refused_in_one_short_line_quickly(tmp_path):
    """The issue's bomb: 3 million empty layers after a name took 1.15 GB and 13 to 28 s."""
    out, seconds, peak = _import(tmp_path, b"\x0a\x03net" + EMPTY_LAYER * 3_000_000)
    assert f"more than {MAX_LAYERS:,} layers" in out and len(out) < 300
    assert seconds < 2.0, f"{seconds:.1f} s"
    assert peak < 40 << 20, f"peak {peak >> 20} MiB"  # the 9 MB file, and nothing per layer past the cap


def test_a_layer_of_two_million_empty_blobs_is_refused(tmp_path):
    """Each blob is num=0, a valid 0-element BlobProto: decoded, each was an array."""
    out, seconds, peak = _import(tmp_path, fld(100, fld(1, b"conv1") + fld(7, fld(1, 0)) * 2_000_000))
    assert f"holds more than {MAX_BLOBS} blobs" in out and len(out) < 300 and seconds < 2.0
    assert peak < 40 << 20, f"peak {peak >> 20} MiB"


@pytest.mark.parametrize("data", [
    b"\x0a\x03net" + fld(99, 0) * 2_000_000 + fld(100, fld(1, b"conv1")),  # at the top level
    fld(100, fld(1, b"conv1") + fld(99, 0) * 2_000_000),  # inside a layer
], ids=["net", "layer"])
def test_floods_of_tiny_unknown_fields_are_cut_short(tmp_path, data):
    """Two million 2-byte fields: read up to the budget of a million (about a second), not all of them."""
    out, seconds, _ = _import(tmp_path, data, traced=False)
    assert "more than 1,000,000 fields" in out and len(out) < 300
    assert seconds < 5.0, f"{seconds:.1f} s"


def test_layer_names_in_a_message_are_few_short_and_escaped(tmp_path):
    """9,000 layers with weights but no conv1: the message names 8 of them, escaped and cut to 60 chars."""
    names = [f"\x1b[2J{i:05d}" + "x" * 200 for i in range(9_000)]
    out, _, _ = _import(tmp_path, caffemodel([(n, "Convolution", [np.zeros(1, np.float32)]) for n in names], "new"))
    assert "no layer named 'conv1'" in out and "... and 8992 more" in out, out[:500]
    assert "\x1b" not in out and "'\\x1b[2J00000xxx" in out and "x" * 61 not in out
    assert len(out) < 1000, len(out)


def test_a_hundred_thousand_named_empty_layers_give_a_short_line(tmp_path):
    data = caffemodel([(f"layer{i}", "ReLU", []) for i in range(100_000)], "new")
    out, seconds, _ = _import(tmp_path, data)
    assert f"more than {MAX_LAYERS:,} layers" in out and len(out) < 300 and seconds < 2.0


@pytest.mark.faults
def test_sixty_mb_of_empty_layers_under_a_memory_limit_is_one_line(tmp_path):
    """20 million empty layers (60 MB) in a child limited to 2 GiB of address space (torch's import
    and the file fit easily): one line and exit 1, never a MemoryError. Before the cap it needed
    about 7 GB and ended in MemoryError."""
    src = tmp_path / "bomb.caffemodel"
    src.write_bytes(b"\x0a\x03net" + EMPTY_LAYER * 20_000_000)
    script = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
              "from alexnet_pipe.cli import main\nmain(sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-c", script, "import-weights", str(src), "-o", str(tmp_path / "w.pt")],
                          capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "MemoryError" not in out and "Traceback" not in out, out[:2000]
    assert len(out.strip().splitlines()) == 1 and f"more than {MAX_LAYERS:,} layers" in out
