"""The RGB covariance convert records for PCA lighting (Krizhevsky et al. 2012, section 4.1):
exact sums of products over the mean's pixels, merged like the channel sums, shown by info."""

from __future__ import annotations

import io
import json
from pathlib import Path

import lmdb
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from alexnet_pipe.cli import main
from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.dataset.mean import eigen, read_mean_file
from alexnet_pipe.errors import DatasetError
from alexnet_pipe.formats.datum import decode_datum
from tests.helpers.images import pass_through_tree
from tests.helpers.pixels import float32_limit_sums

SIZE = 48


def convert(src: Path, dst: Path, **kw) -> None:
    opts = {"formats": ("lmdb",), "shard_size": 4, "workers": 1, "progress": False,
            "image": ImageSettings(short_side=SIZE)}
    opts.update(kw)
    run_convert(ConvertConfig(src=src, dst=dst, **opts))


@pytest.fixture
def exact_tree(tmp_path) -> Path:
    """Baseline JPEGs whose short side is already 48: all pass through, so the stored bytes are
    the pixels the statistics summed, exactly."""
    return pass_through_tree(tmp_path / "raw")


def stored_centre_pixels(root: Path) -> np.ndarray:
    """(N, 3) int64 RGB: the centre SIZE x SIZE of every stored train record, decoded by Pillow and
    cut out here (the rule written out, not taken from centre_box)."""
    out = []
    for path in load_dataset(root).lmdb_paths("train"):
        with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
            for _, value in txn.cursor():
                arr = np.asarray(Image.open(io.BytesIO(decode_datum(value).data)).convert("RGB"))
                h, w = arr.shape[:2]
                ch, cw = min(SIZE, h), min(SIZE, w)
                y, x = (h - ch) // 2, (w - cw) // 2
                out.append(arr[y : y + ch, x : x + cw].reshape(-1, 3))
    return np.concatenate(out).astype(np.int64)


def test_covariance_is_that_of_the_stored_pixels(exact_tree, tmp_path):
    out = tmp_path / "out"
    convert(exact_tree, out)
    flat = stored_centre_pixels(out)
    mean = read_mean_file(out / "mean.json")
    assert mean.pixels == len(flat)
    # Exact: the same integer numerators, one division.
    n, s = len(flat), [int(v) for v in flat.sum(0)]
    exact = [[(n * int((flat[:, i] * flat[:, j]).sum()) - s[i] * s[j]) / (n * n) for j in range(3)] for i in range(3)]
    assert [list(row) for row in mean.covariance] == exact
    np.testing.assert_allclose(mean.covariance, np.cov(flat.T, bias=True), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(np.sqrt(np.diag(mean.covariance)), mean.std, rtol=1e-12)
    # The eigen-decomposition stored beside it: descending, unit vectors, largest component positive.
    obj = json.loads((out / "mean.json").read_text())
    assert obj["covariance"] == exact
    assert (obj["eigenvalues"], obj["eigenvectors"]) == eigen(exact)
    values, vectors = np.array(obj["eigenvalues"]), np.array(obj["eigenvectors"])
    assert (np.diff(values) <= 0).all() and values[-1] >= 0
    for value, vector in zip(values, vectors):
        np.testing.assert_allclose(np.array(exact) @ vector, value * vector, atol=1e-9)
        assert vector[np.argmax(np.abs(vector))] > 0
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(3), atol=1e-12)
    # The completion record keeps the exact sums of products, r*g, r*b, g*b.
    part = json.loads((out / ".parts" / "train-00000.json").read_text())
    assert set(part["stats"]) == {"images", "pixels", "sums", "sq_sums", "cross_sums"}


def test_covariance_same_for_workers_and_parts(exact_tree, tmp_path):
    convert(exact_tree, tmp_path / "one")
    convert(exact_tree, tmp_path / "two", workers=2)
    for i in range(2):
        convert(exact_tree, tmp_path / "parts", part=(i, 2))
    if not (tmp_path / "parts" / "manifest.json").exists():
        convert(exact_tree, tmp_path / "parts")  # finish: nothing left to convert
    one = (tmp_path / "one" / "mean.json").read_bytes()
    assert b'"covariance"' in one and b'"eigenvectors"' in one
    assert (tmp_path / "two" / "mean.json").read_bytes() == one
    assert (tmp_path / "parts" / "mean.json").read_bytes() == one


