"""The codec versions that wrote a dataset are recorded (state file, manifest, `info`), and a resume,
a --part run or a --repair with other versions is refused in one line (issue 21 item 14): two
encodings never mix in one dataset, and --repair's byte-identical promise holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.dataset.layout import MANIFEST_FILE, STATE_FILE
from alexnet_pipe.dataset.schema import Manifest
from alexnet_pipe.imaging.codec_versions import codec_versions
from tests.helpers.images import make_tree

runner = CliRunner()


@pytest.fixture
def raw(tmp_path) -> Path:
    make_tree(tmp_path / "raw", {"train": 2, "val": 1})
    return tmp_path / "raw"


def _convert(raw: Path, out: Path, *extra: str):
    return runner.invoke(main, ["convert", str(raw), str(out), "--no-progress", "--workers", "1",
                                "--shard-size", "2", *extra])


def _edit_state(out: Path, change) -> None:
    path = out / STATE_FILE
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


def _older_opencv(state: dict) -> None:
    state["codecs"]["opencv"] = "3.4.0"


def _one_line_refusal(res) -> str:
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    [line] = res.output.strip().splitlines()
    return line


def test_versions_are_recorded_and_shown(raw, tmp_path):
    out = tmp_path / "out"
    assert _convert(raw, out).exit_code == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["codecs"] == codec_versions() == json.loads((out / STATE_FILE).read_text())["codecs"]
    assert set(manifest["codecs"]) == {"opencv", "simplejpeg", "pillow", "numpy"}
    typed = Manifest.from_json(manifest)
    assert typed.codecs == codec_versions() and typed.to_json() == manifest
    info = runner.invoke(main, ["info", str(out)]).output
    assert f"codecs    opencv {codec_versions()['opencv']}, simplejpeg " in info
    assert json.loads(runner.invoke(main, ["info", str(out), "--json"]).output)["codecs"] == codec_versions()


def test_a_resume_with_other_versions_is_refused(raw, tmp_path):
    out = tmp_path / "out"
    assert _convert(raw, out).exit_code == 0
    (out / MANIFEST_FILE).unlink()  # as if stopped before the end
    _edit_state(out, _older_opencv)
    line = _one_line_refusal(_convert(raw, out))
    assert f"other codec versions (opencv 3.4.0 -> {codec_versions()['opencv']})" in line
    assert "convert with the recorded versions (" in line and "opencv 3.4.0" in line and "--force" in line
    assert not (out / MANIFEST_FILE).exists()
    # --force starts a new output, with this machine's versions.
    assert _convert(raw, out, "--force").exit_code == 0
    assert json.loads((out / MANIFEST_FILE).read_text())["codecs"] == codec_versions()


def test_a_part_run_with_other_versions_is_refused(raw, tmp_path):
    out = tmp_path / "out"
    first = _convert(raw, out, "--part", "0/2")
    assert first.exit_code == 0 and "part 0/2 done" in first.output, first.output
    _edit_state(out, _older_opencv)
    line = _one_line_refusal(_convert(raw, out, "--part", "1/2"))
    assert "other codec versions (opencv 3.4.0 ->" in line and "--part" in line


def test_a_repair_with_other_versions_is_refused(raw, tmp_path):
    out = tmp_path / "out"
    assert _convert(raw, out).exit_code == 0
    _edit_state(out, _older_opencv)
    res = runner.invoke(main, ["verify", str(out), "--repair", "--no-progress"])
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    assert "other codec versions (opencv 3.4.0 ->" in res.output and "byte-identical" in res.output


def test_a_conversion_from_before_versions_were_recorded_still_resumes(raw, tmp_path):
    out = tmp_path / "out"
    assert _convert(raw, out).exit_code == 0
    (out / MANIFEST_FILE).unlink()
    _edit_state(out, lambda state: state.pop("codecs"))
    res = _convert(raw, out)
    assert res.exit_code == 0 and "codec" not in res.output, res.output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert "codecs" not in manifest  # nothing says which versions wrote its shards
    assert "codecs" not in runner.invoke(main, ["info", str(out)]).output
    dry = runner.invoke(main, ["convert", str(raw), str(out), "--workers", "1", "--shard-size", "2", "--dry-run"])
    assert "the run resumes it" in dry.output, dry.output
