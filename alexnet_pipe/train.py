"""Training and evaluation: the neon AlexNet recipe on DALI-fed PyTorch.

``fit(cfg)`` trains (resuming from a checkpoint when given one), ``run_test(cfg)`` evaluates.
The data pipeline of epoch e is built from (seed, e) alone, and checkpoints hold the torch RNG
state, so a run resumed from a checkpoint continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint
from .config import TrainConfig
from .errors import CheckpointError, DatasetError, TrainingError
from .manifest import Dataset, load_dataset
from .mean import ChannelMean, load_dataset_mean
from .model import AlexNet, AlexNetConfig, param_groups
from .pipeline import Loader, LoaderConfig

log = logging.getLogger(__name__)


def lr_at(epoch: int, lr0: float, step: int = 20, gamma: float = 0.1) -> float:
    """neon's Schedule(step, gamma) for 0-based ``epoch``: ``lr0 * gamma ** floor((epoch + 1) / step)``."""
    return lr0 * gamma ** math.floor((epoch + 1) / step)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    top1: float  # percent
    top5: float  # percent (top-min(5, classes))
    samples: int

    def neon_line(self) -> str:
        return f"LogLoss: {self.loss:.2f}, Accuracy: {self.top1:.1f} % (Top-1), {self.top5:.1f} % (Top-5)"


@dataclass(frozen=True)
class FitResult:
    epochs_run: int
    history: list[dict]
    final: EvalResult | None
    weights_path: Path | None


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
    """Per k, how many samples have their label among the k highest scores (device tensors)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top.eq(labels.unsqueeze(1))
    return [hits[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


class _Runtime:
    """Device, precision and loaders for one run: everything that follows from TrainConfig."""

    def __init__(self, cfg: TrainConfig, ds: Dataset, mean: ChannelMean):
        self.cfg, self.ds = cfg, ds
        if cfg.backend == "gpu":
            if not torch.cuda.is_available():
                raise TrainingError("-b gpu was asked for but torch sees no CUDA device; use -b cpu")
            self.device = torch.device("cuda", cfg.device_id)
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        else:
            self.device = torch.device("cpu")
        self.amp_dtype = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[cfg.datatype]
        self.mean_rgb, self.std_rgb = mean.rgb()
        if cfg.normalize_std and self.std_rgb is None:
            raise DatasetError(f"{ds.root}/mean.json has no std (an upgraded old mean); drop --normalize-std")

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def loader_config(self, split: str, train: bool, batch_size: int | None = None) -> LoaderConfig:
        """The loader settings that follow from the run's config (one place: fit, test, inspect)."""
        cfg = self.cfg
        gpu = self.device.type == "cuda"
        return LoaderConfig(
            split=split, train=train, batch_size=batch_size or cfg.batch_size, crop=cfg.crop,
            device_id=cfg.device_id if gpu else None, shard_id=cfg.shard_id, num_shards=cfg.num_shards,
            seed=cfg.rng_seed, subset_pct=cfg.subset_pct if train else 100.0, num_threads=cfg.data_threads,
            read_workers=cfg.read_workers, fp16=gpu and self.amp_dtype is not None,
            channels_last=cfg.channels_last, mean=self.mean_rgb, std=self.std_rgb if cfg.normalize_std else None,
            reader=cfg.reader,
        )

    def loader(self, split: str, train: bool, epoch: int, batch_size: int | None = None) -> Loader:
        return Loader(self.ds, self.loader_config(split, train, batch_size), epoch)

    def data_meta(self) -> dict:
        """Data settings that travel with the weights (predict/import will need them)."""
        return {
            "classes": [c["id"] for c in self.ds.classes],
            "class_names": [c.get("name", "") for c in self.ds.classes],
            "mean_rgb": list(self.mean_rgb),
            "std_rgb": list(self.std_rgb) if self.cfg.normalize_std else None,
            "crop": self.cfg.crop,
            "short_side": self.ds.manifest["settings"]["short_side"],
            "channel_order": "RGB",
            "value_range": [0, 255],
        }


