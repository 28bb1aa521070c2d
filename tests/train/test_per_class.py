"""`test --per-class` through the CLI: the JSON names the confusion matrix's axes and lists every
misclassified sample with its source file, true and predicted class and score."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.dataset.records import source_names
from tests.helpers.datasets import train_one_epoch
from tests.helpers.images import make_tree


def _raw(root: Path) -> Path:
    """3 classes; the val image of "ant" is also the val image of "bee" and "cat", so the network
    (one answer for one image) gets at least two of those three wrong."""
    make_tree(root / "raw", {"train": 2, "val": 1}, sizes=((96, 72),))
    for cls in ("bee", "cat"):
        shutil.copy(root / "raw/val/ant/ant_0.jpg", root / f"raw/val/{cls}/same_as_ant.jpg")
    return root / "raw"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("perclass")
    run_convert(ConvertConfig(src=_raw(root), dst=root / "data", workers=1, progress=False,
                              image=ImageSettings(short_side=72)))
    return root / "data"


def test_per_class_json_names_its_axes_and_the_misclassified_files(data, tmp_path):
    runner = CliRunner()
    train_one_epoch(data, tmp_path / "w.pt")
    res = runner.invoke(main, ["test", "-w", str(data), "-b", "cpu", "--model-file", str(tmp_path / "w.pt"),
                               "--no-progress", "--data-threads", "1", "--per-class", str(tmp_path / "pc.json")])
    assert res.exit_code == 0, res.output
    body = json.loads((tmp_path / "pc.json").read_text())
    assert body["confusion_rows"] == "true" and body["confusion_cols"] == "predicted"
    ids = [c["id"] for c in body["classes"]]
    confusion = body["confusion"]
    wrong = body["misclassified"]
    assert len(wrong) == sum(map(sum, confusion)) - sum(confusion[k][k] for k in range(3)) >= 2
    cells = {}
    for row in wrong:
        assert row["true"] != row["predicted"] and 0.0 < row["score"] <= 1.0
        assert set(row) == {"record", "file", "true", "predicted", "score"}
        cells[ids.index(row["true"]), ids.index(row["predicted"])] = cells.get(
            (ids.index(row["true"]), ids.index(row["predicted"])), 0) + 1
    assert all(confusion[i][j] == n for (i, j), n in cells.items())  # each listed mistake is in its cell
    assert sum(row["file"] == f"{row['true']}/same_as_ant.jpg" or row["file"] == "ant/ant_0.jpg" for row in wrong) >= 2
    assert all((data.parent / "raw" / "val" / row["file"]).is_file() for row in wrong)
    assert [r["score"] for r in wrong] == sorted((r["score"] for r in wrong), reverse=True)  # surest first
    assert "misclassified_files" in body


def test_recordio_only_datasets_name_no_files(tmp_path):
    run_convert(ConvertConfig(src=_raw(tmp_path), dst=tmp_path / "data", formats=("recordio",), workers=1,
                              progress=False, image=ImageSettings(short_side=72)))
    ds = load_dataset(tmp_path / "data")
    assert source_names(ds, "val", [0, 2]) is None
    run_convert(ConvertConfig(src=tmp_path / "raw", dst=tmp_path / "both", workers=1, progress=False,
                              image=ImageSettings(short_side=72)))
    names = source_names(load_dataset(tmp_path / "both"), "val", [0, 1, 2, 3, 4])
    assert sorted(names) == ["ant/ant_0.jpg", "bee/bee_0.jpg", "bee/same_as_ant.jpg", "cat/cat_0.jpg",
                             "cat/same_as_ant.jpg"]
