"""One training epoch: the step's loss and update, and the pass over the loader around them.

``train_one_epoch`` takes the steps of one epoch (from mid-epoch when resuming), sums the loss on
the device and reads it back only every ``log_every`` steps, shows progress (a tqdm bar, or log
lines when stderr is not a terminal), and ends the pass early for a checkpoint or a stop when
``preempt.py`` asks. ``step_loss`` and ``update`` are the step itself, shared with the benchmarks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alexnet_pipe.config import TrainConfig
from alexnet_pipe.errors import TrainingError
from alexnet_pipe.loading.loader import Batch, Loader
from alexnet_pipe.progress import Progress
from alexnet_pipe.train import state as train_state
from alexnet_pipe.train.preempt import Action, Preemption
from alexnet_pipe.train.runtime import Runtime

log = logging.getLogger(__name__)


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
                    on_log: Callable[[train_state.Partial], None] | None = None,
                    set_lr: Callable[[int], float] | None = None) -> EpochRun:
    """One pass over the loader (epoch ``epoch``), from step ``start.step`` when resuming.

    After each step ``preemption`` may ask for a checkpoint (``on_checkpoint`` gets the progress)
    or for a stop: the pass then ends early with ``finished`` False. ``on_log`` gets the progress
    every ``log_every`` steps. ``set_lr`` (warm-up, cosine) sets the optimizer's lr before each step
    from the step's number and returns it (None: ``lr`` for the whole epoch). Losses are summed on the
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
    bar = Progress(loader.samples * rt.dist.world_size, f"epoch {epoch + 1}/{cfg.epochs}", "img",
                   enabled=cfg.progress and rt.dist.is_main, bar=cfg.progress_bar, initial=start.samples,
                   lines=False, smoothing=0.1)  # plain: the line below, and fit's line after each epoch
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
        if set_lr is not None:  # warm-up or cosine: this step's lr, a function of (epoch, step) alone
            lr = set_lr(batch.step)
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
            if bar.due():
                _log_progress(cfg, epoch, len(loader), now, lr)
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


def _log_progress(cfg: TrainConfig, epoch: int, steps: int, now: train_state.Partial, lr: float) -> None:
    """The plain progress line (stderr is not a terminal): img/s, the share of time waiting for
    data and the epoch's ETA."""
    rate = now.step / now.seconds if now.seconds else 0.0
    eta = (steps - now.step) / rate if rate else 0.0
    log.info("epoch %d/%d step %d/%d: loss %.4f, lr %g, %.0f img/s, data wait %.0f%%, epoch ETA %dm%02ds",
             epoch + 1, cfg.epochs, now.step, steps, now.loss_sum / max(now.samples, 1), lr,
             now.samples / now.seconds if now.seconds else 0.0,
             100 * now.data_wait_s / now.seconds if now.seconds else 0.0, eta // 60, eta % 60)


def _check_finite(mean_loss: float, epoch: int, lr: float) -> None:
    if not math.isfinite(mean_loss):
        raise TrainingError(
            f"the loss became {mean_loss} in epoch {epoch + 1}; the learning rate {lr:g} is too high "
            "for this data: try a --lr ten times smaller than this run's, or check the mean file"
        )
