"""Training: ``fit(cfg)``, the neon AlexNet recipe on DALI-fed PyTorch, epoch after epoch.

``fit`` trains (resuming from a checkpoint when given one): the lr schedule (``lr_at``: neon's step
rule per epoch; warm-up and cosine per step, a pure function of epoch and step), one pass over
the train loader per epoch (``epoch.py``), evaluation every ``eval_freq`` epochs
(``evaluate.py``), checkpoints and the final weights. The data of epoch e (order, crops, flips)
and its dropout masks follow from (seed, e, rank) alone, so a run resumed from a checkpoint
continues exactly as an uninterrupted run would. Under torchrun every rank runs the same recipe
on its share of each epoch (``distributed.py``); losses are scaled so the step equals one
process's step over the global batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from alexnet_pipe.config import TrainConfig
from alexnet_pipe.errors import CheckpointError
from alexnet_pipe.fsutil import output_lock
from alexnet_pipe.model import checkpoint
from alexnet_pipe.model.params import param_groups
from alexnet_pipe.text import plural
from alexnet_pipe.train import start as warmstart
from alexnet_pipe.train import state as train_state
from alexnet_pipe.train.epoch import train_one_epoch
from alexnet_pipe.train.evaluate import EvalResult, evaluate, evaluate_ten_crop
from alexnet_pipe.train.loggers import Loggers, MetricsLog, TensorBoardLog
from alexnet_pipe.train.preempt import Preemption
from alexnet_pipe.train.runtime import BASE_BATCH, Runtime, open_run

log = logging.getLogger(__name__)


def lr_at(epoch: int, lr0: float, step: int = 20, gamma: float = 0.1, *, batch_step: int = 0,
          steps_per_epoch: int = 1, schedule: str = "step", epochs: int = 1, warmup_epochs: int = 0,
          warmup_k: float = 1.0) -> float:
    """The lr of step ``batch_step`` (0-based, of ``steps_per_epoch``) of 0-based ``epoch``: a pure function.

    - ``schedule`` "step": neon's Schedule(step, gamma), ``lr0 * gamma ** floor((epoch + 1) / step)``
      for the whole epoch (the default, unchanged);
    - "cosine" (Loshchilov & Hutter, SGDR, without restarts): per step, at t = epoch + batch_step /
      steps_per_epoch epochs, ``lr0 * (1 + cos(pi * (t - W) / (epochs - W))) / 2`` after the warm-up:
      from lr0 down to 0 at the end of the run's ``epochs``;
    - ``warmup_epochs`` W > 0 (Goyal et al. 2017, gradual warm-up): while t < W the lr the schedule
      gives (lr0 for cosine) times ``1/k + (1 - 1/k) * t / W``: linear per step from lr/k to it,
      with ``warmup_k`` k = max(1, global batch / 128) (``warmup_factor``).
    """
    t = epoch + batch_step / steps_per_epoch
    if schedule == "cosine":
        done = 0.0 if t < warmup_epochs else (t - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
        lr = lr0 * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
    else:
        lr = lr0 * gamma ** math.floor((epoch + 1) / step)
    if t < warmup_epochs:
        k = max(warmup_k, 1.0)
        lr *= 1.0 / k + (1.0 - 1.0 / k) * t / warmup_epochs
    return lr


def warmup_factor(global_batch: int) -> float:
    """Warm-up's k: the linear-scaling factor from neon's 128 images per step to ``global_batch``, at
    least 1 (a smaller batch's scaled lr is below neon's: nothing to warm up from)."""
    return max(1.0, global_batch / BASE_BATCH)


def schedule_of(cfg: TrainConfig, global_batch: int, steps_per_epoch: int):
    """``lr_at`` for this run, as f(epoch, batch_step, lr0); None where the lr is constant within every
    epoch (neon's step rule without warm-up: fit sets it once per epoch, as it always has)."""
    if cfg.lr_schedule == "step" and not cfg.warmup_epochs:
        return None
    k = warmup_factor(global_batch)

    def at(epoch: int, batch_step: int, lr0: float) -> float:
        return lr_at(epoch, lr0, cfg.lr_step, cfg.lr_gamma, batch_step=batch_step, steps_per_epoch=steps_per_epoch,
                     schedule=cfg.lr_schedule, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_k=k)
    return at


@dataclass(frozen=True)
class FitResult:
    epochs_run: int
    history: list[dict]
    final: EvalResult | None
    weights_path: Path | None
    stopped_by: int | None = None  # the signal that ended the run early (SIGTERM/SIGINT), or None
    checkpoint_path: Path | None = None  # where the run's last checkpoint is


def _global_settings(rt: Runtime) -> dict:
    """What every rank must agree on: checked once at start-up, before the first step."""
    from alexnet_pipe.loading.order import OrderConfig, epoch_order

    cfg = rt.cfg
    records = rt.ds.split_entry("train").records
    order = epoch_order(OrderConfig(records, True, cfg.rng_seed, subset_pct=cfg.subset_pct), 0)[0]
    # No alexnet-pipe writes a "created" field (read as it always was: the dataset's path, unless an
    # edited manifest adds one, which is then an unknown field, in ``extra``).
    dataset = rt.ds.meta.extra.get("created", str(rt.ds.root))
    return {"world_size": rt.dist.world_size, "lr": rt.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "crop": cfg.crop, "seed": cfg.rng_seed, "datatype": cfg.datatype, "train_records": records,
            "classes": rt.ds.num_classes, "epoch0_order_head": order[:16].tolist(),
            "model_file": str(cfg.model_file), "dataset": dataset}


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
    locks = contextlib.ExitStack()
    try:
        if main:  # the writer: its outputs are its own for the whole run
            for path in dict.fromkeys(p for p in (cfg.save_path, cfg.resolved_checkpoint_path(), cfg.output_file)
                                      if p is not None):
                locks.enter_context(output_lock(path, "alexnet-pipe train"))
        ds = rt.ds
        start = warmstart.decide_start(cfg, ds)  # crop and normalisation may come from --model-file
        rt.cfg = cfg = start.cfg
        rt.use_input(start.spec)
        reads = ("train", "val") if cfg.eval_freq else ("train",)  # the splits this run reads
        rt.warn_small_images(reads, crop_option=start.spec is None or start.model_config.arch == "torchvision")
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
            changes = {**train_state.resume_changes(body, cfg, source), **train_state.scale_changes(body, rt)}
            train_state.apply_hyperparameters(opt, rt.lr, cfg)
            if changes and main:
                log.info("resuming with changed settings: %s",
                         ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()))
            if (restored.start_epoch or restored.partial.step) and main:
                log.info("resuming %s after epoch %d%s", source, restored.start_epoch,
                         f", step {restored.partial.step}" if restored.partial.step else "")
            if restored.start_epoch >= cfg.epochs and main:
                log.warning("%s already has %s; nothing to train (raise -e)", source,
                            plural(restored.start_epoch, "epoch"))
        start_epoch, history, partial = restored.start_epoch, restored.history, restored.partial
        if start_epoch < cfg.epochs:  # one pipeline serves every epoch: its source knows each epoch's order
            train_loader = rt.loader("train", True, start_epoch, start_step=partial.step)
        steps_per_epoch = len(train_loader) if train_loader is not None else 1
        schedule = schedule_of(cfg, rt.global_batch, steps_per_epoch)
        metrics = Loggers(MetricsLog(cfg.output_file, enabled=main),
                          TensorBoardLog(cfg.tensorboard_dir, steps_per_epoch)
                          if main and cfg.tensorboard_dir else None)
        metrics.start(start_epoch if start.resume else None, partial.step, changes)
        train_model = rt.dist.wrap(model, bf16_grads=cfg.resolved_allreduce_dtype() == "bf16")
        if cfg.compile:
            # One static graph per mode: the partial last batch is padded to -z (its padded rows
            # get no gradient) instead of torch compiling a second, dynamic-batch graph for it,
            # which evaluation would then also run (model.compile_fixed_batch; tests/gpu/test_levers.py
            # counts the graphs).
            from alexnet_pipe.model.compiled import compile_fixed_batch

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
                set_lr = None
                if schedule is not None:  # warm-up or cosine: the lr of every step, set before it
                    def set_lr(batch_step: int, e=epoch) -> float:
                        for group in opt.param_groups:
                            group["lr"] = schedule(e, batch_step, group["lr0"])
                        return opt.param_groups[0]["lr"]
                    set_lr(0)  # the epoch's first step (the row's lr)
                lr = opt.param_groups[0]["lr"]
                run = train_one_epoch(train_model, train_loader, opt, scaler, rt, epoch, lr, partial, preemption,
                                      on_checkpoint=lambda progress, e=epoch: save_checkpoint(e, progress),
                                      on_log=lambda progress, e=epoch: metrics.write_step(
                                          e + 1, opt.param_groups[0]["lr"], progress), set_lr=set_lr)
                partial = train_state.Partial()
                if not run.finished:
                    stopped_by = preemption.signal
                    break
                seen, seconds = run.partial.samples, run.partial.seconds
                record = {"epoch": epoch + 1, "lr": lr, **_lr_detail(cfg, schedule, epoch, steps_per_epoch,
                                                                    opt.param_groups[0]["lr0"]),
                          **({"lighting": cfg.lighting} if cfg.lighting else {}),
                          "train_loss": run.mean_loss, "samples": seen,
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
                    if last and cfg.ten_crop:  # --eval-ten-crop: the plain model (10 x -z rows: no fixed-batch graph)
                        final = replace(final, ten_crop=evaluate_ten_crop(model, rt))
                        record.update(final.metrics())
                    if main:
                        for line in final.lines():
                            log.info("epoch %d: %s", epoch + 1, line)
                _warn_at_chance(rt, start, epoch, run.mean_loss)
                history.append(record)
                stopping = preemption.stop_after_epoch()  # every rank, the same answer
                # The checkpoint first: on a full disk the trained epoch is kept (or the run stops
                # saying so), and a metrics row that cannot be written is only a warning (loggers.py).
                if cfg.serialize and ((epoch + 1) % cfg.serialize == 0 or last) or stopping:
                    save_checkpoint(epoch + 1)
                    preemption.checkpointed()
                metrics.write(record)
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
        locks.close()


def _lr_detail(cfg: TrainConfig, schedule, epoch: int, steps: int, lr0: float) -> dict:
    """What an epoch row adds where the lr varies within the epoch: the last step's lr (``lr`` is the
    first's) and the options that make it vary; nothing (the row as before) without them."""
    if schedule is None:
        return {}
    return {"lr_last": schedule(epoch, steps - 1, lr0), "lr_schedule": cfg.lr_schedule,
            "warmup_epochs": cfg.warmup_epochs}


def _warn_at_chance(rt: Runtime, start: warmstart.Start, epoch: int, train_loss: float) -> None:
    """A loss stuck at ln(classes), with advice that fits this run: a tenth of its --lr, and
    --init kaiming only where neon's init drew the whole network (not from --model-file's weights)."""
    classes = rt.ds.num_classes
    if rt.dist.is_main and epoch >= 1 and classes > 1 and abs(train_loss - math.log(classes)) < 0.01:
        advice = f"the learning rate may be too high for this data (try --lr {rt.cfg.lr / 10:g})"
        if start.body is None and rt.cfg.init != "kaiming":
            advice += ", or, on a small data set, neon's init is slow to start (try --init kaiming)"
        log.warning("train loss %.3f sits at chance (ln %d): %s", train_loss, classes, advice)
