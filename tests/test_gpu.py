"""GPU paths: mixed (nvJPEG) decoding, fp16 NHWC output on the device, bf16 training steps.

Skipped without a GPU (see conftest); run them whenever one is at hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alexnet_pipe.config import ConvertConfig, ImageSettings, TrainConfig
from alexnet_pipe.convert import run_convert
from alexnet_pipe.manifest import load_dataset
from alexnet_pipe.mean import load_dataset_mean
from alexnet_pipe.pipeline import Loader, LoaderConfig
from alexnet_pipe.synthetic import SynthConfig, make_image_tree
from alexnet_pipe.train import fit

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu")
    make_image_tree(SynthConfig(root / "raw", 32, 8, (320, 240), ("circle", "square", "star", "ring")))
    run_convert(ConvertConfig(src=root / "raw", dst=root / "data", formats=("lmdb", "recordio"), shard_size=50,
                              workers=2, progress=False, image=ImageSettings(short_side=256)))
    return root / "data"


@pytest.mark.parametrize("reader", ["lmdb", "recordio"])
def test_gpu_pipeline_output_is_fp16_channels_last_on_the_device(data, reader):
    ds = load_dataset(data)
    mean = load_dataset_mean(data).rgb()[0]
    loader = Loader(ds, LoaderConfig("train", True, 32, crop=224, device_id=0, fp16=True, channels_last=True,
                                     mean=mean, reader=reader))
    batches = list(loader)
    assert sum(b.labels.shape[0] for b in batches) == 128
    b = batches[0]
    assert b.images.is_cuda and b.images.dtype == torch.float16 and b.images.shape == (32, 3, 224, 224)
    assert b.images.is_contiguous(memory_format=torch.channels_last)
    assert b.labels.is_cuda and b.labels.dtype == torch.int64
    # mean subtracted: values centred near zero, within the 0..255 range shifted by the mean
    assert -256 < b.images.float().min() and b.images.float().max() < 256
    assert abs(b.images.float().mean().item()) < 40


def test_gpu_and_cpu_validation_batches_agree(data):
    ds = load_dataset(data)
    mean = load_dataset_mean(data).rgb()[0]
    gpu = next(iter(Loader(ds, LoaderConfig("val", False, 8, crop=224, device_id=0, mean=mean))))
    cpu = next(iter(Loader(ds, LoaderConfig("val", False, 8, crop=224, mean=mean))))
    assert torch.equal(gpu.labels.cpu(), cpu.labels)
    # nvJPEG and libjpeg-turbo differ by rounding only
    assert (gpu.images.cpu() - cpu.images).abs().mean().item() < 2.0


def test_gpu_bf16_training_learns(data, tmp_path):
    res = fit(TrainConfig(data_dir=data, epochs=4, backend="gpu", datatype="bf16", batch_size=32, lr=0.001, lr_scale="none",
                          progress=False, save_path=tmp_path / "w.pt"))
    losses = [r["train_loss"] for r in res.history]
    assert losses[-1] < losses[0]
    assert res.final is not None and res.final.samples == 32
