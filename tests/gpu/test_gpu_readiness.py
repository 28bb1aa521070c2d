"""GPU correctness defects (issue 19 part 3), reproduced and proved on the CPU.

1. Resuming with other -b/-d keeps this run's optimizer implementation (fused SGD on the GPU).
2. The GPU a rank takes under torchrun / SLURM / per-rank CUDA_VISIBLE_DEVICES (faked environments).
3. DALI's reader processes need /dev/shm: the estimate, against real DALI, and the refusal.
4. `test --per-class` counts on the device without torch.bincount (which syncs the host on CUDA).
"""

from __future__ import annotations

import itertools
import logging
import os
import types
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alexnet_pipe.apps.synthetic import SynthConfig, make_image_tree
from alexnet_pipe.config import ConvertConfig, ImageSettings, TrainConfig
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.errors import TrainingError
from alexnet_pipe.loading.loader import Batch, Loader
from alexnet_pipe.loading.pipeline import LoaderConfig
from alexnet_pipe.model import checkpoint
from alexnet_pipe.model.params import param_groups
from alexnet_pipe.train import state as train_state
from alexnet_pipe.train.distributed import Dist, DistConfig
from alexnet_pipe.train.epoch import update
from alexnet_pipe.train.evaluate import evaluate
from alexnet_pipe.train.loop import fit

CROP = 67


# ---------------------------------------------------------------- 1. resuming the optimizer

# What a run chooses with -b and -d, as train.fit builds it: -b gpu gives a fused SGD
# (fused=(device.type == "cuda") or None), -d f16 a GradScaler. CPU torch has fused SGD and a
# CPU GradScaler, so every pair of choices is built here for real: "gpu" is the fused optimizer.
CHOICES = [(backend, dtype) for backend in ("cpu", "gpu") for dtype in ("f32", "bf16", "f16")]
AMP = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def _run_parts(backend: str, dtype: str, seed: int = 0):
    """(model, optimizer, scaler) exactly as fit builds them for -b ``backend`` -d ``dtype``."""
    torch.manual_seed(seed)
    model = _Tiny()
    opt = torch.optim.SGD(param_groups(model, 0.01, 5e-4), lr=0.01, momentum=0.9,
                          fused=(backend == "gpu") or None)
    scaler = torch.amp.GradScaler("cpu") if dtype == "f16" else None
    return model, opt, scaler


def _step(model, opt, scaler, dtype: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)
    with torch.autocast("cpu", dtype=AMP[dtype]) if AMP[dtype] else nullcontext():
        loss = F.cross_entropy(model(x).float(), y)
    update(loss, opt, scaler)


def _implementation(opt) -> list[tuple]:
    return [(g["fused"], g["foreach"], g["differentiable"]) for g in opt.param_groups]


@pytest.mark.parametrize("before,after", list(itertools.product(CHOICES, CHOICES)),
                         ids=lambda c: "-".join(c))
def test_resume_keeps_this_runs_optimizer_for_every_backend_and_datatype_pair(before, after):
    """A checkpoint from (-b, -d) ``before`` resumed with ``after``: the groups step the way this run
    built them (fused on the GPU), the momentum buffers and hyperparameters come back, and real
    steps follow, with the GradScaler where -d f16 asks for one (before the fix: "Expected grad_scale
    and found_inf to be None" from torch, cpu -> gpu f16)."""
    model, opt, scaler = _run_parts(*before)
    for k in range(2):
        _step(model, opt, scaler, before[1], k)
    body = {"optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else None, "epoch": 1,
            "partial": None, "history": []}
    saved_state = {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()}

    model2, opt2, scaler2 = _run_parts(*after, seed=1)
    model2.load_state_dict(model.state_dict())
    built = _implementation(opt2)
    restored = train_state.restore(body, opt2, scaler2)

    assert restored.start_epoch == 1
    assert [g["name"] for g in opt2.param_groups] == ["weights", "biases"]
    for k, buf in opt2.state_dict()["state"].items():
        assert torch.equal(buf["momentum_buffer"], saved_state[k])
    resumed = _implementation(opt2)
    before_step = [p.detach().clone() for p in model2.parameters()]
    for k in range(2, 4):  # first the real steps: the failure torch raised, where it raised
        _step(model2, opt2, scaler2, after[1], k)
    moved = [not torch.equal(a, p.detach()) for a, p in zip(before_step, model2.parameters())]
    assert any(moved) and all(torch.isfinite(p).all() for p in model2.parameters())
    assert resumed == built
    assert [g["fused"] for g in opt2.param_groups] == [True if after[0] == "gpu" else None] * 2


