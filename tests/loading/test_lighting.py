"""PCA lighting (Krizhevsky et al. 2012, section 4.1) in the loader: alphas from (seed, epoch,
sample) in order.py, applied as a per-sample normalisation mean in the DALI graph."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet_pipe.apps.synthetic import SynthConfig, make_image_tree
from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.dataset.mean import eigen, read_mean_file
from alexnet_pipe.errors import ConfigError
from alexnet_pipe.loading.loader import Loader
from alexnet_pipe.loading.order import OrderConfig, epoch_share
from alexnet_pipe.loading.pipeline import LoaderConfig

CROP = 67


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lighting")
    make_image_tree(SynthConfig(root / "raw", 5, 1, (96, 72), ("circle", "square", "hstripes"), seed=3))
    run_convert(ConvertConfig(src=root / "raw", dst=root / "data", formats=("lmdb",), shard_size=10,
                              workers=1, progress=False, image=ImageSettings(short_side=72)))
    return root / "data"


def _batches(ds, cfg: LoaderConfig, epoch: int) -> list[torch.Tensor]:
    loader = Loader(ds, cfg, epoch)
    try:
        return [b.images.clone() for b in loader]
    finally:
        loader.close()


def test_alphas_are_pure_and_lighting_zero_changes_nothing():
    base = OrderConfig(23, True, seed=4, rank=1, world_size=2)
    lit = replace(base, lighting=0.1)
    a, b = epoch_share(base, 3), epoch_share(lit, 3)
    assert a.alpha is None and b.alpha.shape == (len(b), 3)
    for name in ("indices", "valid", "crop_x", "crop_y", "mirror"):  # the other draws are untouched
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(epoch_share(lit, 3).alpha, b.alpha)  # a function of (seed, epoch) alone
    assert not np.array_equal(epoch_share(lit, 4).alpha, b.alpha)
    # The same global position gets the same alphas on 1 rank as on 2.
    one = epoch_share(replace(lit, rank=0, world_size=1), 3)
    np.testing.assert_array_equal(one.alpha[1::2][: int(b.valid.sum())], b.alpha[b.valid])
    many = epoch_share(OrderConfig(20000, True, seed=1, lighting=0.1), 0).alpha
    assert abs(many.std() - 0.1) < 0.003 and abs(many.mean()) < 0.003
    assert epoch_share(replace(lit, train=False), 0).alpha is None  # val: never
    with pytest.raises(ConfigError, match="lighting"):
        OrderConfig(5, True, lighting=-0.1)
    with pytest.raises(ConfigError, match="lighting"):
        LoaderConfig("val", False, 4, lighting=0.1, eigen=((1.0, 1.0, 1.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1))))
    with pytest.raises(ConfigError, match="eigenvectors"):
        LoaderConfig("train", True, 4, lighting=0.1)


@pytest.mark.parametrize("order,roi,std", [("RGB", True, (60.0, 50.0, 40.0)), ("BGR", False, None)])
def test_lit_batch_minus_plain_batch_is_each_samples_offset(shapes, order, roi, std):
    """(x - (mean - offset)) / std - (x - mean) / std = offset / std, per sample and channel."""
    ds = load_dataset(shapes)
    mean = read_mean_file(shapes / "mean.json")
    values, vectors = eigen(mean.rgb_covariance())
    sigma, epoch, seed = 0.1, 2, 9
    mean_in = (120.0, 110.0, 100.0)
    base = LoaderConfig("train", True, batch_size=4, crop=CROP, seed=seed, mean=mean_in, std=std,
                        channel_order=order, roi_decode=roi, num_threads=1)
    plain = _batches(ds, base, epoch)
    lit = _batches(ds, replace(base, lighting=sigma, eigen=(tuple(values), tuple(map(tuple, vectors)))), epoch)
    alpha = epoch_share(OrderConfig(15, True, seed, lighting=sigma), epoch).alpha  # 3 classes x 5
    # The paper's offset, written out: sum_i alpha_i * lambda_i * p_i with the lambdas of 0..1 pixel values
    # (mean.json's 0..255 ones / 255^2), times 255 for 0..255 pixels, in RGB; then in the decoded order.
    lam01 = np.array(values) / 255.0**2
    offset = 255.0 * np.stack([sum(a[i] * lam01[i] * np.array(vectors[i]) for i in range(3)) for a in alpha])
    if order == "BGR":
        offset = offset[:, ::-1]
    offset = offset / np.array(std or (1.0, 1.0, 1.0))
    assert len(plain) == len(lit) == 4 and np.abs(offset).max() > 1e-3
    k = 0
    for a, b in zip(plain, lit):
        diff = (b - a).double().numpy()  # N x 3 x H x W
        for sample in diff:
            expected = offset[k][:, None, None] * np.ones_like(sample)
            np.testing.assert_allclose(sample, expected, rtol=1e-6, atol=1e-4)  # float32 rounding
            k += 1
    assert k == 15
    # Off gives the very batches of a loader without the option.
    again = _batches(ds, replace(base, lighting=0.0), epoch)
    assert all(torch.equal(a, b) for a, b in zip(plain, again))


def test_train_lighting_reaches_the_loader_metrics_and_config(shapes, tmp_path):
    import json

    from alexnet_pipe.cli import train as train_cmd
    from alexnet_pipe.config import TrainConfig
    from alexnet_pipe.errors import DatasetError
    from alexnet_pipe.train.loop import fit
    from alexnet_pipe.train.runtime import open_run

    assert train_cmd.make_context("train", ["-w", str(shapes), "--lighting", "0.1"]).params["lighting"] == 0.1
    assert train_cmd.make_context("train", ["-w", str(shapes)]).params["lighting"] == 0.0
    common = dict(data_dir=shapes, backend="cpu", crop=CROP, batch_size=8, data_threads=1, epochs=1, eval_freq=0,
                  progress=False, lr=0.001, lr_scale="none")
    assert "lighting" not in TrainConfig(**common).to_dict()  # off: checkpoints and configs as before
    cfg = TrainConfig(**common, lighting=0.1, output_file=tmp_path / "m.jsonl")
    assert cfg.to_dict()["lighting"] == 0.1
    rt = open_run(cfg)
    lc, val = rt.loader_config("train", True), rt.loader_config("val", False)
    values, vectors = eigen(read_mean_file(shapes / "mean.json").rgb_covariance())
    assert (lc.lighting, lc.eigen) == (0.1, (tuple(values), tuple(map(tuple, vectors))))
    assert (val.lighting, val.eigen) == (0.0, None)
    rt.close()
    fit(cfg)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert next(r for r in rows if r.get("epoch") == 1 and "step" not in r)["lighting"] == 0.1
    with pytest.raises(ValueError, match="--lighting"):
        TrainConfig(data_dir=shapes, lighting=-1.0)
    # A dataset converted before the covariance was recorded: one line saying to reconvert.
    old = tmp_path / "old"
    import shutil

    shutil.copytree(shapes, old)
    obj = json.loads((old / "mean.json").read_text())
    for key in ("covariance", "eigenvalues", "eigenvectors"):
        del obj[key]
    (old / "mean.json").write_text(json.dumps(obj))
    rt = open_run(replace(cfg, data_dir=old))
    try:
        with pytest.raises(DatasetError, match="rerun the alexnet-pipe convert") as err:
            rt.loader_config("train", True)
        assert "\n" not in str(err.value)
    finally:
        rt.close()
