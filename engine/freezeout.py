"""FreezeOut: progressive freezing of a network's leading units on per-unit cosine schedules.

Brock et al., "FreezeOut: Accelerate Training by Progressively Freezing Layers" (2017, github.com/ajbrock/
FreezeOut), as adapted to LocalMIM by ViTFreeze (github.com/utkutpcgl/ViTFreeze ``ViT/util/freezeout_utils.py``),
kept outside the modules. Two pieces:

- :class:`FreezeOutSchedule`, a pure frozen dataclass: given the optimizer step it tells each unit's lr and the
  length of the frozen prefix. Resume therefore needs no extra state. With ``t_0 = 1`` every unit follows the
  plain MAE cosine and nothing freezes early, so a run without ``--freezeout`` is this same code path.
- :class:`Freezer`, which applies the schedule's freeze events to a model and its optimizer at optimizer-step
  boundaries: ``requires_grad_(False)``, grads set to None, param groups and their optimizer state removed, frozen
  modules put in eval mode, DDP re-wrapped around the remaining trainable parameters. Modules are never deleted:
  state-dict keys are the same at every step.

Unit i of N+1 (i = 0..N) freezes at the fraction t_i = scale(t_0 + (1 - t_0) * i / N) of the post-warmup steps,
i.e. at step W + t_i * (T - W). Its lr warms up linearly from 0 to its own peak (lr / t_i with ``scale_lr``, else
lr) over the W warmup steps, then follows a half-cycle cosine that reaches ``min_lr`` exactly at its own freeze
point (0 by default), and is 0 from there on. Units without an index (MAE's decoder) follow the global schedule.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn as nn

from util.distributed import DistInfo, wrap_ddp
from util.lr_sched import cosine_lr

logger = logging.getLogger("vitfreeze")

SCALES: dict[str, Callable[[float], float]] = {"linear": lambda x: x, "squared": lambda x: x**2,
                                               "cubic": lambda x: x**3}


@dataclass(frozen=True)
class FreezeOutSchedule:
    """Per-unit learning rates and freeze points as pure functions of the optimizer step.

    Attributes:
        num_units: N + 1 freezable units, numbered in forward order.
        total_steps: optimizer steps of the whole run (T).
        base_lr: the run's peak lr (blr x effective batch / 256, or --lr).
        warmup_steps: W, shared linear warmup.
        t_0: pre-scaling start of the freeze fractions; 1 disables freezing.
        how_scale: linear, squared or cubic.
        scale_lr: peak lr of unit i is base_lr / t_i (``--not_scale_lr`` sets False: base_lr).
        layerwise_lr: per-unit cosine (``--non_layerwise_lr`` sets False: every unit follows the global
            schedule and is cut at its freeze point).
        min_lr: floor of the global schedule and end value of each unit's cosine.
        warmup_jump: ViTFreeze's behaviour (``--vitfreeze_compat``): every unit warms up to base_lr, jumps to its
            own peak at the end of warmup, and its cosine ends at 0 regardless of ``min_lr``.
    """

    num_units: int
    total_steps: int
    base_lr: float
    warmup_steps: int = 0
    t_0: float = 0.8
    how_scale: Literal["linear", "squared", "cubic"] = "cubic"
    scale_lr: bool = True
    layerwise_lr: bool = True
    min_lr: float = 0.0
    warmup_jump: bool = False

    def __post_init__(self) -> None:
        if self.how_scale not in SCALES:
            raise ValueError(f"how_scale must be one of {sorted(SCALES)}, got {self.how_scale!r}")
        if not 0.0 < self.t_0 <= 1.0:
            raise ValueError(f"t_0 must be in (0, 1], got {self.t_0}")
        if self.num_units < 1 or self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"invalid schedule sizes: num_units={self.num_units}, total_steps={self.total_steps}, "
                             f"warmup_steps={self.warmup_steps}")

    def freeze_fraction(self, unit: int) -> float:
        """t_i: fraction of the post-warmup steps after which ``unit`` is frozen (1 for the last unit)."""
        last = self.num_units - 1
        position = unit / last if last > 0 else 1.0
        return SCALES[self.how_scale](self.t_0 + (1.0 - self.t_0) * position)

    def freeze_point(self, unit: int) -> float:
        """Step (real-valued) at which ``unit`` freezes: W + t_i (T - W)."""
        return self.warmup_steps + self.freeze_fraction(unit) * (self.total_steps - self.warmup_steps)

    def freeze_step(self, unit: int) -> int:
        """First optimizer step at which ``unit`` is frozen (``total_steps`` or more: never within the run)."""
        return math.ceil(self.freeze_point(unit) - 1e-9)

    def num_frozen(self, step: int) -> int:
        """Length of the frozen prefix at ``step`` (monotone in step, since freeze points increase with unit)."""
        return sum(1 for unit in range(self.num_units) if step >= self.freeze_step(unit))

    def peak_lr(self, unit: int) -> float:
        return self.base_lr / self.freeze_fraction(unit) if self.scale_lr else self.base_lr

    def lr(self, unit: int | None, step: int) -> float:
        """Learning rate of ``unit`` (None: a never-frozen group, global schedule) at ``step``."""
        glob = cosine_lr(step, base_lr=self.base_lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                         total_steps=self.total_steps)
        if unit is None:
            return glob
        if step >= self.freeze_step(unit):
            return 0.0
        if not self.layerwise_lr:
            return glob
        if self.warmup_jump and step < self.warmup_steps:
            return glob
        return cosine_lr(step, base_lr=self.peak_lr(unit), min_lr=0.0 if self.warmup_jump else self.min_lr,
                         warmup_steps=self.warmup_steps, total_steps=self.freeze_point(unit))

    def describe(self, steps_per_epoch: int) -> list[str]:
        """One line per unit: freeze step, epoch and peak lr (for the log at start)."""
        lines = []
        for unit in range(self.num_units):
            step = self.freeze_step(unit)
            when = (f"step {step} (epoch {step / steps_per_epoch:.1f})" if step < self.total_steps
                    else "the end (never frozen)")
            lines.append(f"unit {unit}: t={self.freeze_fraction(unit):.4f} peak lr {self.peak_lr(unit):.3e} "
                         f"freezes at {when}")
        return lines


def set_train_mode(model: nn.Module, num_frozen: int, unit_of: Callable[[str], int | None]) -> None:
    """``model.train()``, then eval mode for every module whose parameters all belong to frozen units.

    The single place that sets modes during training: a plain ``model.train()`` at the start of an epoch
    would put frozen units back into train mode (a pitfall of freezing by module attributes).
    """
    model.train()
    if num_frozen == 0:
        return
    for name, module in model.named_modules():
        params = [n for n, _ in module.named_parameters(prefix=name)]
        if params and all((u := unit_of(n)) is not None and u < num_frozen for n in params):
            module.eval()


class Freezer:
    """Applies a :class:`FreezeOutSchedule`'s freeze events to a model and its optimizer.

    Args:
        model: the unwrapped model; ``unit_of(param_name)`` gives each parameter's unit.
        optimizer: param groups tagged with ``unit`` (see ``util.param_groups``).
        schedule: when units freeze and their lrs.
        unit_of: parameter name -> unit (None: never frozen early).
        dist: when distributed, the DDP wrapper is rebuilt after each event so its buckets hold only trainable
            parameters (no ``find_unused_parameters``).
        describe_unit: optional name of a unit for the log line.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: FreezeOutSchedule, *,
                 unit_of: Callable[[str], int | None], dist: DistInfo | None = None,
                 describe_unit: Callable[[int], str] | None = None) -> None:
        self.model, self.optimizer, self.schedule, self.unit_of = model, optimizer, schedule, unit_of
        self.dist = dist or DistInfo()
        self.describe_unit = describe_unit or (lambda unit: f"unit {unit}")
        self.num_frozen = 0
        self.module = wrap_ddp(model, self.dist)

    def sync(self, step: int) -> int:
        """Freeze every unit due at ``step`` (idempotent); returns the frozen prefix length."""
        target = self.schedule.num_frozen(step)
        if target <= self.num_frozen:
            return self.num_frozen
        for unit in range(self.num_frozen, target):
            logger.info("FreezeOut: %s frozen at step %d (%d of %d units frozen)", self.describe_unit(unit), step,
                        unit + 1, self.schedule.num_units)
        frozen = [p for n, p in self.model.named_parameters() if (u := self.unit_of(n)) is not None and u < target]
        for param in frozen:
            param.requires_grad_(False)
            param.grad = None
        kept = []
        for group in self.optimizer.param_groups:
            if group.get("unit") is not None and group["unit"] < target:
                for param in group["params"]:
                    self.optimizer.state.pop(param, None)
            else:
                kept.append(group)
        self.optimizer.param_groups[:] = kept
        self.num_frozen = target
        set_train_mode(self.model, target, self.unit_of)
        if self.dist.distributed:
            self.module = wrap_ddp(self.model, self.dist)
        return target

    def set_lrs(self, step: int) -> None:
        """Each param group's lr from the schedule (times its ``lr_scale``)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr(group.get("unit"), step) * group.get("lr_scale", 1.0)

    def before_update(self, step: int) -> None:
        """The training loop's hook: apply due freeze events, then set the lrs of ``step``."""
        self.sync(step)
        self.set_lrs(step)

    def train(self) -> None:
        """Training mode for the units that still train (eval for the frozen prefix)."""
        set_train_mode(self.model, self.num_frozen, self.unit_of)

    def no_sync(self):
        """DDP's ``no_sync`` of the current wrapper (a null context when single-process)."""
        import contextlib
        return self.module.no_sync() if hasattr(self.module, "no_sync") else contextlib.nullcontext()