class _GpuSGD(torch.optim.SGD):
    """What fit builds with -b gpu (``fused=True``), built on the CPU."""

    def __init__(self, params, **kw):
        kw["fused"] = True
        super().__init__(params, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ready")
    make_image_tree(SynthConfig(root / "raw", 4, 2, (96, 72), ("circle", "square", "hstripes"), seed=3))
    run_convert(ConvertConfig(src=root / "raw", dst=root / "data", formats=("lmdb", "recordio"), shard_size=5,
                              workers=1, progress=False, image=ImageSettings(short_side=72)))
    return root / "data"


def _tcfg(data: Path, **kw) -> TrainConfig:
    base = {"backend": "cpu", "datatype": "f32", "crop": CROP, "batch_size": 6, "lr": 0.001, "lr_scale": "none",
            "progress": False, "data_threads": 1, "eval_freq": 0, "serialize": 1}
    return TrainConfig(data_dir=data, **{**base, **kw})


def test_fit_resumes_a_cpu_checkpoint_as_a_fused_f16_run_and_back(tiny, tmp_path, monkeypatch):
    """End to end on the real AlexNet: a -b cpu checkpoint resumed as -b gpu -d f16 builds it
    (fused SGD and a GradScaler; before the fix torch raised "Expected grad_scale and found_inf to
    be None" at the first step), and that checkpoint resumed with -b cpu steps unfused again."""
    a, b, c = tmp_path / "a.ckpt", tmp_path / "b.ckpt", tmp_path / "c.ckpt"
    fit(_tcfg(tiny, epochs=1, checkpoint_path=a, save_path=tmp_path / "a.pt"))
    assert {g["fused"] for g in checkpoint.load(a)["optimizer"]["param_groups"]} == {None}
    with monkeypatch.context() as m:
        m.setattr(torch.optim, "SGD", _GpuSGD)
        res = fit(_tcfg(tiny, epochs=2, model_file=a, datatype="f16", checkpoint_path=b, save_path=tmp_path / "b.pt"))
    assert len(res.history) == 2 and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in res.history)
    body = checkpoint.load(b)
    assert {g["fused"] for g in body["optimizer"]["param_groups"]} == {True}
    assert body["scaler"] is not None and body["scaler"]["scale"] > 0
    fit(_tcfg(tiny, epochs=3, model_file=b, checkpoint_path=c, save_path=tmp_path / "c.pt"))
    assert {g["fused"] for g in checkpoint.load(c)["optimizer"]["param_groups"]} == {None}  # -b cpu's own


# ---------------------------------------------------------------- 2. which GPU a rank takes

def _env(**kw) -> dict[str, str]:
    return {k: str(v) for k, v in kw.items()}


