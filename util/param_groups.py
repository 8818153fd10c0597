"""Optimizer parameter groups: weight-decay split, tagged with the freezable unit of each parameter.

Rule of timm's ``param_groups_weight_decay`` used by MAE and LocalMIM: no weight decay for 1-D parameters
(norms, biases) and names ending in ``.bias`` or listed in ``no_weight_decay``; everything else (including
cls_token and mask tokens, which are 3-D) decays. Frozen parameters are left out. Groups are keyed by
(unit, decay) so a later freeze event removes whole groups.

Fine-tuning's layer-wise lr decay (BEiT, Bao et al. 2022; MAE ``util/lr_decay.py param_groups_lrd``) uses
the same unit as its layer id: ``lr_scale = layer_decay ** (num_layers - unit)``, with unit None (head, final norms)
counted as ``num_layers`` (scale 1). One layer-id function, two consumers: FreezeOut and layer decay.

``lars_groups``: the linear probe's LARS groups, one pair per head of an lr grid (MoCo v3 / MAE ``main_linprobe.py``).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch.nn as nn


def param_groups(model: nn.Module, *, weight_decay: float, unit_of: Callable[[str], int | None] | None = None,
                 no_weight_decay: Iterable[str] = (), layer_decay: float | None = None,
                 num_layers: int | None = None) -> list[dict]:
    """Build AdamW param groups.

    Args:
        model: the module whose trainable parameters are grouped.
        weight_decay: decay of the decaying groups.
        unit_of: maps a parameter name to its freezable unit (None: never frozen early); all None if omitted.
        no_weight_decay: exact parameter names that never decay (e.g. timm's ``no_weight_decay()``).
        layer_decay: layer-wise lr decay; a group of unit i gets ``lr_scale = layer_decay ** (num_layers - i)``
            and unit None gets 1 (None: every ``lr_scale`` is 1).
        num_layers: exponent of unit 0, required with ``layer_decay``; MAE's ``len(blocks) + 1`` for a ViT whose
            units are 0 (patch embedding, cls token, pos embed) and j + 1 (block j).

    Returns:
        Groups ordered by unit (None last), decaying group first, each a dict with keys ``params``,
        ``weight_decay``, ``unit``, ``lr_scale`` and ``param_names``.

    Raises:
        ValueError: ``layer_decay`` is not positive, ``num_layers`` is missing, or a unit exceeds ``num_layers``.
    """
    if layer_decay is not None:
        if not layer_decay > 0:
            raise ValueError(f"layer_decay must be > 0, got {layer_decay}")
        if num_layers is None:
            raise ValueError("layer_decay needs num_layers (the exponent of unit 0, e.g. depth + 1 for a ViT)")
    skip = set(no_weight_decay)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        unit = unit_of(name) if unit_of is not None else None
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
        key = (unit if unit is not None else 1 << 30, not decay)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "unit": unit, "lr_scale": _lr_scale(unit, layer_decay,
                           num_layers), "weight_decay": weight_decay if decay else 0.0}
        group = groups[key]
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


def _lr_scale(unit: int | None, layer_decay: float | None, num_layers: int | None) -> float:
    """``layer_decay ** (num_layers - unit)``; 1 without layer decay or for unit None (the head's layer)."""
    if layer_decay is None or unit is None:
        return 1.0
    if not 0 <= unit <= num_layers:
        raise ValueError(f"unit {unit} lies outside [0, num_layers={num_layers}] of the layer-wise lr decay")
    return layer_decay ** (num_layers - unit)


def lars_groups(probe: nn.Module, lrs: list[float], weight_decay: float) -> list[dict]:
    """Head h's groups of a linear probe (``models.heads.LinearProbe``: ``probe.heads``) with ``lr_scale`` = its lr.
    MoCo v3's LARS (MAE's linear probe) = timm ``Lars`` with the trust ratio and weight decay on >1-D params only
    (``always_adapt``) and ``eps=0``; 1-D params take the raw gradient."""
    groups = []
    for head, lr in zip(probe.heads, lrs):
        params = [p for p in head.parameters() if p.requires_grad]
        groups.append({"params": [p for p in params if p.ndim > 1], "lr_scale": lr, "weight_decay": weight_decay,
                       "always_adapt": True})
        groups.append({"params": [p for p in params if p.ndim <= 1], "lr_scale": lr, "weight_decay": 0.0,
                       "always_adapt": False})
    return groups
