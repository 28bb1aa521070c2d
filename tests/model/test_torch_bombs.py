"""Torch zip bombs (model/torchfile.py): a small .pth or checkpoint that declares a huge storage is
refused before torch inflates anything, through every reader of torch files."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.errors import CheckpointError, FormatError
from alexnet_pipe.model import checkpoint, torchfile
from alexnet_pipe.model.weights.torchvision import load_state_dict
from tests.helpers.datasets import shapes_dataset


def bomb(src: Path, dst: Path, inflated: int, trailer: bool = False) -> Path:
    """``src`` (a torch zip) with its first storage replaced by ``inflated`` zero bytes, deflated;
    with ``trailer``, a valid SHA-256 trailer as our files carry (it proves integrity, not origin)."""
    with zipfile.ZipFile(src) as z_in, zipfile.ZipFile(dst, "w") as z_out:
        storages = [i.filename for i in z_in.infolist() if "/data/" in i.filename]
        for info in z_in.infolist():
            if info.filename != storages[0]:
                z_out.writestr(info.filename, z_in.read(info))
                continue
            entry = zipfile.ZipInfo(info.filename)
            entry.compress_type = zipfile.ZIP_DEFLATED
            with z_out.open(entry, "w", force_zip64=True) as f:
                chunk = bytes(1 << 20)
                for start in range(0, inflated, len(chunk)):
                    f.write(chunk[: inflated - start])
    if trailer:
        data = dst.read_bytes()
        dst.write_bytes(data + checkpoint.TRAILER + hashlib.sha256(data).hexdigest().encode() + b"\n")
    return dst


@pytest.fixture
def pth(tmp_path) -> Path:
    path = tmp_path / "small.pth"
    torch.save({"w": torch.zeros(4), "b": torch.ones(2)}, path)
    return path


def test_a_genuine_torch_file_passes(pth, tmp_path):
    assert torchfile.problem(pth) is None
    ours = tmp_path / "ours.pt"
    checkpoint.save(ours, {"kind": "weights", "model": {"w": torch.zeros(3)}, "model_config": {}, "data": {}})
    assert torchfile.problem(ours) is None


def test_inflating_storage_is_refused_before_torch_reads_it(pth, tmp_path):
    b = bomb(pth, tmp_path / "bomb.pth", 64 << 20)
    assert b.stat().st_size < 1 << 20  # 64 MiB of zeros deflate to ~64 KB
    why = torchfile.problem(b)
    assert why is not None and "zip bomb" in why
    with pytest.raises(FormatError, match="refused: its zip declares"):
        load_state_dict(b)
    res = CliRunner().invoke(main, ["import-weights", str(b), "-o", str(tmp_path / "x.pt")])
    assert res.exit_code == 1 and "zip bomb" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_a_bomb_with_a_valid_trailer_is_refused_as_a_checkpoint(tmp_path):
    ours = tmp_path / "ours.pt"
    checkpoint.save(ours, {"kind": "weights", "model": {"w": torch.zeros(3)}, "model_config": {}, "data": {}})
    raw = tmp_path / "raw.zip"
    raw.write_bytes(ours.read_bytes()[: -len(checkpoint.TRAILER) - 65])
    b = bomb(raw, tmp_path / "bomb.pt", 64 << 20, trailer=True)
    with pytest.raises(CheckpointError, match="is refused: its zip declares"):
        checkpoint.load(b)
    data = shapes_dataset(tmp_path / "d")
    for args in (["test", "-w", str(data), "-b", "cpu", "--model-file", str(b)],
                 ["predict", "-b", "cpu", "--model-file", str(b), str(b)]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1 and "zip bomb" in res.output and "Traceback" not in res.output, res.output


def test_too_many_entries_and_the_legacy_format_are_refused(pth, tmp_path):
    many = tmp_path / "many.pth"
    with zipfile.ZipFile(many, "w") as z:
        for i in range(torchfile.MAX_ENTRIES + 1):
            z.writestr(f"archive/data/{i}", b"")
    assert "entries" in torchfile.problem(many)
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    assert "legacy" in torchfile.problem(legacy)
    with pytest.raises(FormatError, match="legacy"):
        load_state_dict(legacy)


@pytest.mark.faults
def test_a_1mb_file_declaring_1gib_peaks_far_below_it(pth, tmp_path):
    """The issue's bomb: 1 GiB of storage from about 1 MB on disk; the refusal's peak memory is that
    of starting the CLI (torch imported), not the bomb's."""
    b = bomb(pth, tmp_path / "bomb.pth", 1 << 30)
    assert b.stat().st_size < 2 << 20
    # The CLI in a child that reports its own peak as it exits: VmHWM, which exec resets (ru_maxrss
    # would carry the forking pytest process's size over).
    script = ("import sys\nfrom alexnet_pipe.cli import main\n"
              "try:\n    main(sys.argv[1:])\nfinally:\n"
              "    hwm = [x for x in open('/proc/self/status') if x.startswith('VmHWM')][0].split()[1]\n"
              "    print('peak', hwm, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script, "import-weights", str(b), "-o", str(tmp_path / "x.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "refused: its zip declares" in done.stderr and "Traceback" not in done.stderr
    peak_kib = int(done.stderr.split("peak ")[-1])
    assert peak_kib < 600 * 1024, f"peak {peak_kib} KiB"