def evaluate(model: torch.nn.Module, loader: Loader, rt: _Runtime, progress: bool = False) -> EvalResult:
    """Loss, top-1 and top-5 over every sample of the loader's split, one host sync at the end.
    Padding (``Batch.valid``) counts nowhere."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    hits = torch.zeros(2, dtype=torch.int64, device=rt.device)
    count = torch.zeros((), dtype=torch.int64, device=rt.device)
    with torch.inference_mode():
        for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
            with rt.autocast():
                logits = model(batch.images)
            logits, labels = logits.float(), batch.labels
            if batch.valid is not None:
                logits, labels = logits[batch.valid], labels[batch.valid]
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            hits += torch.stack(topk_correct(logits, labels, (1, 5)))
            count += labels.shape[0]
    n = int(count.item())
    if n == 0:
        raise DatasetError("the validation split yielded no samples")
    top1, top5 = (100.0 * h / n for h in hits.tolist())
    return EvalResult(loss_sum.item() / n, top1, top5, n)


def _loss(logits: torch.Tensor, batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's real samples (padding weighs nothing)."""
    if batch.valid is None:
        return F.cross_entropy(logits.float(), batch.labels)
    per_sample = F.cross_entropy(logits.float(), batch.labels, reduction="none")
    return (per_sample * batch.valid).sum() / batch.valid.sum().clamp(min=1)


def train_one_epoch(model, loader: Loader, opt, scaler, rt: _Runtime, epoch: int, lr: float) -> tuple[float, int, float]:
    """One pass over the loader (epoch ``epoch``). Returns (mean loss, samples, seconds).

    Losses are summed on the device and read back only every ``log_every`` steps: a host sync
    per step would stall the GPU queue.
    """
    cfg = rt.cfg
    if loader.epoch != epoch:  # the loader serves epochs in sequence; a skipped pass would shift the data
        raise RuntimeError(f"the train loader is at epoch {loader.epoch + 1}, expected {epoch + 1}")
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    count = torch.zeros((), dtype=torch.int64, device=rt.device)
    bar = tqdm(total=loader.samples, unit="img", desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not cfg.progress, dynamic_ncols=True, smoothing=0.1)
    started = time.perf_counter()
    for step, batch in enumerate(loader):
        with rt.autocast():
            logits = model(batch.images)
            loss = _loss(logits, batch)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        n = batch.labels.shape[0] if batch.valid is None else batch.valid.sum()
        loss_sum += loss.detach().double() * n
        count += n
        bar.update(batch.labels.shape[0])
        if (step + 1) % cfg.log_every == 0:
            mean_loss = loss_sum.item() / max(count.item(), 1)
            if not math.isfinite(mean_loss):
                bar.close()
                raise TrainingError(
                    f"the loss became {mean_loss} in epoch {epoch + 1}; the learning rate {lr:g} is too high "
                    "for this data: try --lr 0.001 (small data sets) or check the mean file"
                )
            bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:g}", refresh=False)
    bar.close()
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    seconds = time.perf_counter() - started
    seen = int(count.item())
    mean_loss = loss_sum.item() / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise TrainingError(f"the loss became {mean_loss} in epoch {epoch + 1}; try a lower --lr (e.g. 0.001)")
    return mean_loss, seen, seconds