@pytest.mark.parametrize("env,count,expected", [
    # torchrun on an 8-GPU machine: LOCAL_RANK indexes the visible devices
    (_env(RANK=5, WORLD_SIZE=8, LOCAL_RANK=5, LOCAL_WORLD_SIZE=8), 8, 5),
    # torchrun with CUDA_VISIBLE_DEVICES naming 2 of the GPUs for 2 ranks
    (_env(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2, CUDA_VISIBLE_DEVICES="4,5"), 2, 1),
    # SLURM --gpus-per-task=1, srun + torchrun per task (--nproc-per-node 1): each task sees its GPU
    (_env(RANK=3, WORLD_SIZE=4, LOCAL_RANK=0, LOCAL_WORLD_SIZE=1, SLURM_LOCALID=3, SLURM_GPUS_PER_TASK=1,
          CUDA_VISIBLE_DEVICES="3"), 1, 0),
    # SLURM --gpus-per-task=1, ranks started by srun with LOCAL_RANK=$SLURM_LOCALID exported
    (_env(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, SLURM_LOCALID=1, SLURM_GPUS_PER_TASK=1,
          CUDA_VISIBLE_DEVICES="1"), 1, 0),
    # the same without LOCAL_RANK: SLURM_LOCALID stands in for it
    (_env(RANK=1, WORLD_SIZE=2, SLURM_LOCALID=1, SLURM_GPUS_PER_TASK=1, CUDA_VISIBLE_DEVICES="1"), 1, 0),
    # SLURM --gpus-per-task=2 (typed gres): the task's first own GPU
    (_env(RANK=3, WORLD_SIZE=4, SLURM_LOCALID=1, SLURM_GPUS_PER_TASK="h100:2", CUDA_VISIBLE_DEVICES="2,3"), 2, 0),
    # srun --ntasks-per-node=1 --gpus-per-task=4 torchrun --nproc-per-node 4: LOCAL_RANK within the task
    (_env(RANK=6, WORLD_SIZE=8, LOCAL_RANK=2, LOCAL_WORLD_SIZE=4, SLURM_LOCALID=0, SLURM_GPUS_PER_TASK=4,
          CUDA_VISIBLE_DEVICES="0,1,2,3"), 4, 2),
    # SLURM without per-task binding (--gres=gpu:4, one task per GPU): SLURM_LOCALID indexes them
    (_env(RANK=2, WORLD_SIZE=4, SLURM_LOCALID=2), 4, 2),
    # a launcher that sets CUDA_VISIBLE_DEVICES=$LOCAL_RANK per rank
    (_env(RANK=3, WORLD_SIZE=4, LOCAL_RANK=3, LOCAL_WORLD_SIZE=4, CUDA_VISIBLE_DEVICES="3"), 1, 0),
    (_env(RANK=0, WORLD_SIZE=4, LOCAL_RANK=0, LOCAL_WORLD_SIZE=4, CUDA_VISIBLE_DEVICES="GPU-8a1f"), 1, 0),
    # no local rank at all, but only one device to take
    (_env(RANK=1, WORLD_SIZE=2), 1, 0),
    # a CPU run (no CUDA device): nothing to choose, the local rank passes through
    (_env(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1), 0, 1),
])
def test_each_rank_takes_its_own_gpu(env, count, expected):
    from alexnet_pipe.train.distributed import local_device

    assert local_device(env, count) == expected


@pytest.mark.parametrize("env,count,words", [
    # 2 ranks, one visible GPU, nothing says it is per rank: they would share it
    (_env(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2), 1, "local rank 1 of 2"),
    # rank 0 refuses too: every rank stops with the same line, none waits for the others
    (_env(RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, LOCAL_WORLD_SIZE=2), 1, "local rank 0 of 2"),
    (_env(RANK=0, WORLD_SIZE=4, LOCAL_RANK=0, LOCAL_WORLD_SIZE=4, CUDA_VISIBLE_DEVICES="0,1,2"), 3,
     "CUDA_VISIBLE_DEVICES=0,1,2"),
    # each rank sees 2 GPUs but 4 ranks run here: which 2 of them is whose cannot be told
    (_env(RANK=3, WORLD_SIZE=4, LOCAL_RANK=3, LOCAL_WORLD_SIZE=4, CUDA_VISIBLE_DEVICES="6,7"), 2, "sees 2 GPU"),
    # RANK/WORLD_SIZE by hand, no LOCAL_RANK, several GPUs
    (_env(RANK=1, WORLD_SIZE=2), 4, "neither LOCAL_RANK nor SLURM_LOCALID"),
    (_env(RANK=1, WORLD_SIZE=2, LOCAL_RANK="one"), 2, "LOCAL_RANK='one'"),
])
def test_an_ambiguous_gpu_layout_is_refused_in_one_line(env, count, words):
    from alexnet_pipe.train.distributed import local_device

    with pytest.raises(TrainingError) as err:
        local_device(env, count)
    text = str(err.value)
    assert words in text and "\n" not in text
    if "LOCAL_RANK='one'" not in text:
        assert "--gpus-per-task=1" in text and "-b cpu" in text


