"""What a conversion skipped is counted once, the same way everywhere (issue 21 item 7): convert's
summary, the manifest's ``skipped`` list and per-split counts, ``info`` and ``info --json``; list-file
datasets show the listed path; convert names the first skipped inputs and where the full list is."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from alexnet_pipe.cli import main
from tests.helpers.images import make_tree

runner = CliRunner()


def _run(args: list[str]) -> str:
    res = runner.invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def _counts(out: Path) -> tuple[int, list[str], dict]:
    """(skips the manifest lists, info's skipped lines, info --json)."""
    manifest = json.loads((out / "manifest.json").read_text())
    text = _run(["info", out])
    as_json = json.loads(_run(["info", out, "--json"]))
    return len(manifest["skipped"]), [line for line in text.splitlines() if line.startswith("skipped")], as_json


def _split_skipped(info_text: str) -> int:
    return sum(int(line.split(" skipped")[0].rsplit(",", 1)[1]) for line in info_text.splitlines()
               if line.startswith(("train ", "val ")))


def test_a_raw_tree_with_junk_counts_its_skips_once_everywhere(tmp_path):
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 2, "val": 1})
    (raw / "train" / "ant" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: not an input at all
    (raw / "train" / "bee" / "page.JPEG").write_text("<html><body>404 not found</body></html>")
    good = (raw / "train" / "cat" / "cat_0.jpg").read_bytes()
    (raw / "train" / "cat" / "cut.jpg").write_bytes(good[: len(good) // 3])
    (raw / "train" / "__MACOSX" / "ant").mkdir(parents=True)
    (raw / "train" / "__MACOSX" / "ant" / "._ant_0.jpg").write_bytes(b"\0\5\26\7")
    out = tmp_path / "out"
    summary = _run(["convert", raw, out, "--no-progress", "--workers", "1"])

    listed, lines, as_json = _counts(out)
    assert listed == 3, lines  # __MACOSX/, page.JPEG, cut.jpg (.DS_Store is no input)
    assert f"records, {listed} skipped" in summary
    text = _run(["info", out])
    assert _split_skipped(text) == listed, text
    assert sum(s["skipped"] for s in as_json["splits"].values()) == len(as_json["skipped"]) == listed
    manifest = json.loads((out / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert train["skipped"] == listed and train["records"] + train["skipped"] == train["inputs"]
    # convert names what it skipped, with why, and where the full list is.
    assert "train/__MACOSX/: macOS archive metadata folder, not a class" in summary
    assert "train/bee/page.JPEG: not an image" in summary
    assert f"alexnet-pipe info {out}" in summary
    assert "train/bee/page.JPEG: not an image" in "\n".join(lines)


def test_a_list_dataset_counts_and_names_its_skipped_entry(tmp_path):
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 2, "val": 1})
    train = tmp_path / "train.txt"
    train.write_text("train/ant/ant_0.jpg 0\ntrain/bee/bee_0.jpg 1\ntrain/cat/cat_1.jpg 2\n")
    val = tmp_path / "val.txt"
    val.write_text("val/ant/ant_0.jpg 0\nval/nope.jpg 1\n")
    out = tmp_path / "out"
    summary = _run(["convert", raw, out, "--no-progress", "--workers", "1", "--list", train, "--list-val", val])

    listed, lines, as_json = _counts(out)
    assert listed == 1 and "records, 1 skipped" in summary
    text = _run(["info", out])
    assert _split_skipped(text) == 1, text
    assert as_json["splits"]["val"]["skipped"] == 1
    assert lines == ["skipped   val/nope.jpg: val.txt line 2: no such file under RAW"], lines
    assert "val/nope.jpg: val.txt line 2: no such file under RAW" in summary and "val/val/" not in summary
