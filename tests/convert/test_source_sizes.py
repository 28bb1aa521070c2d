"""The inputs' original short sides are recorded (a thumbnail scaled up 8x is no longer hidden behind
a stored short side of 256), and ``convert --min-short-side N`` skips the smaller ones with a reason
(issue 21 item 13)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from alexnet_pipe.cli import main
from tests.helpers.images import make_tree, smooth_image, write_jpeg

runner = CliRunner()


def _raw(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 1, "val": 1})  # train short sides 72, 200, 64
    write_jpeg(raw / "train" / "ant" / "thumb.jpg", smooth_image(99, 32, 24))
    return raw


def _convert(raw: Path, out: Path, *extra: str):
    res = runner.invoke(main, ["convert", str(raw), str(out), "--no-progress", "--workers", "1", *extra])
    assert res.exit_code == 0, res.output
    return res.output, json.loads((out / "manifest.json").read_text())


def test_original_short_sides_and_upscales_are_recorded(tmp_path):
    out = tmp_path / "out"
    _, manifest = _convert(_raw(tmp_path), out)
    train = manifest["splits"]["train"]
    assert train["min_short_side"] == 256  # what was stored says nothing of the thumbnail...
    assert train["source_short_side_counts"] == {"24": 1, "64": 1, "72": 1, "200": 1}  # ...this does
    assert train["upscaled_over_2x"] == 3  # 24, 64 and 72 -> 256; 200 -> 256 is 1.28x
    info = runner.invoke(main, ["info", str(out)]).output
    assert "originals: smallest short side 24 px, 3 images scaled up more than 2x" in info
    as_json = json.loads(runner.invoke(main, ["info", str(out), "--json"]).output)
    assert as_json["splits"]["train"]["upscaled_over_2x"] == 3


def test_min_short_side_skips_small_inputs_with_a_reason(tmp_path):
    out = tmp_path / "out"
    summary, manifest = _convert(_raw(tmp_path), out, "--min-short-side", "64")
    reasons = {s["name"]: s["reason"] for s in manifest["skipped"]}
    assert reasons == {"ant/thumb.jpg": "its short side, 24 px (32x24), is below --min-short-side 64"}
    assert manifest["splits"]["train"]["records"] == 3 and manifest["settings"]["min_short_side"] == 64
    assert "skipped   train/ant/thumb.jpg: its short side, 24 px (32x24), is below --min-short-side 64" in summary
    res = runner.invoke(main, ["convert", str(tmp_path / "raw"), str(tmp_path / "o2"), "--min-short-side", "-1"])
    assert res.exit_code == 2 and "--min-short-side" in res.output


def test_shards_converted_before_sizes_were_recorded_leave_them_out(tmp_path):
    out = tmp_path / "out"
    _convert(_raw(tmp_path), out)
    for record in (out / ".parts").glob("*.json"):  # as written before the fields existed
        part = json.loads(record.read_text())
        for key in ("source_short_side_counts", "upscaled_over_2x"):
            part.pop(key)
        record.write_text(json.dumps(part))
    (out / "manifest.json").unlink()
    _, manifest = _convert(tmp_path / "raw", out)  # resumes: every shard is complete
    assert "upscaled_over_2x" not in manifest["splits"]["train"]
    assert "source_short_side_counts" not in manifest["splits"]["train"]
    assert "originals:" not in runner.invoke(main, ["info", str(out)]).output
