"""Evaluation: loss, top-1 and top-5 over a split, and the ``test`` job (``run_test``).

With ten crops (``test --ten-crop``, ``train --eval-ten-crop``) a second pass after the single
crop's feeds each image's ten views (``loading/pipeline.py``: ``TEN_CROP_VIEWS``) through the
model in one batch and averages their softmax per image (Krizhevsky et al. 2012): the loss is the
negative log of that average's probability of the label, top-k ranks the average.

``evaluate`` serves ``fit`` (every ``eval_freq`` epochs, on the model being trained) and
``run_test``, which evaluates a weights file with the network and the input it records, with
per-class figures on request (``report.py``). Both sum over all ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from alexnet_pipe.config import TrainConfig
from alexnet_pipe.dataset.records import source_names
from alexnet_pipe.errors import AlexnetPipeError, DatasetError
from alexnet_pipe.fsutil import OutputError
from alexnet_pipe.loading.loader import Loader
from alexnet_pipe.progress import Progress
from alexnet_pipe.train import start as warmstart
from alexnet_pipe.train.loggers import MetricsLog
from alexnet_pipe.train.report import PerClass, write_per_class
from alexnet_pipe.train.runtime import Runtime, open_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    top1: float  # percent
    top5: float | None  # percent; None with 5 classes or fewer, where every label is in the top 5
    samples: int
    per_class: PerClass | None = None  # confusion matrix and per-class top-5 hits (test --per-class)
    ten_crop: EvalResult | None = None  # the same split over ten views per image (test --ten-crop)

    def neon_line(self) -> str:
        line = f"LogLoss: {self.loss:.2f}, Accuracy: {self.top1:.1f} % (Top-1)"
        return line + (f", {self.top5:.1f} % (Top-5)" if self.top5 is not None else "")

    def lines(self) -> list[str]:
        """The single-crop line, then the ten-crop one when there is one."""
        return [self.neon_line()] + ([f"Ten crops: {self.ten_crop.neon_line()}"] if self.ten_crop else [])

    def metrics(self, prefix: str = "val") -> dict:
        """The figures a metrics row holds: ``val_loss``, ``val_top1``, ``val_top5``, and with ten
        crops also ``val_ten_crop_loss``, ``val_ten_crop_top1``, ``val_ten_crop_top5``."""
        row = {f"{prefix}_loss": self.loss, f"{prefix}_top1": self.top1, f"{prefix}_top5": self.top5}
        return row | (self.ten_crop.metrics(f"{prefix}_ten_crop") if self.ten_crop else {})


class ResultNotSaved(OutputError):
    """The evaluation finished (``result``) but its per-class files could not be written (a full
    disk): a caller that reports the figures shows them first, then this error's line."""

    def __init__(self, result: EvalResult, error: AlexnetPipeError):
        super().__init__(str(error))
        self.result = result


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
    answers: list[torch.Tensor] = []  # per_class: per batch, each sample's (label, prediction, its probability)
    with torch.inference_mode():
        shown = progress and rt.dist.is_main
        bar = Progress(len(loader), "eval", "batch", enabled=shown, bar=shown and rt.cfg.progress_bar, leave=False)
        for batch in loader:
            with rt.autocast():
                logits = model(batch.images)
            logits, labels = logits.float(), batch.labels
            if batch.views > 1:  # each image's views -> the log of their mean softmax (the loss: its NLL)
                probs = logits.softmax(1).view(-1, batch.views, logits.shape[1]).mean(1)
                logits = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
            if per_class:  # padding too: it keeps each sample at its place in the split (see _by_record)
                score, predicted = logits.softmax(1).max(1)
                answers.append(torch.stack([labels.double(), predicted.double(), score.double()], 1))
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
            bar.update(1)
        bar.close()
    rt.dist.sum_(loss_sum, hits, count, confusion, top5_hits)
    n = int(count.item())
    if n == 0:
        raise DatasetError("the validation split yielded no samples")
    top1, top5 = (100.0 * h / n for h in hits.tolist())
    table = None
    if per_class:
        samples = _by_record(answers, rt, n)
        table = PerClass(confusion.cpu().numpy().reshape(classes, classes), top5_hits.cpu().numpy(),
                         samples[:, 0].astype("int64"), samples[:, 1].astype("int64"), samples[:, 2])
    return EvalResult(loss_sum.item() / n, top1, top5 if classes > 5 else None, n, table)


