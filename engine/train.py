"""The one training loop. Objectives differ only by the ``step_fn`` they pass in.

Derived from MAE's ``engine_pretrain.py``/``engine_finetune.py`` (gradient accumulation, AMP with a loss
scaler, per-step lr) with their problems fixed: ``no_sync()`` on non-final micro-batches so DDP
all-reduces once per optimizer step, a bounded number of non-finite steps skipped instead of
``sys.exit(1)`` on the first, and host reads of the loss only once per optimizer step.

``step`` always counts optimizer updates (not micro-batches): schedules, logging and checkpoints use it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from util.distributed import all_reduce_mean
from util.logging import SmoothedValue, format_eta

logger = logging.getLogger("vitfreeze")

StepFn = Callable[[Any, int], Mapping[str, torch.Tensor]]


class NonFiniteLossError(RuntimeError):
    """Raised when more optimizer steps than allowed had a non-finite loss."""


def train_one_epoch(step_fn: StepFn, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, *, before_update: Callable[[int], None], start_step: int,
                    num_steps: int, accum_steps: int = 1, clip_grad: float | None = None,
                    amp_dtype: torch.dtype | None = None, device: torch.device = torch.device("cpu"),
                    model: nn.Module | None = None, max_skipped_steps: int = 0, skipped_before: int = 0,
                    print_freq: int = 20, log_fn: Callable[[dict[str, float], int], None] | None = None,
                    header: str = "") -> dict[str, float]:
    """Run ``num_steps`` optimizer updates of ``accum_steps`` micro-batches each.

    Args:
        step_fn: ``step_fn(batch, step) -> {'loss': Tensor, **scalars}`` computes one micro-batch.
        loader: yields at least ``num_steps * accum_steps`` batches (a trailing partial group is not used).
        optimizer: its param groups are what gets updated.
        scaler: loss scaler (enabled for fp16 only; a disabled scaler is a no-op).
        before_update: called once with the step index before the first micro-batch of each update
            (sets learning rates; the only extension point of the loop).
        start_step: optimizer updates done before this epoch.
        num_steps: optimizer updates in this epoch.
        accum_steps: micro-batches per update; the loss is divided by it.
        clip_grad: clip the global gradient 2-norm to this value (None: no clipping).
        amp_dtype: autocast dtype (None: full precision).
        device: where the forward runs (decides the autocast device type).
        model: anything with a ``no_sync()`` context (a DDP wrapper, or a ``Freezer`` that knows the current
            wrapper), used on non-final micro-batches.
        max_skipped_steps: total updates with a non-finite loss tolerated over the run.
        skipped_before: such updates already skipped in earlier epochs.
        print_freq: log a progress line and TensorBoard scalars every this many updates.
        log_fn: ``log_fn(metrics, step)`` receives the scalars at log steps.
        header: prefix of the progress lines (e.g. ``Epoch: [3]``).

    Returns:
        Averages over the epoch of ``loss`` and every other scalar of ``step_fn``, plus ``lr`` (last),
        ``step`` (updates done after this epoch) and ``skipped_steps`` (total so far).

    Raises:
        NonFiniteLossError: more than ``max_skipped_steps`` updates had a non-finite loss.
    """
    data_iter = iter(loader)
    no_sync = getattr(model, "no_sync", None)
    loss_meter, timer = SmoothedValue(), SmoothedValue()
    extras: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}  # a scalar may be absent from some steps (a LocalMIM stage dropped by FreezeOut)
    skipped, step, start = skipped_before, start_step, time.time()
    for update in range(num_steps):
        tic = time.time()
        before_update(step)
        loss_sum = torch.zeros((), device=device)
        scalars: dict[str, torch.Tensor] = {}
        for micro in range(accum_steps):
            batch = next(data_iter)
            last = micro == accum_steps - 1
            with (contextlib.nullcontext() if last or no_sync is None else no_sync()):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = step_fn(batch, step)
                scaler.scale(out["loss"] / accum_steps).backward()
            loss_sum += out["loss"].detach().float()
            for key, value in out.items():
                if key != "loss":
                    scalars[key] = scalars.get(key, 0.0) + value.detach().float() / accum_steps
        # Mean over ranks (MAE logs it too): every rank logs the loss of the whole effective batch, and a
        # non-finite loss on any rank makes it non-finite everywhere, so all ranks skip the update together.
        # One host sync per update: needed to skip a bad step.
        loss_value = all_reduce_mean(loss_sum).item() / accum_steps
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            logger.warning("non-finite loss %s at step %d: update skipped (%d of at most %d)",
                           loss_value, step, skipped, max_skipped_steps)
            if skipped > max_skipped_steps:
                raise NonFiniteLossError(f"loss is {loss_value} at step {step} (iteration {update} of {header}); "
                                         f"{skipped} non-finite steps exceed --max_skipped_steps "
                                         f"{max_skipped_steps}. Stopping; the last checkpoint is untouched.")
            step += 1
            continue
        if clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        for key, value in scalars.items():
            extras[key] = extras.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
        loss_meter.update(loss_value)
        timer.update(time.time() - tic)
        if (update + 1) % print_freq == 0 or update + 1 == num_steps:
            lr = max(group["lr"] for group in optimizer.param_groups)
            eta = timer.avg * (num_steps - update - 1)
            mem = f"  mem: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device.type == "cuda" else ""
            logger.info("%s [%d/%d]  eta: %s  lr: %.3e  loss: %.4f (%.4f)  time: %.3f s/it%s", header,
                        update + 1, num_steps, format_eta(eta), lr, loss_meter.avg, loss_meter.global_avg,
                        timer.avg, mem)
            if log_fn is not None:
                log_fn({"train/loss": loss_meter.avg, "train/lr": lr}, step)
    stats = {"loss": loss_meter.global_avg, "lr": max(g["lr"] for g in optimizer.param_groups),
             "step": step, "skipped_steps": skipped, "epoch_time_s": time.time() - start}
    stats.update({key: float(value) / counts[key] for key, value in extras.items()})
    return stats
