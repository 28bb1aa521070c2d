"""What a checkpoint or weights file holds of a run, and how a run is restored from one.

The training RNG is reseeded from (seed, epoch, step, rank) before every step (``seed_step``),
and the data of a step is a function of (seed, epoch, step) (``order.py``), so a checkpoint needs
no RNG or DALI state: one written mid-epoch resumes at the next step with exactly the samples,
crops, flips and dropout masks that remained, and one written by N ranks resumes on M (with the
data of the remaining steps, but other dropout masks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alexnet_pipe.config import STORED_WHEN_SET
from alexnet_pipe.errors import CheckpointError
from alexnet_pipe.model.params import group_lr_mult
from alexnet_pipe.train.runtime import Runtime

_DROPOUT_STREAM = 0xD50


@dataclass
class Partial:
    """How far into an epoch a run got: its steps and its sums so far, over all ranks."""

    step: int = 0  # steps of the epoch done
    loss_sum: float = 0.0
    samples: int = 0
    seconds: float = 0.0
    data_wait_s: float = 0.0  # of ``seconds``, the time spent waiting for the next batch (mean over ranks)

    def to_dict(self) -> dict:
        return {"step": self.step, "loss_sum": self.loss_sum, "samples": self.samples, "seconds": self.seconds,
                "data_wait_s": self.data_wait_s}


@dataclass
class Restored:
    start_epoch: int  # epochs fully trained
    history: list[dict]  # their metrics rows
    partial: Partial  # progress into epoch ``start_epoch`` (a mid-epoch checkpoint)


def seed_step(seed: int, epoch: int, step: int, rank: int) -> None:
    """Seed torch's RNGs (dropout) for one step: distinct per rank, fixed by (seed, epoch, step).
    A host-side call that queues no device work; about 10 us."""
    state = np.random.SeedSequence([seed % 2**63, epoch, step, rank, _DROPOUT_STREAM]).generate_state(2, np.uint64)
    torch.manual_seed(int(state[0] >> np.uint64(1)))


# Resuming: what a resumed run must keep (it defines the run's data), and what it may change.
# Changes are applied, logged, and recorded in the -o file's "resumed" row.
# --init: start.py's _check_init (not given on resume: the checkpoint's weights, whatever drew them)
_KEPT_ON_RESUME = {"normalize_std": "--normalize-std", "rng_seed": "-r/--rng-seed", "freeze": "--freeze"}
_CHANGEABLE = ("epochs", "lr", "lr_scale", "lr_step", "lr_gamma", "momentum", "weight_decay", "bias_lr_mult",
               "head_lr_mult", "batch_size", "subset_pct", "eval_freq", "ten_crop", "serialize", "datatype", "backend",
               "warmup_epochs", "lr_schedule", "lighting")


def resume_changes(body: dict, cfg, path: Path) -> dict[str, list]:
    """{setting: [before, now]} for what this run changes against the checkpoint it resumes;
    refuses a change of a setting the run must keep, naming both values."""
    # an option stored only when on (config.STORED_WHEN_SET) was off where the key is absent
    before = {**STORED_WHEN_SET, **(body.get("train_config") or {})}
    for key, flag in _KEPT_ON_RESUME.items():
        if key in before and before[key] != getattr(cfg, key):
            raise CheckpointError(
                f"{path} was trained with {flag} {before[key]}, this run asks for {getattr(cfg, key)}; a resumed run "
                f"keeps it (pass {flag} {before[key]}), or start a new run from its weights with --finetune")
    return {k: [before[k], getattr(cfg, k)] for k in _CHANGEABLE if k in before and before[k] != getattr(cfg, k)}


def scale_changes(body: dict, rt: Runtime) -> dict[str, list]:
    """{what: [before, now]} for the run's scale against the checkpoint it resumes: the rank count
    (``world_size``), the global batch (-z x ranks) and the weights' base lr used (``lr_used``, which
    --lr-scale linear ties to the global batch); what did not change, or the checkpoint lacks, is left out."""
    before = {"world_size": body.get("world_size"), "global_batch": body.get("global_batch"),
              "lr_used": next((g.get("lr0") for g in (body.get("optimizer") or {}).get("param_groups", [])
                               if g.get("name", "weights") == "weights"), None)}
    now = {"world_size": rt.dist.world_size, "global_batch": rt.global_batch, "lr_used": rt.lr}
    return {k: [before[k], now[k]] for k in now
            if before[k] is not None and not math.isclose(before[k], now[k], rel_tol=1e-9)}


def apply_hyperparameters(opt, lr: float, cfg) -> None:
    """Set lr, momentum and weight decay from this run's flags over the values a checkpoint's
    optimizer state brought back (its momentum buffers are kept)."""
    for group in opt.param_groups:
        name = group.get("name", "weights")
        group["lr0"] = lr * group_lr_mult(name, cfg.bias_lr_mult, cfg.head_lr_mult)
        group["lr"] = group["lr0"]
        group["momentum"] = cfg.momentum
        group["weight_decay"] = 0.0 if name.endswith("biases") else cfg.weight_decay


# How an optimizer steps, not what it learnt: this run's -b/-d choose these (fit builds a fused SGD
# on the GPU), and a resumed run may change -b and -d.
_IMPLEMENTATION = ("fused", "foreach", "differentiable", "capturable")


def restore(body: dict, opt, scaler) -> Restored:
    """From a checkpoint (the weights are loaded already): the optimizer, the epoch count, the progress.

    ``load_state_dict`` replaces the param groups whole, implementation flags included: a -b cpu
    checkpoint would turn a -b gpu run's fused SGD into a per-tensor one, which a GradScaler (-d f16)
    still hands its grad_scale, and torch raises at the first step; a -b gpu checkpoint resumed
    with -b cpu would stay fused. The flags this run built its optimizer with are kept."""
    built = [{k: group[k] for k in _IMPLEMENTATION if k in group} for group in opt.param_groups]
    opt.load_state_dict(body["optimizer"])
    for group, flags in zip(opt.param_groups, built):
        for key in _IMPLEMENTATION:
            group.pop(key, None)
        group.update(flags)
    if scaler is not None and body.get("scaler"):
        scaler.load_state_dict(body["scaler"])
    partial = Partial(**body["partial"]) if body.get("partial") else Partial()
    return Restored(body["epoch"], list(body.get("history", [])), partial)


def checkpoint_payload(rt: Runtime, model, opt, scaler, epoch: int, history: list[dict],
                       partial: Partial | None = None, start: dict | None = None) -> dict:
    """A resumable checkpoint after ``epoch`` completed epochs and ``partial.step`` steps of the next."""
    return {
        "kind": "checkpoint", "model": model.state_dict(), "model_config": model.cfg.to_dict(),
        "data": rt.data_meta(), "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch, "partial": (partial or Partial()).to_dict(), "global_batch": rt.global_batch,
        "world_size": rt.dist.world_size, "train_config": rt.cfg.to_dict(), "history": history, "start": start,
    }


def weights_payload(rt: Runtime, model, epoch: int, history: list[dict], start: dict | None = None) -> dict:
    """The final weights: model, its config and the data settings, no optimizer."""
    return {
        "kind": "weights", "model": model.state_dict(), "model_config": model.cfg.to_dict(),
        "data": rt.data_meta(), "epoch": epoch, "train_config": rt.cfg.to_dict(), "history": history,
        "start": start,
    }
