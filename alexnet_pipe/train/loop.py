"""Training and evaluation: the neon AlexNet recipe on DALI-fed PyTorch.

``fit(cfg)`` trains (resuming from a checkpoint when given one), ``run_test(cfg)`` evaluates.
The data of epoch e (order, crops, flips) and its dropout masks follow from (seed, e, rank)
alone, so a run resumed from a checkpoint continues exactly as an uninterrupted run would.
Under torchrun every rank runs the same recipe on its share of each epoch (``distributed.py``);
losses are scaled so the step equals one process's step over the global batch.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from alexnet_pipe.config import TrainConfig
from alexnet_pipe.errors import CheckpointError, DatasetError, TrainingError
from alexnet_pipe.loading.pipeline import Batch, Loader
from alexnet_pipe.model import checkpoint
from alexnet_pipe.model.alexnet import param_groups
from alexnet_pipe.train import start as warmstart
from alexnet_pipe.train import state as train_state
from alexnet_pipe.train.loggers import Loggers, MetricsLog, TensorBoardLog
from alexnet_pipe.train.preempt import Action, Preemption
from alexnet_pipe.train.report import PerClass, write_per_class
from alexnet_pipe.train.runtime import Runtime, open_run

log = logging.getLogger(__name__)


def lr_at(epoch: int, lr0: float, step: int = 20, gamma: float = 0.1) -> float:
    """neon's Schedule(step, gamma) for 0-based ``epoch``: ``lr0 * gamma ** floor((epoch + 1) / step)``."""
    return lr0 * gamma ** math.floor((epoch + 1) / step)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    top1: float  # percent
    top5: float | None  # percent; None with 5 classes or fewer, where every label is in the top 5
    samples: int
    per_class: PerClass | None = None  # confusion matrix and per-class top-5 hits (test --per-class)

    def neon_line(self) -> str:
        line = f"LogLoss: {self.loss:.2f}, Accuracy: {self.top1:.1f} % (Top-1)"
        return line + (f", {self.top5:.1f} % (Top-5)" if self.top5 is not None else "")