def test_info_shows_the_covariance_and_old_datasets_have_none(exact_tree, tmp_path):
    out = tmp_path / "out"
    convert(exact_tree, out)
    res = CliRunner().invoke(main, ["info", str(out)])
    assert res.exit_code == 0, res.output
    cov = read_mean_file(out / "mean.json").covariance
    line = next(x for x in res.output.splitlines() if x.startswith("covar"))
    assert line == "covar     RGB " + " ".join("(" + ", ".join(f"{v:.2f}" for v in row) + ")" for row in cov)
    assert "PCA lighting" in res.output
    info = json.loads(CliRunner().invoke(main, ["info", str(out), "--json"]).output)
    assert info["mean"]["covariance_rgb"] == [list(row) for row in cov]
    assert (info["mean"]["eigenvalues"], info["mean"]["eigenvectors"]) == eigen(cov)
    # A dataset converted before: completion records without cross_sums give a mean.json without a covariance.
    for path in (out / ".parts").glob("train-*.json"):
        obj = json.loads(path.read_text())
        del obj["stats"]["cross_sums"]
        path.write_text(json.dumps(obj))
    (out / "manifest.json").unlink()
    (out / "mean.json").unlink()
    convert(exact_tree, out)
    obj = json.loads((out / "mean.json").read_text())
    assert "covariance" not in obj and "eigenvalues" not in obj and obj["std"]
    assert read_mean_file(out / "mean.json").covariance is None
    res = CliRunner().invoke(main, ["info", str(out)])
    assert res.exit_code == 0 and "covar     not recorded" in res.output


@pytest.mark.parametrize("bad", [[[1, 2, 3], [2, 1, 0], [3, 0, 1.5]][:2], [[1, 2, 3], [2.5, 1, 0], [3, 0, 1]],
                                 [[1, 0, 0], [0, float("nan"), 0], [0, 0, 1]], [[1, 0, 0], [0, True, 0], [0, 0, 1]]])
def test_damaged_covariance_is_refused(exact_tree, tmp_path, bad):
    out = tmp_path / "out"
    convert(exact_tree, out)
    obj = json.loads((out / "mean.json").read_text())
    obj["covariance"] = bad
    (out / "mean.json").write_text(json.dumps(obj))
    with pytest.raises(DatasetError, match="covariance"):
        read_mean_file(out / "mean.json")


@pytest.mark.parametrize("images", [258, 259])  # float32 canvases up to 258 boxes, float64 after
def test_cross_sums_are_exact_at_the_float32_limit(images):
    size = 8
    arrays, sums = float32_limit_sums(images, size)
    flat = []
    for a in arrays:
        h, w = a.shape[:2]
        ch, cw = min(size, h), min(size, w)
        flat.append(a[(h - ch) // 2:][:ch, (w - cw) // 2:][:, :cw].reshape(-1, 3))
    flat = np.concatenate(flat).astype(np.int64)
    stats = sums.stats()
    r, g, b = flat.T
    assert stats.cross_sums == [int((r * g).sum()), int((r * b).sum()), int((g * b).sum())]
    np.testing.assert_allclose(stats.covariance(), np.cov(flat.T, bias=True), rtol=1e-12, atol=1e-9)


def test_verify_reports_an_edited_covariance(exact_tree, tmp_path):
    out = tmp_path / "out"
    convert(exact_tree, out)
    args = ["verify", str(out), "--workers", "1", "--quick"]
    assert CliRunner().invoke(main, args).exit_code == 0
    obj = json.loads((out / "mean.json").read_text())
    obj["covariance"][0][1] += 1.0
    obj["covariance"][1][0] += 1.0
    (out / "mean.json").write_text(json.dumps(obj))
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and "covariance" in res.output and "pixel sums convert recorded" in res.output