def _by_record(answers: list[torch.Tensor], rt: Runtime, n: int):
    """Every rank's (label, prediction, probability) rows as one array in record order (n x 3).

    Validation reads the split in stored order, dealt round-robin: rank r's i-th sample is record
    r + i * ranks, and the padding that evens out the ranks comes last. Each rank puts its rows at
    their places in a zeroed array and one sum over the ranks fills it."""
    mine = torch.cat(answers) if answers else torch.zeros(0, 3, dtype=torch.float64, device=rt.device)
    every = torch.zeros(len(mine) * rt.dist.world_size, 3, dtype=torch.float64, device=rt.device)
    every[rt.dist.rank::rt.dist.world_size] = mine
    rt.dist.sum_(every)
    return every[:n].cpu().numpy()


def evaluate_ten_crop(model: torch.nn.Module, rt: Runtime, progress: bool = False,
                      per_class: bool = False) -> EvalResult:
    """``evaluate`` over the val split's ten views per image (a loader of its own, closed after)."""
    loader = rt.loader("val", False, 0, ten_crop=True)
    try:
        return evaluate(model, loader, rt, progress, per_class)
    finally:
        loader.close()


def run_test(cfg: TrainConfig) -> EvalResult:
    """Evaluate ``cfg.model_file`` on the validation split (`--test_only`), over all ranks, with
    the network and input the weights file records (crop, channel order, value range, mean/std);
    with ``cfg.ten_crop`` also over ten views per image (``EvalResult.ten_crop``). Per-class files
    that cannot be written raise ``ResultNotSaved``, which holds the result."""
    rt = open_run(cfg, join=True)
    loader = None
    try:
        start = warmstart.decide_start(cfg, rt.ds, testing=True)
        rt.cfg = start.cfg
        rt.use_input(start.spec)
        rt.warn_small_images(("val",), crop_option=False)  # test reads val; its crop is the weights'
        model = warmstart.build(start, rt.device, cfg.rng_seed, cfg.init)
        if rt.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loader = rt.loader("val", False, 0)
        result = evaluate(model, loader, rt, cfg.progress, per_class=cfg.per_class_file is not None)
        if cfg.ten_crop:
            loader.close()
            result = replace(result, ten_crop=evaluate_ten_crop(model, rt, cfg.progress,
                                                                per_class=cfg.per_class_file is not None))
        unsaved = None
        if rt.dist.is_main and cfg.per_class_file is not None:
            classes = rt.ds.meta.classes
            wrong = result.per_class.misclassified()
            files = source_names(rt.ds, "val", wrong.tolist())
            try:
                for path in write_per_class(result.per_class, [c.id for c in classes],
                                            [c.name or "" for c in classes], cfg.per_class_file, files=files,
                                            ten_crop=result.ten_crop.per_class if result.ten_crop else None):
                    log.info("wrote %s", path)
            except AlexnetPipeError as exc:  # a full disk: the evaluation is not lost with the file
                unsaved = ResultNotSaved(result, exc)
        if rt.dist.is_main:
            MetricsLog(cfg.output_file).write({
                "event": "test", "model_file": str(cfg.model_file), **result.metrics(), "samples": result.samples,
                "world_size": rt.dist.world_size})
        if unsaved is not None:
            raise unsaved
        return result
    finally:
        if loader is not None:
            loader.close()
        rt.close()