@dataclass(frozen=True)
class FitResult:
    epochs_run: int
    history: list[dict]
    final: EvalResult | None
    weights_path: Path | None
    stopped_by: int | None = None  # the signal that ended the run early (SIGTERM/SIGINT), or None
    checkpoint_path: Path | None = None  # where the run's last checkpoint is


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
    """Per k, how many samples have their label among the k highest scores (device tensors)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top.eq(labels.unsqueeze(1))
    return [hits[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


def evaluate(model: torch.nn.Module, loader: Loader, rt: Runtime, progress: bool = False,
             per_class: bool = False) -> EvalResult:
    """Loss, top-1 and top-5 over every sample of the loader's split, summed over all ranks, one
    host sync at the end. Padding (``Batch.valid``) counts nowhere, so each image counts once.
    ``per_class`` also counts the confusion matrix and each class's top-5 hits, with ``index_add_``
    on the device (CUDA ``bincount`` reads its input's max back to size its output: a sync per call)."""
    model.eval()
    classes = rt.ds.num_classes
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    hits = torch.zeros(2, dtype=torch.int64, device=rt.device)
    count = torch.zeros((), dtype=torch.int64, device=rt.device)
    confusion = torch.zeros(classes * classes if per_class else 0, dtype=torch.int64, device=rt.device)
    top5_hits = torch.zeros(classes if per_class else 0, dtype=torch.int64, device=rt.device)
    with torch.inference_mode():
        for batch in tqdm(loader, desc="eval", unit="batch", disable=not (progress and rt.dist.is_main), leave=False):
            with rt.autocast():
                logits = model(batch.images)
            logits, labels = logits.float(), batch.labels
            if batch.valid is not None:
                logits, labels = logits[batch.valid], labels[batch.valid]
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            hits += torch.stack(topk_correct(logits, labels, (1, 5)))
            count += labels.shape[0]
            if per_class:
                ones = torch.ones_like(labels)
                confusion.index_add_(0, labels * classes + logits.argmax(1), ones)
                in5 = logits.topk(min(5, classes), dim=1).indices.eq(labels.unsqueeze(1)).any(1)
                top5_hits.index_add_(0, labels, in5.to(top5_hits.dtype))  # no labels[in5]: its size is a sync too
    rt.dist.sum_(loss_sum, hits, count, confusion, top5_hits)
    n = int(count.item())
    if n == 0:
        raise DatasetError("the validation split yielded no samples")
    top1, top5 = (100.0 * h / n for h in hits.tolist())
    table = None
    if per_class:
        table = PerClass(confusion.cpu().numpy().reshape(classes, classes), top5_hits.cpu().numpy())
    return EvalResult(loss_sum.item() / n, top1, top5 if classes > 5 else None, n, table)


def step_loss(logits: torch.Tensor, batch: Batch,
              world_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
    """(loss to back-propagate, this rank's summed loss, its real samples) for one step.

    The loss is this rank's sum over its real samples, divided by the step's real samples over all
    ranks and multiplied by the world size: DDP averages gradients over ranks, so the update equals
    one process's mean over the whole global batch, and padding weighs nothing, also in a batch
    that is all padding (its rank still joins the all-reduce, with zero gradients).
    """
    per_sample = F.cross_entropy(logits.float(), batch.labels, reduction="none")
    if batch.valid is not None:
        per_sample = per_sample * batch.valid
        count = batch.valid.sum()
    else:
        count = batch.labels.shape[0]  # a Python int: no host-to-device copy on the hot path
    total = per_sample.sum()
    return total * (world_size / max(batch.real_total, 1)), total.detach(), count


def update(loss: torch.Tensor, opt, scaler) -> None:
    """Back-propagate ``loss`` and take the optimizer step, through the GradScaler when there is
    one (-d f16): the update of every training step (``train_one_epoch``, the benchmarks)."""
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


@dataclass
class EpochRun:
    """What one call of ``train_one_epoch`` did: the epoch's sums through its last step, over
    all ranks (a resumed epoch's earlier steps included), and whether it reached the end."""

    partial: train_state.Partial
    finished: bool

    @property
    def mean_loss(self) -> float:
        return self.partial.loss_sum / max(self.partial.samples, 1)


def train_one_epoch(model, loader: Loader, opt, scaler, rt: Runtime, epoch: int, lr: float,
                    start: train_state.Partial | None = None, preemption: Preemption | None = None,
                    on_checkpoint: Callable[[train_state.Partial], None] | None = None,
                    on_log: Callable[[train_state.Partial], None] | None = None) -> EpochRun:
    """One pass over the loader (epoch ``epoch``), from step ``start.step`` when resuming.

    After each step ``preemption`` may ask for a checkpoint (``on_checkpoint`` gets the progress)
    or for a stop: the pass then ends early with ``finished`` False. ``on_log`` gets the progress
    every ``log_every`` steps. Losses are summed on the
    device and read back only every ``log_every`` steps: a host sync per step would stall the GPU
    queue. Every rank syncs at the same steps.
    """
    cfg = rt.cfg
    start = start or train_state.Partial()
    if loader.epoch != epoch or loader.start_step != start.step:  # a skipped pass would shift the data
        raise RuntimeError(f"the train loader is at epoch {loader.epoch + 1} step {loader.start_step}, "
                           f"expected {epoch + 1} step {start.step}")
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss, samples, data wait (this rank, call)
    bar = tqdm(total=loader.samples * rt.dist.world_size, initial=start.samples, unit="img",
               desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not (cfg.progress and cfg.progress_bar and rt.dist.is_main),
               dynamic_ncols=True, smoothing=0.1)
    plain = _PlainProgress(cfg, rt, epoch, len(loader)) if cfg.progress and not cfg.progress_bar else None
    started = time.perf_counter()

    def progress(steps_done: int) -> train_state.Partial:
        total = sums.clone()
        rt.dist.sum_(total)
        return train_state.Partial(steps_done, start.loss_sum + total[0].item(), start.samples + int(total[1].item()),
                                   start.seconds + time.perf_counter() - started,
                                   start.data_wait_s + total[2].item() / rt.dist.world_size)

    steps_done = start.step
    batches = iter(loader)
    while True:
        waited = time.perf_counter()
        batch = next(batches, None)  # on the GPU: how long the step waited for its data
        if batch is None:
            break
        sums[2] += time.perf_counter() - waited
        train_state.seed_step(cfg.rng_seed, epoch, batch.step, rt.dist.rank)
        with rt.autocast():
            logits = model(batch.images)
            loss, total, count = step_loss(logits, batch, rt.dist.world_size)
        update(loss, opt, scaler)
        sums[0] += total.double()
        sums[1] += count
        steps_done = batch.step + 1
        bar.update(batch.labels.shape[0] * rt.dist.world_size)
        if steps_done % cfg.log_every == 0:
            now = progress(steps_done)
            _check_finite(now.loss_sum / max(now.samples, 1), epoch, lr)
            bar.set_postfix(loss=f"{now.loss_sum / max(now.samples, 1):.3f}", lr=f"{lr:g}", refresh=False)
            if on_log is not None:
                on_log(now)
            if plain is not None:
                plain.maybe_log(now, lr)
        action = preemption.poll(steps_done) if preemption is not None else Action.GO_ON
        if action is not Action.GO_ON and steps_done < len(loader):
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)
            on_checkpoint(progress(steps_done))
            preemption.checkpointed()
            if action is Action.STOP:
                bar.close()
                return EpochRun(progress(steps_done), finished=False)
    bar.close()
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    result = EpochRun(progress(steps_done), finished=True)
    _check_finite(result.mean_loss, epoch, lr)
    return result


class _PlainProgress:
    """Progress as log lines (stderr is not a terminal: batch jobs, CI, | tee): at most one
    every 30 s, with img/s, the share of time waiting for data and the epoch's ETA."""

    EVERY_S = 30.0

    def __init__(self, cfg: TrainConfig, rt: Runtime, epoch: int, steps: int):
        self.cfg, self.main, self.epoch, self.steps = cfg, rt.dist.is_main, epoch, steps
        self._last = time.monotonic()

    def maybe_log(self, now: train_state.Partial, lr: float) -> None:
        if not self.main or time.monotonic() - self._last < self.EVERY_S:
            return
        self._last = time.monotonic()
        rate = now.step / now.seconds if now.seconds else 0.0
        eta = (self.steps - now.step) / rate if rate else 0.0
        log.info("epoch %d/%d step %d/%d: loss %.4f, lr %g, %.0f img/s, data wait %.0f%%, epoch ETA %dm%02ds",
                 self.epoch + 1, self.cfg.epochs, now.step, self.steps, now.loss_sum / max(now.samples, 1), lr,
                 now.samples / now.seconds if now.seconds else 0.0,
                 100 * now.data_wait_s / now.seconds if now.seconds else 0.0, eta // 60, eta % 60)


def _check_finite(mean_loss: float, epoch: int, lr: float) -> None:
    if not math.isfinite(mean_loss):
        raise TrainingError(
            f"the loss became {mean_loss} in epoch {epoch + 1}; the learning rate {lr:g} is too high "
            "for this data: try --lr 0.001 (small data sets) or check the mean file"
        )


def epoch_loader(cfg: TrainConfig, epoch: int, split: str = "train", batch_size: int | None = None,
                 start_step: int = 0) -> Loader:
    """The loader ``fit`` reads ``split`` from, positioned at ``epoch`` (and ``start_step`` within it):
    the same records, order, crops and flips (train), or centre crops in stored order (any other split).
    ``inspect``, the benchmarks, the tests and ``open_loader`` use it to see exactly what training sees."""
    rt = open_run(cfg)
    return rt.loader(split, split == "train", epoch, batch_size, start_step)


def open_loader(data_dir: str | os.PathLike, split: str = "train", *, batch_size: int = 128, crop: int = 224,
                epoch: int = 0, step: int = 0, backend: str = "auto", rank: int = 0, world_size: int = 1,
                seed: int = 0, **options) -> Loader:
    """Batches of a converted dataset for any torch model (public as ``alexnet_pipe.loader``).

    The loader ``fit`` would read with ``TrainConfig(data_dir, batch_size=..., crop=..., backend=...,
    rng_seed=seed, shard_id=rank, num_shards=world_size, **options)``: the same records, global
    order, random crops, flips and dataset mean for ``split="train"`` (centre crops in stored order
    for any other split). Each rank of ``world_size`` reads its own share of every epoch; ``epoch``
    and ``step`` resume where a run stopped. ``options`` are further ``TrainConfig`` fields (e.g.
    ``datatype``, ``normalize_std``, ``reader``, ``read_workers``, ``data_threads``, ``subset_pct``,
    ``channels_last``, ``device_id``).

    Yields ``Batch``es: ``images`` (N x 3 x crop x crop, on the GPU with backend gpu, float16 there
    unless ``datatype="f32"``), ``labels`` (int64 class indices), ``valid`` (padding mask or None).
    Close it (``Loader.close``) when done.
    """
    cfg = TrainConfig(data_dir=Path(data_dir), batch_size=batch_size, crop=crop, backend=backend, rng_seed=seed,
                      shard_id=rank, num_shards=world_size, **options)
    return epoch_loader(cfg, epoch, split, start_step=step)


def run_test(cfg: TrainConfig) -> EvalResult:
    """Evaluate ``cfg.model_file`` on the validation split (`--test_only`), over all ranks, with
    the network and input the weights file records (crop, channel order, value range, mean/std)."""
    rt = open_run(cfg, join=True)
    loader = None
    try:
        start = warmstart.plan_start(cfg, rt.ds, testing=True)
        rt.cfg = start.cfg
        rt.use_input(start.spec)
        rt.warn_small_images()
        model = warmstart.build(start, rt.device, cfg.rng_seed, cfg.init)
        if rt.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loader = rt.loader("val", False, 0)
        result = evaluate(model, loader, rt, cfg.progress, per_class=cfg.per_class_file is not None)
        if rt.dist.is_main and cfg.per_class_file is not None:
            for path in write_per_class(result.per_class, [c["id"] for c in rt.ds.classes],
                                        [c.get("name", "") for c in rt.ds.classes], cfg.per_class_file):
                log.info("wrote %s", path)
        if rt.dist.is_main:
            MetricsLog(cfg.output_file).write({
                "event": "test", "model_file": str(cfg.model_file), "val_loss": result.loss, "val_top1": result.top1,
                "val_top5": result.top5, "samples": result.samples, "world_size": rt.dist.world_size})
        return result
    finally:
        if loader is not None:
            loader.close()
        rt.close()


def _global_settings(rt: Runtime) -> dict:
    """What every rank must agree on: checked once at start-up, before the first step."""
    from alexnet_pipe.loading.order import OrderConfig, epoch_order

    cfg = rt.cfg
    records = rt.ds.split("train")["records"]
    order = epoch_order(OrderConfig(records, True, cfg.rng_seed, subset_pct=cfg.subset_pct), 0)[0]
    return {"world_size": rt.dist.world_size, "lr": rt.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "crop": cfg.crop, "seed": cfg.rng_seed, "datatype": cfg.datatype, "train_records": records,
            "classes": rt.ds.num_classes, "epoch0_order_head": order[:16].tolist(),
            "model_file": str(cfg.model_file), "dataset": rt.ds.manifest.get("created", str(rt.ds.root))}


def _resume_step(restored: train_state.Restored, body: dict, rt: Runtime, path: Path) -> train_state.Partial:
    """A mid-epoch checkpoint's step in this run's global batch (the positions done must match)."""
    partial = restored.partial
    if not partial.step:
        return partial
    done = partial.step * body.get("global_batch", rt.global_batch)
    if done % rt.global_batch:
        raise CheckpointError(
            f"{path} stopped {done} samples into epoch {restored.start_epoch + 1}, which is not a whole number of "
            f"steps of {rt.global_batch} (-z x ranks); resume with a global batch of {body.get('global_batch')}")
    return train_state.Partial(done // rt.global_batch, partial.loss_sum, partial.samples, partial.seconds,
                               partial.data_wait_s)


def fit(cfg: TrainConfig) -> FitResult:
    """Train for ``cfg.epochs`` epochs (resuming when ``model_file`` is a checkpoint).

    The recipe: neon's AlexNet, SGD with momentum, a step lr schedule, weight decay on weights
    only; every epoch a fresh global order with random crops and flips; evaluation every
    ``eval_freq`` epochs; checkpoints every ``serialize`` epochs and every ``checkpoint_minutes``;
    final weights at ``save_path``. SIGTERM/SIGINT end the run after the current step with a
    checkpoint (``FitResult.stopped_by``).
    """
    rt = open_run(cfg, join=True)
    main = rt.dist.is_main
    train_loader = val_loader = metrics = None
    try:
        ds = rt.ds
        start = warmstart.plan_start(cfg, ds)  # crop and normalisation may come from --model-file
        rt.cfg = cfg = start.cfg
        rt.use_input(start.spec)
        rt.warn_small_images()
        rt.dist.check_same(_global_settings(rt))
        if "val" not in ds.splits() and cfg.eval_freq and main:
            log.warning("%s has no val split: training without evaluation", cfg.data_dir)
        model = warmstart.build(start, rt.device, cfg.rng_seed, cfg.init)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        head = warmstart.HEAD if start.new_head else None  # a new fc8 learns at --head-lr-mult x the lr
        opt = torch.optim.SGD(param_groups(model, rt.lr, cfg.weight_decay, cfg.bias_lr_mult, head, cfg.head_lr_mult),
                              lr=rt.lr, momentum=cfg.momentum, fused=(rt.device.type == "cuda") or None)
        scaler = torch.amp.GradScaler(rt.device.type) if cfg.datatype == "f16" else None
        restored = train_state.Restored(0, [], train_state.Partial())
        changes: dict = {}
        if main:
            for note in start.notes:
                log.info("%s", note)
            if start.spec is not None and not start.resume:
                log.info("starting from %s; input %s", start.source, rt.input.describe())
        if start.resume:
            body, source = start.body, start.source
            restored = train_state.restore(body, opt, scaler)
            restored.partial = _resume_step(restored, body, rt, source)
            changes = train_state.resume_changes(body, cfg, source)
            train_state.apply_hyperparameters(opt, rt.lr, cfg)
            if changes and main:
                log.info("resuming with changed settings: %s",
                         ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()))
            if (restored.start_epoch or restored.partial.step) and main:
                log.info("resuming %s after epoch %d%s", source, restored.start_epoch,
                         f", step {restored.partial.step}" if restored.partial.step else "")
            if restored.start_epoch >= cfg.epochs and main:
                log.warning("%s already has %d epochs; nothing to train (raise -e)", source, restored.start_epoch)
        start_epoch, history, partial = restored.start_epoch, restored.history, restored.partial
        if start_epoch < cfg.epochs:  # one pipeline serves every epoch: its source knows each epoch's order
            train_loader = rt.loader("train", True, start_epoch, start_step=partial.step)
        steps_per_epoch = len(train_loader) if train_loader is not None else 1
        metrics = Loggers(MetricsLog(cfg.output_file, enabled=main),
                          TensorBoardLog(cfg.tensorboard_dir, steps_per_epoch)
                          if main and cfg.tensorboard_dir else None)
        metrics.start(start_epoch if start.resume else None, partial.step, changes)
        train_model = rt.dist.wrap(model, bf16_grads=cfg.resolved_allreduce_dtype() == "bf16")
        if cfg.compile:
            # One static graph per mode: the partial last batch is padded to -z (its padded rows
            # get no gradient) instead of torch compiling a second, dynamic-batch graph for it,
            # which evaluation would then also run (model.compile_fixed_batch; tests/test_levers.py
            # counts the graphs).
            from alexnet_pipe.model.alexnet import compile_fixed_batch

            train_model = compile_fixed_batch(train_model, cfg.batch_size)
        has_val = "val" in ds.splits()
        ckpt_path = cfg.resolved_checkpoint_path()
        final, stopped_by = None, None

        def save_checkpoint(epochs_done: int, progress: train_state.Partial | None = None) -> None:
            if main and ckpt_path is not None:
                checkpoint.save(ckpt_path, train_state.checkpoint_payload(rt, model, opt, scaler, epochs_done, history,
                                                                          progress, start.record()),
                                keep=cfg.keep_checkpoints)

        with Preemption(rt.dist, cfg.checkpoint_minutes, cfg.log_every) as preemption:
            for epoch in range(start_epoch, cfg.epochs):
                for group in opt.param_groups:
                    group["lr"] = lr_at(epoch, group["lr0"], cfg.lr_step, cfg.lr_gamma)
                lr = opt.param_groups[0]["lr"]
                run = train_one_epoch(train_model, train_loader, opt, scaler, rt, epoch, lr, partial, preemption,
                                      on_checkpoint=lambda progress, e=epoch: save_checkpoint(e, progress),
                                      on_log=lambda progress, e=epoch, lr=lr: metrics.write_step(e + 1, lr,
                                                                                                  progress))
                partial = train_state.Partial()
                if not run.finished:
                    stopped_by = preemption.signal
                    break
                seen, seconds = run.partial.samples, run.partial.seconds
                record = {"epoch": epoch + 1, "lr": lr, "train_loss": run.mean_loss, "samples": seen,
                          "img_per_s": seen / seconds if seconds else 0.0, "seconds": seconds,
                          "world_size": rt.dist.world_size, "global_batch": rt.global_batch,
                          "loader": train_loader.cfg.knobs()}
                if main:  # the train line first, then validation's
                    log.info("epoch %d: train loss %.4f, %.0f img/s", epoch + 1, run.mean_loss, record["img_per_s"])
                last = epoch + 1 == cfg.epochs
                if has_val and cfg.eval_freq and ((epoch + 1) % cfg.eval_freq == 0 or last):
                    if val_loader is None:  # built on first use, then reused: its order and crops never change
                        val_loader = rt.loader("val", False, 0)
                    final = evaluate(train_model, val_loader, rt)
                    record.update(val_loss=final.loss, val_top1=final.top1, val_top5=final.top5)
                    if main:
                        log.info("epoch %d: %s", epoch + 1, final.neon_line())
                _warn_at_chance(rt, epoch, run.mean_loss)
                history.append(record)
                metrics.write(record)
                stopping = preemption.signal is not None
                if cfg.serialize and ((epoch + 1) % cfg.serialize == 0 or last) or stopping:
                    save_checkpoint(epoch + 1)
                    preemption.checkpointed()
                if stopping and not last:
                    stopped_by = preemption.signal
                    break
        if stopped_by is not None:
            rt.dist.barrier()
            return FitResult(len(history), history, final, None, stopped_by, ckpt_path)
        if main and cfg.save_path is not None:
            kept = ckpt_path is not None and ckpt_path.is_file()  # a failed save points at it
            checkpoint.save(cfg.save_path,
                            train_state.weights_payload(rt, model, max(start_epoch, cfg.epochs), history,
                                                        start.record()),
                            then=f"free some space, then rerun with --model-file {ckpt_path} to continue from the "
                                 "last checkpoint (intact)" if kept else None)
        rt.dist.barrier()  # no rank leaves (and tears the group down) while rank 0 still writes
        return FitResult(len(history), history, final, cfg.save_path)
    finally:  # release the shard files now, not whenever the loaders are collected
        for loader in (train_loader, val_loader):
            if loader is not None:
                loader.close()
        if metrics is not None:
            metrics.close()
        rt.close()


def _warn_at_chance(rt: Runtime, epoch: int, train_loss: float) -> None:
    classes = rt.ds.num_classes
    if rt.dist.is_main and epoch >= 1 and classes > 1 and abs(train_loss - math.log(classes)) < 0.01:
        log.warning("train loss %.3f sits at chance (ln %d): the learning rate may be too high for this "
                    "data (try --lr 0.001), or, on a small data set, neon's init is slow to start "
                    "(try --init kaiming)", train_loss, classes)