@pytest.fixture
def root_log_level():
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def test_the_cli_rank_takes_gpu_0_under_slurm_gpus_per_task(monkeypatch, root_log_level):
    """`train` under srun --gpus-per-task=1 (+ torchrun per task): rank 1's device is its only
    GPU, 0 (before: LOCAL_RANK 1, outside device_count(), and every rank but 0 exited)."""
    from alexnet_pipe.cli import training as cli

    for key in [k for k in os.environ if k.startswith(("SLURM_", "LOCAL_", "CUDA_VISIBLE"))]:
        monkeypatch.delenv(key)
    for key, value in _env(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, SLURM_LOCALID=1, SLURM_GPUS_PER_TASK=1,
                           CUDA_VISIBLE_DEVICES="1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    kw = {"device_id": 0}
    assert cli._placement(kw) == {"rank": 1, "world_size": 2, "device_id": 0}
    assert "device_id" not in kw


def test_a_gpu_run_refuses_an_ambiguous_layout_and_a_cpu_run_does_not_care(monkeypatch, root_log_level):
    from alexnet_pipe.cli import training as cli
    from alexnet_pipe.train.runtime import torch_device

    for key in [k for k in os.environ if k.startswith(("SLURM_", "LOCAL_", "CUDA_VISIBLE"))]:
        monkeypatch.delenv(key)
    for key, value in _env(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    chosen = cli._placement({"device_id": 0})  # the CLI cannot tell -b yet: it does not refuse
    assert torch_device("cpu", chosen["device_id"]) == torch.device("cpu")
    with pytest.raises(TrainingError, match=r"local rank 1 of 2's: this process sees 1 GPU"):
        torch_device("gpu", chosen["device_id"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the launcher gave each rank its own GPU
    assert torch_device("gpu", cli._placement({"device_id": 0})["device_id"]) == torch.device("cuda", 0)


# ---------------------------------------------------------------- 3. shared memory for the readers

def _statvfs(free: int, size: int | None = None):
    size = size or free
    return os.statvfs_result((4096, 4096, size // 4096, free // 4096, free // 4096, 0, 0, 0, 0, 255))


def test_the_shm_estimate_for_imagenet_on_8_ranks_and_the_refusal_in_a_64mb_container(monkeypatch):
    from alexnet_pipe.loading import shm

    # ImageNet at short side 256: 1,281,167 records in ~140 GB of RecordIO shards -> ~110 KB each.
    record = 140e9 / 1_281_167
    cfg = LoaderConfig("train", True, batch_size=128, read_workers=4, prefetch=2)
    slots = shm.slots(cfg)
    assert slots == 2 + 4 + 2  # DALI keeps the pipeline's prefetch + the source's queue of batches
    need = shm.shm_need(128, record, slots, ranks=8)
    per_batch = 128 * (record + shm.SAMPLE_OVERHEAD) + shm.BATCH_OVERHEAD
    assert need == pytest.approx(shm.SAFETY * 8 * slots * per_batch, rel=1e-6)
    assert 1.5e9 < need < 2.5e9  # ~1.8 GB: far beyond docker's default 64 MB

    monkeypatch.setattr(shm.os, "statvfs", lambda path: _statvfs(64 * 2**20))
    with pytest.raises(TrainingError) as err:
        shm.check_shm(need, "/dev/shm")
    line = str(err.value)
    assert "\n" not in line and "--shm-size=" in line and "--read-workers 0" in line and "/dev/shm" in line
    assert "64.0 MiB free" in line

    monkeypatch.setattr(shm.os, "statvfs", lambda path: _statvfs(4 * 2**30, 8 * 2**30))
    shm.check_shm(need, "/dev/shm")  # 4 GiB free: enough
    assert shm.shm_need(128, record, shm.slots(LoaderConfig("train", True, 128, read_workers=0))) == 0
    shm.check_shm(0, "/nonexistent")  # no reader processes: nothing to check


def test_the_size_to_ask_docker_for_covers_what_is_used_already(monkeypatch):
    from alexnet_pipe.loading import shm

    monkeypatch.setattr(shm.os, "statvfs", lambda path: _statvfs(10 * 2**20, 64 * 2**20))
    with pytest.raises(TrainingError, match=r"--shm-size=(\d+)m") as err:
        shm.check_shm(300 * 2**20)
    asked = int(err.value.args[0].split("--shm-size=")[1].split("m")[0])
    assert asked >= 300 + 54  # the need plus the 54 MiB others hold already


def test_train_with_reader_processes_refuses_a_small_shm_before_any_step(tiny, tmp_path, monkeypatch):
    """The check sits where every loader is built (Runtime.loader): `train --read-workers 2` in a
    container whose /dev/shm is nearly full stops in one line, with no traceback and no step taken;
    with --read-workers 0 nothing is asked of /dev/shm."""
    from click.testing import CliRunner

    from alexnet_pipe.cli import main
    from alexnet_pipe.loading import shm

    monkeypatch.setattr(shm.os, "statvfs", lambda path: _statvfs(4096, 64 * 2**20))
    args = ["train", "-w", str(tiny), "-b", "cpu", "--crop", str(CROP), "-z", "4", "-e", "1", "--eval-freq", "0",
            "--data-threads", "1", "--no-progress", "-s", str(tmp_path / "w.pt"), "-o", str(tmp_path / "m.jsonl")]
    res = CliRunner().invoke(main, [*args, "--read-workers", "2"])
    assert res.exit_code == 1, res.output
    last = res.output.strip().splitlines()[-1]
    assert "--shm-size=" in last and "--read-workers 0" in last and "Traceback" not in res.output
    assert not (tmp_path / "w.pt").exists() and not (tmp_path / "m.jsonl").exists()
    res = CliRunner().invoke(main, [*args, "--read-workers", "0"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "w.pt").is_file()


def test_the_ranks_sharing_this_machines_shm():
    from alexnet_pipe.loading import shm

    assert shm.local_ranks({"LOCAL_WORLD_SIZE": "4"}, world_size=16) == 4
    assert shm.local_ranks({"SLURM_NTASKS_PER_NODE": "2"}, world_size=8) == 2
    assert shm.local_ranks({}, world_size=1) == 1
    assert shm.local_ranks({}, world_size=3) == 3  # unknown: assume all here (the safe side)


def _dali_shm_files() -> dict[tuple[int, int], int]:
    """The /dev/shm files DALI's slots mapped into this process -> the bytes each really holds
    (tmpfs allocates the pages written, not the size a slot is truncated to)."""
    held = {}
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "/dev/shm/nvidia_dali_" in line:
                try:
                    st = os.stat(f"/proc/self/map_files/{line.split()[0]}")
                except PermissionError:
                    pytest.skip("this kernel hides /proc/self/map_files")
                held[st.st_dev, st.st_ino] = st.st_blocks * 512
    return held


def test_the_estimate_covers_what_real_dali_reader_processes_hold(tmp_path):
    """Real DALI, 2 reader processes, photo-like JPEGs: the bytes DALI's shared memory really
    holds after a whole epoch stay below the estimate, and the estimate is not wildly above."""
    from alexnet_pipe.loading import shm

    make_image_tree(SynthConfig(tmp_path / "raw", 24, 1, (320, 240), ("circle", "square"), seed=5))
    run_convert(ConvertConfig(src=tmp_path / "raw", dst=tmp_path / "data", formats=("recordio",), shard_size=16,
                              workers=1, progress=False, image=ImageSettings(short_side=160)))
    ds = load_dataset(tmp_path / "data")
    cfg = LoaderConfig("train", True, batch_size=8, crop=64, read_workers=2, num_threads=1)
    record = shm.mean_record_bytes(ds, "train")
    assert 2_000 < record < 50_000
    need = shm.loader_shm_need(ds, cfg)
    earlier = _dali_shm_files()  # other loaders of this process, if any are still alive
    loader = Loader(ds, cfg)
    try:
        steps = sum(1 for _ in loader)
        held = sum(n for key, n in _dali_shm_files().items() if key not in earlier)
        capacities = loader._pipe.external_source_shm_statistics()["capacities"]
    finally:
        loader.close()
    assert steps == 6
    assert len(capacities) == shm.slots(cfg)  # the slot count is DALI's own
    assert sum(capacities) > need > held  # DALI's 1 MiB slots are address space, not /dev/shm space
    assert 0 < held <= need <= 4 * held, (held, need)


# ---------------------------------------------------------------- 4. per-class counts on the device

class _Fixed(torch.nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 4 * 4, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _batches(classes: int) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for k, n in enumerate((16, 16, 11)):
        valid = None if k < 2 else torch.arange(n) < 8  # the last batch ends in padding
        out.append(Batch(torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, classes, (n,), generator=g),
                         torch.zeros(n, dtype=torch.bool), valid, 0, k))
    return out


def test_per_class_counts_equal_bincounts_without_calling_bincount(monkeypatch):
    classes = 7
    torch.manual_seed(0)
    model = _Fixed(classes)
    batches = _batches(classes)
    rt = types.SimpleNamespace(ds=types.SimpleNamespace(num_classes=classes), device=torch.device("cpu"),
                               dist=Dist(DistConfig(), torch.device("cpu")), autocast=nullcontext)
    with torch.no_grad():  # the reference: bincount over all real samples at once
        logits = torch.cat([model(b.images)[b.valid if b.valid is not None else slice(None)] for b in batches])
        labels = torch.cat([b.labels[b.valid if b.valid is not None else slice(None)] for b in batches])
        confusion = torch.bincount(labels * classes + logits.argmax(1), minlength=classes * classes)
        in5 = logits.topk(5, dim=1).indices.eq(labels.unsqueeze(1)).any(1)
        top5 = torch.bincount(labels[in5], minlength=classes)

    def no_bincount(*args, **kwargs):
        raise AssertionError("torch.bincount sizes its output with a host sync on CUDA")

    monkeypatch.setattr(torch, "bincount", no_bincount)
    result = evaluate(model, batches, rt, per_class=True)
    assert result.samples == labels.shape[0] == 40
    assert result.per_class.confusion.tolist() == confusion.reshape(classes, classes).tolist()
    assert result.per_class.top5_hits.tolist() == top5.tolist()
    assert result.per_class.confusion.sum() == 40 and result.per_class.confusion.dtype.kind == "i"
    assert result.top1 == pytest.approx(100.0 * confusion.reshape(classes, classes).diag().sum().item() / 40)


def test_nproc_names_the_visible_devices_when_it_refuses(monkeypatch):
    """--nproc's ranks all inherit this process's CUDA_VISIBLE_DEVICES: one rank per visible GPU."""
    import click

    from alexnet_pipe.cli import training as cli

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(click.UsageError, match=r"--nproc 2 runs one rank per GPU, and this machine has 1 "
                                               r"\(CUDA_VISIBLE_DEVICES=3 limits what it sees\); pass --nproc 1"):
        cli._launch(2, "gpu")
