"""The one training loop. Objectives differ only by the ``step_fn`` they pass in.

Derived from MAE's ``engine_pretrain.py``/``engine_finetune.py`` (gradient accumulation, AMP with a loss
scaler, per-step lr) with their problems fixed: ``no_sync()`` on non-final micro-batches so DDP
all-reduces once per optimizer step, a bounded number of non-finite steps skipped instead of
``sys.exit(1)`` on the first, and one host read per optimizer step (the loss, the gradient norm and the stop
flag travel together).

``step`` always counts optimizer updates (not micro-batches): schedules, logging and checkpoints use it.
An epoch can stop after any update (preemption: ``should_stop``) and continue later from an
:class:`EpochProgress` (what a mid-epoch checkpoint stores), ending exactly as an unbroken epoch would.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Mapping

import torch

from util.checkpoint import NonFiniteError, restore_position_rng
from util.data.loaders import epoch_seed, set_loader_epoch
from util.distributed import all_reduce_mean
from util.logging import SmoothedValue, format_eta
from util.runtime import seed_everything

logger = logging.getLogger("vitfreeze")

StepFn = Callable[[Any, int], Mapping[str, torch.Tensor]]


class NonFiniteLossError(NonFiniteError):
    """Raised when more optimizer steps than allowed had a non-finite loss or gradient norm."""


@dataclass(frozen=True)
class LoopConfig:
    """Per-run settings of :func:`train_one_epoch` (the same for every epoch).

    Attributes:
        steps_per_epoch: optimizer updates in an epoch.
        accum_steps: micro-batches per update; the loss is divided by it.
        clip_grad: clip the global gradient 2-norm to this value (None: no clipping).
        amp_dtype: autocast dtype (None: full precision).
        device: where the forward runs (decides the autocast device type).
        max_skipped_steps: total updates with a non-finite loss or gradient norm tolerated over the run.
        print_freq: log a progress line and TensorBoard scalars every this many updates.
        images_per_update: images in one optimizer update over all ranks (batch x accum x world), for images/s
            (0: not reported).
        save_every_steps: call ``checkpoint_fn`` every this many updates inside the epoch (0: never).
        total_steps: optimizer updates of the whole run, for the run's ETA on the progress line (0: not shown;
            with FreezeOut it is an upper bound, as steps get cheaper).
    """
    steps_per_epoch: int
    accum_steps: int = 1
    clip_grad: float | None = None
    amp_dtype: torch.dtype | None = None
    device: torch.device = torch.device("cpu")
    max_skipped_steps: int = 0
    print_freq: int = 20
    images_per_update: int = 0
    save_every_steps: int = 0
    total_steps: int = 0


@dataclass
class EpochProgress:
    """Where an epoch stands: what a mid-epoch checkpoint stores to continue it exactly.

    Attributes:
        epoch: the epoch's index.
        first_step: the global step of the epoch's first update (usually ``epoch * steps_per_epoch``).
        update: updates done in this epoch so far (the loader must start at batch ``update * accum_steps``).
        skipped: non-finite updates skipped over the whole run so far.
        loss_total / loss_count: sum and number of the applied updates' losses (the epoch average).
        extra_totals / extra_counts: the same for the other scalars of ``step_fn``.
        elapsed_s: training seconds spent in this epoch (over all its pieces).
        stopped: set when the loop returned early because ``should_stop`` asked it to.
    """
    epoch: int
    first_step: int
    update: int = 0
    skipped: int = 0
    loss_total: float = 0.0
    loss_count: int = 0
    extra_totals: dict[str, float] = field(default_factory=dict)
    extra_counts: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    stopped: bool = False

    @property
    def step(self) -> int:
        """Optimizer updates done over the run."""
        return self.first_step + self.update

    def state_dict(self) -> dict[str, Any]:
        """Plain data (ints, floats, dicts) for a checkpoint."""
        return {"epoch": self.epoch, "first_step": self.first_step, "update": self.update, "skipped": self.skipped,
                "loss_total": self.loss_total, "loss_count": self.loss_count,
                "extra_totals": {k: float(v) for k, v in self.extra_totals.items()},
                "extra_counts": dict(self.extra_counts), "elapsed_s": self.elapsed_s}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> EpochProgress:
        return cls(**{k: state[k] for k in ("epoch", "first_step", "update", "skipped", "loss_total", "loss_count",
                                            "extra_totals", "extra_counts", "elapsed_s")})


def resume_position(checkpoint: Mapping[str, Any] | None, epoch: int, dist: Any) -> EpochProgress | None:
    """The :class:`EpochProgress` of a checkpoint saved inside ``epoch`` (None for any other checkpoint), with
    this rank's random state restored as it was then. ``dist``: a ``DistInfo`` (rank, world size)."""
    position = (checkpoint or {}).get("position")
    if not position or position["epoch"] != epoch:
        return None
    restore_position_rng(dict(checkpoint), dist.rank, dist.world_size)
    return EpochProgress.from_state_dict(position)


