"""GPU paths: mixed (nvJPEG) decoding, fp16 NHWC output on the device, bf16 training steps.

Skipped without a GPU (see conftest); run them whenever one is at hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alexnet_pipe.apps.synthetic import SynthConfig, make_image_tree
from alexnet_pipe.config import ConvertConfig, ImageSettings, TrainConfig
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.dataset.mean import load_dataset_mean
from alexnet_pipe.loading.loader import Loader
from alexnet_pipe.loading.pipeline import LoaderConfig
from alexnet_pipe.model import checkpoint
from alexnet_pipe.train.loop import fit

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


def _val_batches(data: Path, **gpu_knobs) -> tuple:
    ds = load_dataset(data)
    mean = load_dataset_mean(data).rgb()[0]
    gpu = next(iter(Loader(ds, LoaderConfig("val", False, 8, crop=224, device_id=0, mean=mean, **gpu_knobs))))
    cpu = next(iter(Loader(ds, LoaderConfig("val", False, 8, crop=224, mean=mean))))
    assert torch.equal(gpu.labels.cpu(), cpu.labels)
    return (gpu.images.cpu().float() - cpu.images.float()).abs(), gpu, cpu


def test_gpu_decoding_with_fancy_upsampling_matches_libjpeg(data):
    # libjpeg-turbo (the CPU decoder) upsamples chroma with its "fancy" filter; asked to do the
    # same, nvJPEG (CUDA decoder; the hardware decoder off, it has no such filter) differs by
    # IDCT rounding only.
    diff, _, _ = _val_batches(data, jpeg_fancy_upsampling=True, hw_decoder_load=0.0)
    assert diff.mean().item() < 1.0
    assert torch.quantile(diff.flatten()[::7], 0.99).item() <= 4.0


def test_gpu_default_decoding_stays_close_to_libjpeg(data):
    # The training default (hardware decoder, plain chroma upsampling) differs from libjpeg at
    # colour edges by more than rounding, but stays close on average: the same augmentation.
    diff, _, _ = _val_batches(data)
    assert diff.mean().item() < 3.0
    assert torch.quantile(diff.flatten()[::7], 0.9).item() <= 12.0


def test_gpu_bf16_training_learns(data, tmp_path):
    # kaiming init: neon's gaussian init is slow to start (see model.py). lr 1e-3: at 3e-3 (CPU,
    # f32, this data) the first epoch's loss reached 15.5 and the run then sat at chance.
    res = fit(TrainConfig(data_dir=data, epochs=8, backend="gpu", datatype="bf16", batch_size=32, lr=0.001,
                          lr_scale="none", init="kaiming", progress=False, save_path=tmp_path / "w.pt"))
    losses = [r["train_loss"] for r in res.history]
    assert losses[-1] < min(losses[0], math.log(4) - 0.02)  # below chance: it learns
    assert res.final is not None and res.final.samples == 32


def test_gpu_roi_decoding_gives_the_whole_decode_pixels(data):
    # The GPU decodes only each crop window (fn.decoders.image_crop, device="mixed"): the same
    # samples, crops and flips as decoding whole and cropping, and the same pixels within one level
    # where nvJPEG's ROI path rounds its IDCT differently (on the CPU they are identical:
    # tests/loading/test_loader_knobs.py).
    ds = load_dataset(data)
    mean = load_dataset_mean(data).rgb()[0]
    out = {}
    for roi in (False, True):
        loader = Loader(ds, LoaderConfig("train", True, 32, crop=224, device_id=0, mean=mean, seed=5, roi_decode=roi))
        assert loader.cfg.roi_decode is roi
        out[roi] = [(b.images.float().cpu(), b.labels.cpu(), b.flipped) for b in loader]
        loader.close()
    assert len(out[False]) == len(out[True]) == 4
    for (a, la, fa), (b, lb, fb) in zip(out[False], out[True]):
        assert torch.equal(la, lb) and torch.equal(fa, fb)
        diff = (a - b).abs()
        assert diff.mean().item() < 0.05 and diff.max().item() <= 1.0, (diff.mean().item(), diff.max().item())


def test_gpu_four_channel_input_is_the_same_network(data):
    # crop_mirror_normalize(pad_output=True) adds a 4th channel; conv1 pads its weight with a zero
    # plane for it: the logits are the 3-channel network's.
    from alexnet_pipe.model.alexnet import AlexNet, AlexNetConfig

    ds = load_dataset(data)
    mean = load_dataset_mean(data).rgb()[0]
    loader = Loader(ds, LoaderConfig("val", False, 8, crop=224, device_id=0, mean=mean, channels_last=True,
                                     pad_channels=True))
    batch = next(iter(loader))
    assert batch.images.shape == (8, 4, 224, 224) and batch.images.is_cuda
    model3 = AlexNet(AlexNetConfig(num_classes=4, crop=224), generator=torch.Generator().manual_seed(0)).cuda().eval()
    model4 = AlexNet(AlexNetConfig(num_classes=4, crop=224), generator=torch.Generator().manual_seed(0),
                     input_channels=4).cuda().eval()
    with torch.inference_mode():
        a = model3(batch.images[:, :3].contiguous(memory_format=torch.channels_last))
        b = model4(batch.images)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_gpu_resumes_a_cpu_checkpoint_with_fused_sgd_and_f16(data, tmp_path):
    # The README lets -b and -d change on resume: a -b cpu checkpoint resumed with -b gpu -d f16
    # keeps the GPU run's fused SGD (a GradScaler step through it raised inside torch before).
    common = dict(data_dir=data, batch_size=32, crop=112, lr=0.001, lr_scale="none", init="kaiming", progress=False,
                  eval_freq=0, serialize=1, checkpoint_path=tmp_path / "a.ckpt")
    fit(TrainConfig(epochs=1, backend="cpu", datatype="f32", data_threads=2, **common))
    res = fit(TrainConfig(epochs=2, backend="gpu", datatype="f16", model_file=tmp_path / "a.ckpt",
                          **{**common, "checkpoint_path": tmp_path / "b.ckpt"}))
    assert len(res.history) == 2 and math.isfinite(res.history[-1]["train_loss"])
    body = checkpoint.load(tmp_path / "b.ckpt")
    assert all(g.get("fused") for g in body["optimizer"]["param_groups"]) and body["scaler"]
