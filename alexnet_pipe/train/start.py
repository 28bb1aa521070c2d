"""What a run starts from: fresh weights, a checkpoint to resume, or weights to start from.

``decide_start`` reads ``--model-file`` (any weights file: trained here or imported) and decides,
before any work, which network to build, which input it expects (``InputSpec``: crop, channel
order, value range, mean/std, from the file unless given, a conflicting flag refused naming both
values), whether the run resumes, and whether fc8 is new (fine-tuning onto other classes, only
with ``--finetune``). ``build`` then makes the network, loads the weights and freezes layers.

The rules:
- a checkpoint of this dataset's classes resumes (a fine-tuning run's checkpoint too);
- weights of this dataset's classes start a new run from them (all layers kept);
- weights of other classes need ``--finetune``: a new fc8 for this dataset, the rest kept;
- ``--finetune`` with a checkpoint not written by a fine-tuning run starts a new run from its weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from alexnet_pipe.config import TrainConfig
from alexnet_pipe.dataset.layout import MANIFEST_FILE
from alexnet_pipe.dataset.manifest import Dataset
from alexnet_pipe.errors import CheckpointError
from alexnet_pipe.model.alexnet import AlexNetConfig, build_model
from alexnet_pipe.model.inputspec import InputSpec
from alexnet_pipe.model.model_file import open_model_file

log = logging.getLogger(__name__)

HEAD = "fc8"  # the layer fine-tuning replaces


@dataclass
class Start:
    """What ``fit``/``run_test`` build and load; ``cfg`` has the crop and normalisation resolved."""

    cfg: TrainConfig
    model_config: AlexNetConfig
    spec: InputSpec | None  # None: the dataset's own input (a fresh run)
    body: dict | None = None  # the --model-file's contents
    source: Path | None = None  # the file read (a rotated older checkpoint when the newest is damaged)
    resume: bool = False  # restore optimizer, epoch and progress too
    new_head: bool = False  # fc8 is new (fine-tuning onto other classes)
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict | None:
        """What checkpoints and weights keep about the start (a resumed run rebuilds the same groups)."""
        if self.body is None:
            return None
        if self.resume:
            return self.body.get("start")
        return {"model_file": str(self.source), "new_head": self.new_head, "freeze": self.cfg.freeze,
                "imported_from": (self.body.get("imported_from") or {}).get("format")}


def decide_start(cfg: TrainConfig, ds: Dataset, testing: bool = False) -> Start:
    """Read ``cfg.model_file`` (if any) and decide how the run starts (see the module's rules).

    Raises:
        CheckpointError: the file does not fit this dataset or these flags (one line, with the fix).
    """
    if cfg.model_file is None:
        return Start(cfg, AlexNetConfig(num_classes=ds.num_classes, crop=cfg.crop), None)
    opened = open_model_file(cfg.model_file, synsets=cfg.synsets, devkit_order=ds.devkit_order(),
                             dataset=str(ds.root / MANIFEST_FILE), need_classes=not cfg.finetune,
                             newest_good=not testing)
    body, source = opened.body, opened.source
    mc = AlexNetConfig.from_dict(body["model_config"])
    cfg, spec = _resolve_flags(cfg, InputSpec.from_data(body["data"], mc.crop), source, mc.arch == "torchvision")
    mc = replace(mc, crop=spec.crop)
    same = _same_classes(body, ds)
    start = Start(cfg, mc, spec, body, source)
    if same is None:
        start.resume = body["kind"] == "checkpoint" and not testing \
            and (not cfg.finetune or bool((body.get("train_config") or {}).get("finetune")))
        start.new_head = bool((body.get("start") or {}).get("new_head")) if start.resume else False
        _check_init(cfg, start)
        return start
    if testing or not cfg.finetune:
        hint = "" if testing else f"; to train a new fc8 for this dataset's {ds.num_classes} classes, add --finetune"
        if _numbered(body) and mc.num_classes == ds.num_classes:
            hint += ("; if they are the same classes, re-import the weights with --synsets (the source's class "
                     "list) so that they carry class ids")
        raise CheckpointError(f"{source} {same}{hint}")
    start.model_config = replace(mc, num_classes=ds.num_classes)
    start.new_head = True
    start.notes.append(f"fine-tuning {source.name}: a new fc8 for {ds.num_classes} classes "
                       f"(it had {mc.num_classes})")
    return start


def _check_init(cfg: TrainConfig, start: Start) -> None:
    """Refuse --init where every layer comes from the file (it would be silently ignored); a resume
    may repeat the run's own --init (the printed resume line does)."""
    if cfg.init is None:
        return
    if start.resume:
        drawn = (start.body.get("train_config") or {}).get("init") or "neon"
        if drawn == cfg.init:
            return
        raise CheckpointError(f"{start.source} was started with --init {drawn}, this run asks for --init {cfg.init}; "
                              "a resumed run keeps its weights: drop --init")
    raise CheckpointError(f"--init {cfg.init} draws fresh weights, but this run starts from {start.source}, which "
                          "gives every layer; drop --init (it applies to a fresh run, and to the new fc8 of "
                          "--finetune onto other classes)")


def _resolve_flags(cfg: TrainConfig, spec: InputSpec, source: Path, any_crop: bool) -> tuple[TrainConfig, InputSpec]:
    """The crop and --normalize-std from the weights where not given; a conflicting flag refused.
    ``any_crop``: the network takes any crop (torchvision's adaptive pooling), so --crop may differ."""
    crop_from, std_from = cfg.settings_from_weights
    if not crop_from and any_crop:
        spec = replace(spec, crop=cfg.crop)
    elif not crop_from and cfg.crop != spec.crop:
        raise CheckpointError(f"{source} was trained with --crop {spec.crop}, this run asks for --crop {cfg.crop}; "
                              f"drop --crop (it comes from the weights)")
    has_std = spec.std_rgb is not None
    if not std_from and cfg.normalize_std != has_std:
        raise CheckpointError(f"{source} takes input {'divided' if has_std else 'not divided'} by the std, this run "
                              f"asks for {'--normalize-std' if cfg.normalize_std else 'no std'}; drop --normalize-std "
                              "(it comes from the weights)")
    return replace(cfg, crop=spec.crop, normalize_std=has_std), spec


def _same_classes(body: dict, ds: Dataset) -> str | None:
    """None when the weights' classes are the dataset's, else the difference as a phrase."""
    mc, here = body["model_config"], [c.id for c in ds.meta.classes]
    trained = body["data"].get("classes")
    if mc.get("num_classes") != len(here):
        return f"has {mc.get('num_classes')} classes; {ds.root} has {len(here)}"
    if trained is not None and list(trained) != here:
        first = next(i for i, (a, b) in enumerate(zip(trained, here)) if a != b)
        return (f"was trained on other classes (class {first} is {trained[first]!r} there, {here[first]!r} in "
                f"{ds.root}); its scores would be read against the wrong labels")
    return None


def _numbered(body: dict) -> bool:
    """Imported without --synsets: classes named 0..n-1."""
    classes = body["data"].get("classes") or []
    return classes == [str(i) for i in range(len(classes))]


def build(start: Start, device: torch.device, seed: int, init: str | None) -> torch.nn.Module:
    """The network, with the start's weights loaded (a new fc8 drawn from ``seed``), frozen layers
    set, on ``device``. The same ``seed`` gives the same weights on every rank."""
    gen = torch.Generator().manual_seed(seed)
    model = build_model(start.model_config, generator=gen, init=init or "neon")  # None: not chosen
    if start.body is not None:
        state = start.body["model"]
        if start.new_head and not start.resume:  # a resumed fine-tuning run has its trained fc8
            state = {k: v for k, v in state.items() if not k.startswith(HEAD + ".")}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or sorted(missing) != [f"{HEAD}.bias", f"{HEAD}.weight"]:
                raise CheckpointError(f"{start.source}: layers do not match the network ({missing or unexpected})")
        else:
            model.load_state_dict(state)
    freeze(model, start.cfg.freeze)
    return model.to(device)


def freeze(model: torch.nn.Module, what: str) -> list[str]:
    """Stop gradients for ``what``: "conv" (conv1..conv5), "features" (all but fc8) or "none".
    Returns the frozen layers' names."""
    if what == "none":
        return []
    layers = [c.name for c in model.convs] + (["fc6", "fc7"] if what == "features" else [])
    for name in layers:
        for p in getattr(model, name).parameters():
            p.requires_grad_(False)
    return layers
