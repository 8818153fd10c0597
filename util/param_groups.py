"""Optimizer parameter groups: weight-decay split, tagged with the freezable unit of each parameter.

Rule of timm's ``param_groups_weight_decay`` used by MAE and LocalMIM: no weight decay for 1-D parameters
(norms, biases) and names ending in ``.bias`` or listed in ``no_weight_decay``; everything else (including
cls_token and mask tokens, which are 3-D) decays. Frozen parameters are left out. Groups are keyed by
(unit, decay) so a later freeze event removes whole groups (DESIGN 1.2).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch.nn as nn


def param_groups(model: nn.Module, *, weight_decay: float, unit_of: Callable[[str], int | None] | None = None,
                 no_weight_decay: Iterable[str] = ()) -> list[dict]:
    """Build AdamW param groups.

    Args:
        model: the module whose trainable parameters are grouped.
        weight_decay: decay of the decaying groups.
        unit_of: maps a parameter name to its freezable unit (None: never frozen early); all None if omitted.
        no_weight_decay: exact parameter names that never decay (e.g. timm's ``no_weight_decay()``).

    Returns:
        Groups ordered by unit (None last), decaying group first, each a dict with keys ``params``,
        ``weight_decay``, ``unit``, ``lr_scale`` (1.0) and ``param_names``.
    """
    skip = set(no_weight_decay)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        unit = unit_of(name) if unit_of is not None else None
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
        key = (unit if unit is not None else 1 << 30, not decay)
        group = groups.setdefault(key, {"params": [], "param_names": [], "unit": unit, "lr_scale": 1.0,
                                         "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]
