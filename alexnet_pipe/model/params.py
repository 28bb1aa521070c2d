"""A model's parameters as the optimizer sees them: neon's param groups (weights with decay, biases
at a higher lr without, an optional fine-tuning head) and their lr multipliers, and the parameter count.
"""

from __future__ import annotations

from torch import nn

from alexnet_pipe.errors import InputError

__all__ = ["GROUP_NAMES", "count_parameters", "group_lr_mult", "param_groups"]

GROUP_NAMES = ("weights", "biases", "head weights", "head biases")


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, bias_lr_mult: float = 2.0,
    head: str | None = None, head_lr_mult: float = 1.0,
) -> list[dict]:
    """neon's two optimizer groups: weights (lr, decay) and biases (lr * mult, no decay); with
    ``head`` (a layer name, e.g. "fc8" when fine-tuning) two more for that layer at ``head_lr_mult``.

    Each group carries ``name`` ("weights", "biases", "head weights", "head biases") and ``lr0``,
    its base lr, which a schedule scales (``g["lr"] = g["lr0"] * factor``) without losing the
    groups' ratios. Frozen parameters (``requires_grad`` False) are in no group.

    Example: ``torch.optim.SGD(param_groups(model, 0.01, 5e-4), momentum=0.9)`` trains
    weights at 0.01 with decay 5e-4 and biases at 0.02 without decay.

    Args:
        model: any module; parameters named ``*.bias`` are biases, all others weights.
        lr: base learning rate of the weights.
        weight_decay: L2 decay of the weights.
        bias_lr_mult: bias lr = lr * bias_lr_mult.
        head: the layer whose parameters get their own groups, or None.
        head_lr_mult: the head's lr = lr * head_lr_mult (its biases' also x bias_lr_mult).
    Returns:
        ``[{"name": "weights", ...}, {"name": "biases", ...}, ...]``, every trainable parameter in one.
    """
    if lr < 0:
        raise InputError(f"lr must be >= 0, got {lr}")
    if weight_decay < 0:
        raise InputError(f"weight_decay must be >= 0, got {weight_decay}")
    if bias_lr_mult < 0 or head_lr_mult < 0:
        raise InputError(f"lr multipliers must be >= 0, got {bias_lr_mult} and {head_lr_mult}")
    groups: dict[str, list] = {name: [] for name in GROUP_NAMES[: 4 if head else 2]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, kind = name.rsplit(".", 1)
        groups[("head " if layer == head else "") + ("biases" if kind == "bias" else "weights")].append(p)
    out = []
    for name, params in groups.items():
        group_lr = lr * group_lr_mult(name, bias_lr_mult, head_lr_mult)
        out.append({"name": name, "params": params, "lr": group_lr, "lr0": group_lr,
                    "weight_decay": 0.0 if name.endswith("biases") else weight_decay})
    return out


def group_lr_mult(name: str, bias_lr_mult: float, head_lr_mult: float) -> float:
    """A ``param_groups`` group's lr relative to the base lr."""
    return (bias_lr_mult if name.endswith("biases") else 1.0) * (head_lr_mult if name.startswith("head") else 1.0)


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter elements (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