def _build_model(rt: _Runtime, num_classes: int, crop: int, seed: int) -> AlexNet:
    gen = torch.Generator().manual_seed(seed)
    model = AlexNet(AlexNetConfig(num_classes=num_classes, crop=crop), generator=gen, init=rt.cfg.init)
    model = model.to(rt.device)
    if rt.cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _check_compatible(body: dict, path: Path, ds: Dataset, crop: int) -> None:
    mc = body["model_config"]
    num_classes = ds.num_classes
    if mc.get("num_classes") != num_classes:
        raise CheckpointError(f"{path} was trained for {mc.get('num_classes')} classes; this dataset has {num_classes}")
    trained = body["data"].get("classes")
    here = [c["id"] for c in ds.classes]
    if trained is not None and trained != here:
        first = next(i for i, (a, b) in enumerate(zip(trained, here)) if a != b)
        raise CheckpointError(
            f"{path} was trained on other classes (class {first} is {trained[first]!r} there, "
            f"{here[first]!r} in {ds.root}); its scores would be read against the wrong labels"
        )
    if mc.get("crop") != crop:
        raise CheckpointError(f"{path} was trained with --crop {mc.get('crop')}; pass --crop {mc.get('crop')}")


def _append_metrics(path: Path | None, record: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def small_image_warning(ds: Dataset, crop: int) -> str | None:
    """Which stored images are smaller than the crop (their crops get mean-coloured borders), or None.
    Uses the converter's histogram of stored short sides (``short_side_counts``)."""
    found = []
    for name in ds.splits():
        split = ds.split(name)
        counts = split.get("short_side_counts")
        if counts is None:  # converted before the histogram existed: only the setting can tell
            short = ds.manifest["settings"].get("short_side", 0)
            small = split["records"] if 0 < short < crop else 0
        else:
            small = sum(n for side, n in counts.items() if int(side) < crop)
        if small:
            found.append(f"{small} of {split['records']} {name} images")
    if not found:
        return None
    return (f"{' and '.join(found)} have a short side below the crop {crop}: their crops are padded with the mean "
            f"colour; reconvert with --short-side {max(crop, 256)} (without --no-upscale) or pass a smaller --crop")


def _open(cfg: TrainConfig) -> tuple[Dataset, _Runtime]:
    ds = load_dataset(cfg.data_dir)
    mean = load_dataset_mean(cfg.data_dir)  # refuses an old full-image mean with the update-mean hint
    if (warning := small_image_warning(ds, cfg.crop)) is not None:
        log.warning("%s", warning)
    return ds, _Runtime(cfg, ds, mean)


def epoch_loader(cfg: TrainConfig, epoch: int, split: str = "train", batch_size: int | None = None) -> Loader:
    """The loader ``fit`` reads ``split`` from, positioned at ``epoch``: the same records, order,
    crops and flips (train), or centre crops in stored order (any other split).
    ``inspect``, the benchmarks and the tests use it to see exactly what training sees."""
    _, rt = _open(cfg)
    return rt.loader(split, split == "train", epoch, batch_size)


def run_test(cfg: TrainConfig) -> EvalResult:
    """Evaluate ``cfg.model_file`` on the validation split (`--test_only`)."""
    ds, rt = _open(cfg)
    body = checkpoint.load(cfg.model_file)
    _check_compatible(body, cfg.model_file, ds, cfg.crop)
    model = _build_model(rt, ds.num_classes, cfg.crop, cfg.rng_seed)
    model.load_state_dict(body["model"])
    loader = rt.loader("val", False, 0)
    try:
        result = evaluate(model, loader, rt, cfg.progress)
    finally:
        loader.close()
    _append_metrics(cfg.output_file, {"event": "test", "model_file": str(cfg.model_file), "val_loss": result.loss,
                                      "val_top1": result.top1, "val_top5": result.top5, "samples": result.samples})
    return result


def fit(cfg: TrainConfig) -> FitResult:
    """Train for ``cfg.epochs`` epochs (resuming when ``model_file`` is a checkpoint)."""
    ds, rt = _open(cfg)
    if "val" not in ds.splits() and cfg.eval_freq:
        log.warning("%s has no val split: training without evaluation", cfg.data_dir)
    torch.manual_seed(cfg.rng_seed)  # dropout; the model init has its own generator
    model = _build_model(rt, ds.num_classes, cfg.crop, cfg.rng_seed)
    fused = rt.device.type == "cuda"
    opt = torch.optim.SGD(param_groups(model, cfg.lr, cfg.weight_decay, cfg.bias_lr_mult),
                          lr=cfg.lr, momentum=cfg.momentum, fused=fused or None)
    scaler = torch.amp.GradScaler(rt.device.type) if cfg.datatype == "f16" else None
    start_epoch, history = 0, []
    if cfg.model_file is not None:
        body = checkpoint.load(cfg.model_file)
        _check_compatible(body, cfg.model_file, ds, cfg.crop)
        model.load_state_dict(body["model"])
        if body["kind"] == "checkpoint":
            opt.load_state_dict(body["optimizer"])
            if scaler is not None and body.get("scaler"):
                scaler.load_state_dict(body["scaler"])
            start_epoch, history = body["epoch"], list(body.get("history", []))
            checkpoint.restore_rng(body["rng"], rt.device)
            log.info("resuming %s after epoch %d", cfg.model_file, start_epoch)
        if start_epoch >= cfg.epochs:
            log.warning("%s already has %d epochs; nothing to train (raise -e)", cfg.model_file, start_epoch)
    elif cfg.output_file is not None and cfg.output_file.exists():
        cfg.output_file.unlink()  # a fresh run starts a fresh metrics file; a resume appends
    train_model = torch.compile(model) if cfg.compile else model
    has_val = "val" in ds.splits()
    ckpt_path = cfg.resolved_checkpoint_path()
    final = None
    train_loader = None
    val_loader = None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch, group["lr0"], cfg.lr_step, cfg.lr_gamma)
            lr = opt.param_groups[0]["lr"]
            if train_loader is None:  # one pipeline serves every epoch: its source knows each epoch's order
                train_loader = rt.loader("train", True, epoch)
            train_loss, seen, seconds = train_one_epoch(train_model, train_loader, opt, scaler, rt, epoch, lr)
            record = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "samples": seen,
                      "img_per_s": seen / seconds if seconds else 0.0, "seconds": seconds}
            last = epoch + 1 == cfg.epochs
            if has_val and cfg.eval_freq and ((epoch + 1) % cfg.eval_freq == 0 or last):
                if val_loader is None:  # built on first use, then reused: its order and crops never change
                    val_loader = rt.loader("val", False, 0)
                final = evaluate(train_model, val_loader, rt)
                record.update(val_loss=final.loss, val_top1=final.top1, val_top5=final.top5)
                log.info("epoch %d: %s", epoch + 1, final.neon_line())
            if epoch >= 1 and abs(train_loss - math.log(ds.num_classes)) < 0.01 and ds.num_classes > 1:
                log.warning("train loss %.3f sits at chance (ln %d): the learning rate may be too high for this "
                            "data (try --lr 0.001), or, on a small data set, neon's init is slow to start "
                            "(try --init kaiming)", train_loss, ds.num_classes)
            history.append(record)
            _append_metrics(cfg.output_file, record)
            log.info("epoch %d: train loss %.4f, %.0f img/s", epoch + 1, train_loss, record["img_per_s"])
            if ckpt_path is not None and ((cfg.serialize and (epoch + 1) % cfg.serialize == 0) or (last and cfg.serialize)):
                checkpoint.save(ckpt_path, {
                    "kind": "checkpoint", "model": model.state_dict(), "model_config": model.cfg.to_dict(),
                    "data": rt.data_meta(), "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "epoch": epoch + 1, "rng": checkpoint.rng_state(rt.device),
                    "train_config": cfg.to_dict(), "history": history,
                })
    finally:  # release the shard files now, not whenever the loaders are collected
        for loader in (train_loader, val_loader):
            if loader is not None:
                loader.close()
    if cfg.save_path is not None:
        checkpoint.save(cfg.save_path, {
            "kind": "weights", "model": model.state_dict(), "model_config": model.cfg.to_dict(),
            "data": rt.data_meta(), "epoch": max(start_epoch, cfg.epochs), "train_config": cfg.to_dict(),
            "history": history,
        })
    return FitResult(len(history), history, final, cfg.save_path)