def begin_epoch(loader: Any, checkpoint: Mapping[str, Any] | None, epoch: int, dist: Any, *, seed: int,
                steps_per_epoch: int, accum_steps: int, skipped: int) -> EpochProgress:
    """The start of every training epoch of the entry scripts: this rank's RNGs reseeded for (seed, epoch, rank)
    (drop path, mixup), then the progress of a checkpoint saved inside this epoch (its random state restored,
    :func:`resume_position`) or a fresh one, and the loader's order, sample keys and first batch set to match
    (``util.data.loaders.set_loader_epoch``). ``skipped``: non-finite updates skipped in earlier epochs."""
    seed_everything(epoch_seed(seed, epoch, dist.rank))
    progress = resume_position(checkpoint, epoch, dist) or EpochProgress(epoch, epoch * steps_per_epoch,
                                                                           skipped=skipped)
    set_loader_epoch(loader, seed=seed, epoch=epoch, rank=dist.rank, start_batch=progress.update * accum_steps)
    return progress


def train_one_epoch(step_fn: StepFn, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, config: LoopConfig, progress: EpochProgress, *,
                    before_update: Callable[[int], None], no_sync: Callable[[], ContextManager] | None = None,
                    log_fn: Callable[[dict[str, float], int], None] | None = None,
                    checkpoint_fn: Callable[[EpochProgress], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> dict[str, float | None]:
    """Run the remaining updates of an epoch (``config.steps_per_epoch - progress.update``), updating ``progress``.

    Args:
        step_fn: ``step_fn(batch, step) -> {'loss': Tensor, **scalars}`` computes one micro-batch.
        loader: yields the epoch's batches from ``progress.update * accum_steps`` on (a trailing partial group
            is not used).
        optimizer: its param groups are what gets updated.
        scaler: loss scaler (enabled for fp16 only; a disabled scaler is a no-op).
        config: per-run settings.
        progress: where the epoch stands; updated in place.
        before_update: called once with the step index before the first micro-batch of each update
            (sets learning rates; the only extension point of the loop).
        no_sync: context factory for non-final micro-batches (DDP's ``no_sync``, e.g. ``Freezer.no_sync``);
            None when single-process.
        log_fn: ``log_fn(metrics, step)`` receives the loss, every scalar of ``step_fn``, lr and images/s at
            log steps.
        checkpoint_fn: ``checkpoint_fn(progress)`` after every ``config.save_every_steps`` updates (not after the
            epoch's last: that is the epoch-end checkpoint) and when stopping early.
        should_stop: polled once per update (its answer joins the one host sync and is shared by all ranks);
            when true the loop stops after the current update, calls ``checkpoint_fn`` and returns with
            ``progress.stopped`` set.

    Returns:
        Averages over the epoch of ``loss`` (None when every update was skipped) and of every other scalar of
        ``step_fn``, plus ``lr`` (last), ``step`` (updates done), ``skipped_steps`` (total so far),
        ``epoch_time_s`` and ``images_per_s``.

    Raises:
        NonFiniteLossError: more than ``max_skipped_steps`` updates had a non-finite loss or gradient norm.
    """
    cfg = config
    data_iter = iter(loader)
    loss_meter, timer = SmoothedValue(), SmoothedValue()
    window: dict[str, list] = {}  # the loss and step_fn's other scalars since the last log step
    extras = {k: torch.tensor(v) for k, v in progress.extra_totals.items()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    piece_start = time.time()
    while progress.update < cfg.steps_per_epoch:
        tic, step = time.time(), progress.step
        before_update(step)
        loss_sum = torch.zeros((), device=cfg.device)
        scalars: dict[str, torch.Tensor] = {}
        for micro in range(cfg.accum_steps):
            batch = next(data_iter)
            last = micro == cfg.accum_steps - 1
            with (contextlib.nullcontext() if last or no_sync is None else no_sync()):
                with torch.autocast(cfg.device.type, dtype=cfg.amp_dtype, enabled=cfg.amp_dtype is not None):
                    out = step_fn(batch, step)
                scaler.scale(out["loss"] / cfg.accum_steps).backward()
            loss_sum += out["loss"].detach().float()
            for key, value in out.items():
                if key != "loss":
                    scalars[key] = scalars.get(key, 0.0) + value.detach().float() / cfg.accum_steps
        grad_norm = _grad_norm(optimizer, scaler, params, cfg.clip_grad, cfg.device)
        # One host sync per update. The loss is the mean over ranks (MAE logs it too), so a non-finite loss on
        # any rank skips the update on every rank; gradients are all-reduced, so their norm agrees too; the stop
        # flag is averaged so that all ranks stop after the same update.
        stop = float(should_stop()) if should_stop is not None else 0.0
        reduced = all_reduce_mean(torch.stack([loss_sum, grad_norm.detach().float(),
                                               torch.tensor(stop, device=cfg.device)]))
        loss_value, norm_value, stop_value = reduced.tolist()
        loss_value /= cfg.accum_steps
        # With an fp16 loss scaler an overflowing gradient is routine (the scaler skips that update and lowers
        # its scale), so only the loss counts then.
        bad_norm = not math.isfinite(norm_value) and not scaler.is_enabled()
        if not math.isfinite(loss_value) or bad_norm:
            _skip(optimizer, scaler, progress, loss_value, norm_value, step, cfg.max_skipped_steps)
        else:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            for key, value in scalars.items():
                extras[key] = extras.get(key, 0.0) + value
                progress.extra_counts[key] = progress.extra_counts.get(key, 0) + 1
                window.setdefault(key, []).append(value)
            progress.loss_total += loss_value
            progress.loss_count += 1
            loss_meter.update(loss_value)
            window.setdefault("loss", []).append(loss_value)
        progress.update += 1
        timer.update(time.time() - tic)
        done = progress.update == cfg.steps_per_epoch
        if progress.update % cfg.print_freq == 0 or done:
            _log(cfg, progress, optimizer, loss_meter, timer, window, log_fn)
            window.clear()
        if stop_value > 0 and not done:
            progress.stopped = True
        if checkpoint_fn is not None and not done and (progress.stopped or (
                cfg.save_every_steps and progress.update % cfg.save_every_steps == 0)):
            progress.extra_totals = {k: float(v) for k, v in extras.items()}
            progress.elapsed_s += time.time() - piece_start
            piece_start = time.time()
            checkpoint_fn(progress)
        if progress.stopped:
            break
    progress.extra_totals = {k: float(v) for k, v in extras.items()}
    progress.elapsed_s += time.time() - piece_start
    return epoch_stats(progress, optimizer, cfg)


def epoch_stats(progress: EpochProgress, optimizer: torch.optim.Optimizer, cfg: LoopConfig) -> dict[str, float | None]:
    """The epoch's averages (``loss`` None when no update was applied) and timings."""
    if progress.loss_count == 0 and progress.update == cfg.steps_per_epoch:
        logger.warning("epoch %d: every update was skipped (non-finite); its train_loss is logged as null",
                       progress.epoch)
    stats: dict[str, float | None] = {
        "loss": progress.loss_total / progress.loss_count if progress.loss_count else None,
        "lr": max((g["lr"] for g in optimizer.param_groups), default=0.0), "step": progress.step,
        "skipped_steps": progress.skipped, "epoch_time_s": progress.elapsed_s}
    if cfg.images_per_update:
        stats["images_per_s"] = cfg.images_per_update * progress.update / max(progress.elapsed_s, 1e-9)
    stats.update({k: v / progress.extra_counts[k] for k, v in progress.extra_totals.items()})
    return stats


def _grad_norm(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[torch.Tensor],
               clip_grad: float | None, device: torch.device) -> torch.Tensor:
    """Global 2-norm of the (unscaled) gradients, clipping them to ``clip_grad`` on the way; no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    scaler.unscale_(optimizer)  # a no-op for a disabled scaler
    if clip_grad is not None:
        return torch.nn.utils.clip_grad_norm_(params, clip_grad)
    return torch.nn.utils.get_total_norm(grads)


def _skip(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, progress: EpochProgress,
          loss_value: float, norm_value: float, step: int, max_skipped: int) -> None:
    had_grads = any(p.grad is not None for g in optimizer.param_groups for p in g["params"])
    optimizer.zero_grad(set_to_none=True)
    if scaler.is_enabled() and had_grads:
        scaler.update()  # closes the unscale_ of this update (and lowers the scale when it found an overflow)
    progress.skipped += 1
    what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {norm_value}"
    logger.warning("non-finite %s at step %d: update skipped (%d of at most %d)", what, step, progress.skipped,
                   max_skipped)
    if progress.skipped > max_skipped:
        raise NonFiniteLossError(f"non-finite {what} at step {step} (update {progress.update} of epoch "
                                 f"{progress.epoch}); {progress.skipped} non-finite steps exceed "
                                 f"--max_skipped_steps {max_skipped}. Stopping.")


def _log(cfg: LoopConfig, progress: EpochProgress, optimizer: torch.optim.Optimizer, loss_meter: SmoothedValue,
         timer: SmoothedValue, window: dict[str, list], log_fn: Callable[[dict[str, float], int], None] | None
         ) -> None:
    """Progress line and the log step's scalars (host reads of the scalars happen only here)."""
    lr = max((g["lr"] for g in optimizer.param_groups), default=0.0)
    eta = timer.avg * (cfg.steps_per_epoch - progress.update)
    mem = f"  mem: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if cfg.device.type == "cuda" else ""
    loss_avg = progress.loss_total / progress.loss_count if progress.loss_count else float("nan")
    run_eta = f" (run: {format_eta(timer.avg * max(0, cfg.total_steps - progress.step))})" if cfg.total_steps else ""
    logger.info("Epoch: [%d] [%d/%d]  eta: %s%s  lr: %.3e  loss: %.4f (%.4f)  time: %.3f s/it%s", progress.epoch,
                progress.update, cfg.steps_per_epoch, format_eta(eta), run_eta, lr, loss_meter.avg, loss_avg,
                timer.avg, mem)
    if log_fn is None:
        return
    # every scalar (the loss too) as its mean over the updates applied since the last log step
    metrics = {"train/lr": lr, **{f"train/{k}": float(sum(v) / len(v)) for k, v in window.items()}}
    if cfg.images_per_update and timer.avg > 0:
        metrics["train/images_per_s"] = cfg.images_per_update / timer.avg
    log_fn(metrics, progress.step)
