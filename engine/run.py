"""The run driver: one training run of any entry script, from resume to the last epoch's checkpoint.

A task (pretraining, fine-tuning, probing, segmentation, detection) hands :func:`fit` what differs: its step
function and learning-rate hook (:class:`Task`), an evaluation hook, what "best" means (:class:`Best`), the extra
keys of its checkpoints and its epoch-end report (log line, pictures). The driver owns the rest, written once:
resume (``--resume`` / ``--auto_resume``), the run record, the epoch loop over ``engine.train.train_one_epoch``,
mid-epoch checkpoints, preemption (stop after an update, save, exit 128 + signal), the epoch-end checkpoints and
``log.txt`` line, and the outcome (last statistics and metrics, best record, step).

The split follows detectron2's ``tools/plain_train_net.py`` ``do_train`` (the loop a script owns, with periodic
checkpointer and evaluation) and torchtitan's ``torchtitan/train.py`` ``Trainer`` (train step, checkpointer,
validator as parts), kept smaller than either: two frozen dataclasses of callables, no class hierarchy.
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
import torch.nn as nn

from engine.train import begin_epoch, EpochProgress, LoopConfig, StepFn, train_one_epoch
from models.registry import checkpoint_vs_model
from util.checkpoint import LAST_NAME, RunCheckpoints, training_state
from util.distributed import barrier, DistInfo
from engine.preemption import Preemption
from util.logging import MetricWriter
from util import preflight
from util.runtime import write_run_record

logger = logging.getLogger("vitfreeze")


@dataclass
class Outcome:
    """Where a run stands (what the hooks see) and what :func:`fit` returns.

    Attributes:
        stats: the last epoch's training statistics (``train_one_epoch``; a resumed checkpoint's ``train_stats``).
        metrics: the last evaluation's metrics (a resumed checkpoint's ``metrics``; {} before any).
        best: the task's best record (``Best.record`` of the best epoch; None when the task has no :class:`Best`).
        step: optimizer updates done over the run.
        start_epoch: the first epoch this process trained (after resume).
    """
    stats: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    best: dict | None = None
    step: int = 0
    start_epoch: int = 0


@dataclass(frozen=True)
class Best:
    """What "best" means for a task: a higher ``key`` in the evaluation metrics; a NaN (or infinite) value is never
    best.

    Attributes:
        key: the metric that ranks evaluations (``acc1``, ``mIoU``).
        initial: the record before any evaluation (e.g. ``{'acc1': -1.0, 'epoch': -1}``).
        record: ``record(metrics, epoch, progress)`` -> the record a new best stores (checkpoint ``best``); it
            holds ``key``.
    """
    key: str
    initial: Mapping[str, Any]
    record: Callable[[dict, int, EpochProgress], dict]

    def improves(self, metrics: Mapping[str, Any], best: Mapping[str, Any]) -> bool:
        value = metrics[self.key]
        return math.isfinite(value) and value > best[self.key]


@dataclass(frozen=True)
class EpochEnd:
    """A task's report of a finished epoch (what its ``end_epoch`` hook returns).

    Attributes:
        log: the task's keys of the epoch's ``log.txt`` line, after the ``train_*`` ones; ``epoch`` is added
            last unless the task places it.
        state: extra keys of the epoch-end checkpoint only (``metrics``, ``train_stats``).
        pictures: writes the epoch's pictures on rank 0, before ``checkpoint-last.pth`` (None: none).
        metrics: the evaluation's metrics as the run keeps them (``Outcome.metrics``), when they differ from what
            ``Task.evaluate`` returned (e.g. without the confusion matrix that only the best record keeps).
    """
    log: Mapping[str, Any] = field(default_factory=dict)
    state: Mapping[str, Any] = field(default_factory=dict)
    pictures: Callable[[], Any] | None = None
    metrics: dict | None = None


@dataclass(frozen=True)
class Task:
    """What one task's training run differs in.

    Attributes:
        step: ``step(batch, step) -> {'loss', **scalars}`` for one micro-batch (``engine.train.StepFn``).
        before_update: sets the learning rates before each update (``train_one_epoch``'s hook).
        train: puts the model in training mode at the start of each epoch (``model.train``, ``Freezer.train``).
        no_sync: DDP's ``no_sync`` for non-final micro-batches (None: one process, or no DDP).
        evaluate: ``evaluate(epoch, progress) -> metrics`` after each epoch, or None when no evaluation is due.
        best: what "best" means (None: no best record, no ``checkpoint-best.pth``).
        end_epoch: ``end_epoch(epoch, stats, metrics, outcome) -> EpochEnd`` logs the epoch (``metrics`` None when
            not evaluated); ``outcome.best`` is already updated.
        state: ``state(outcome) -> dict``, the task's extra keys of every checkpoint (``classes``, ...); the
            driver adds ``best`` when there is a :class:`Best`.
    """
    step: StepFn
    before_update: Callable[[int], None]
    train: Callable[[], Any]
    no_sync: Callable[[], ContextManager] | None = None
    evaluate: Callable[[int, EpochProgress], dict | None] | None = None
    best: Best | None = None
    end_epoch: Callable[[int, dict, dict | None, Outcome], EpochEnd] = lambda epoch, stats, metrics, outcome: EpochEnd()
    state: Callable[[Outcome], dict] = lambda outcome: {}


def metric_writer(args: argparse.Namespace, info: DistInfo, output_dir: str | Path | None = None,
                  log_dir: str | Path | None = None) -> MetricWriter:
    """The run's ``log.txt`` and TensorBoard writer (rank 0): ``--log_dir`` or ``<output_dir>/tensorboard``."""
    output_dir = Path(output_dir or args.output_dir)
    return MetricWriter(output_dir, log_dir or args.log_dir or output_dir / "tensorboard",
                        enabled=info.is_main and not preflight.active(args))  # a dry run writes nothing


def fit(task: Task, args: argparse.Namespace, info: DistInfo, *, model: nn.Module, optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler, loader: Any, writer: MetricWriter, steps_per_epoch: int,
        images_per_update: int, amp_dtype: torch.dtype | None, record: Mapping[str, Any], script: str,
        argv: Sequence[str] | None, epochs: int | None = None, total_steps: int | None = None,
        output_dir: str | Path | None = None, sync: Callable[[int], Any] = lambda step: None,
        required: tuple[str, ...] = ("model", "optimizer", "epoch"), hint: str = "") -> Outcome:
    """Train ``model`` as ``args`` says (``--epochs``, ``--resume``, ``--auto_resume``, ``--start_epoch``,
    ``--seed``, ``--accum_iter``, ``--clip_grad``, ``--max_skipped_steps``, ``--print_freq``, ``--save_every``,
    ``--save_every_steps``) with ``task``'s step and hooks; closes ``writer``.

    Args:
        model: what the checkpoints hold (``model`` key; the probe's heads for linear probing).
        loader: the training loader (``util.data.loaders.build_train_loader``).
        steps_per_epoch: optimizer updates of a full epoch (``training_budget``).
        images_per_update: images of one update over all ranks, for images/s.
        record: the derived values of ``run_info.json`` (lr, effective batch, ...), written after resume.
        script: the entry script's file name, for the resume command of a preempted run.
        epochs: epochs of the run (default ``--epochs``).
        total_steps: updates of the run (default ``epochs * steps_per_epoch``); the last epoch is cut short to it
            (segmentation's ``--max_iters``).
        output_dir: the run folder (default ``--output_dir``; a fold's folder).
        sync / required / hint: for :meth:`RunCheckpoints.resume` (FreezeOut's state; the keys a resumable
            checkpoint needs; what to say when it lacks them).

    Returns:
        The run's :class:`Outcome`.

    Raises:
        NonFiniteLossError / NonFiniteStateError: too many non-finite updates, or non-finite weights to save.
        SystemExit: 128 + signal after a preemption (the position is saved first).
    """
    epochs = args.epochs if epochs is None else epochs
    total_steps = epochs * steps_per_epoch if total_steps is None else total_steps
    output_dir = Path(output_dir or args.output_dir)
    dry_run = preflight.active(args)
    ckpts = RunCheckpoints(output_dir, epochs=epochs, save_every=args.save_every, enabled=info.is_main and not dry_run,
                           log_epoch=writer.log_epoch)
    checkpoint = ckpts.resume(args.resume, auto=args.auto_resume, model=model, optimizer=optimizer, scaler=scaler,
                              sync=sync, steps_per_epoch=steps_per_epoch, required=required, hint=hint,
                              describe=checkpoint_vs_model)
    if dry_run:  # everything is built and the checkpoint fits: where training would start
        start = checkpoint["epoch"] + 1 if checkpoint else args.start_epoch
        said = {k: _said(v) for k, v in record.items() if k not in DRY_RUN_QUIET}
        preflight.passed(args, model, trained=True, **said,
                         steps=f"{total_steps} ({epochs} epochs of {steps_per_epoch})" + (
                             f", resuming at epoch {start}" if checkpoint else ""))
    best = task.best and dict(checkpoint.get("best", task.best.initial) if checkpoint else task.best.initial)
    run = Outcome(stats=checkpoint.get("train_stats", {}) if checkpoint else {},
                  metrics=checkpoint.get("metrics", {}) if checkpoint else {}, best=best,
                  step=checkpoint.get("step", 0) if checkpoint else 0,
                  start_epoch=checkpoint["epoch"] + 1 if checkpoint else args.start_epoch)
    skipped = checkpoint.get("skipped_steps", 0) if checkpoint else 0
    if info.is_main:
        write_run_record(output_dir, vars(args), dict(record), argv)
    logger.info("training epochs %d to %d: %d steps per epoch, %d in all", run.start_epoch, epochs - 1,
                steps_per_epoch, total_steps)

    def state(epoch: int, progress: EpochProgress, **extra: Any) -> dict:
        best_key = {"best": run.best} if task.best else {}
        return training_state(model, optimizer, scaler, epoch=epoch, step=progress.step, skipped=progress.skipped,
                              args=vars(args), **best_key, **task.state(run), **extra)

    saved = ckpts.output_dir / LAST_NAME
    with Preemption(script, argv) as preemption, ckpts:
        for epoch in range(run.start_epoch, epochs):
            progress = begin_epoch(loader, checkpoint, epoch, info, seed=args.seed, steps_per_epoch=steps_per_epoch,
                                   accum_steps=args.accum_iter, skipped=skipped)
            task.train()
            loop = LoopConfig(steps_per_epoch=min(steps_per_epoch, total_steps - epoch * steps_per_epoch),
                              accum_steps=args.accum_iter, clip_grad=args.clip_grad, amp_dtype=amp_dtype,
                              device=info.device, max_skipped_steps=args.max_skipped_steps,
                              print_freq=args.print_freq, images_per_update=images_per_update,
                              save_every_steps=args.save_every_steps, total_steps=total_steps)
            stats = train_one_epoch(task.step, loader, optimizer, scaler, loop, progress,
                                    before_update=task.before_update, no_sync=task.no_sync, log_fn=writer.log,
                                    should_stop=preemption.requested,
                                    checkpoint_fn=lambda p: ckpts.save_position(mid_epoch_state(state, p),
                                                                                 p.state_dict()))
            preemption.exit_if_stopped(progress, steps_per_epoch=loop.steps_per_epoch, saved=saved)
            skipped, run.stats, run.step = progress.skipped, stats, progress.step
            metrics = task.evaluate(epoch, progress) if task.evaluate is not None else None
            is_best = False
            if metrics is not None:
                run.metrics = metrics
                if task.best is not None and task.best.improves(metrics, run.best):
                    run.best, is_best = task.best.record(metrics, epoch, progress), True
            end = task.end_epoch(epoch, stats, metrics, run)
            if end.metrics is not None:
                run.metrics = end.metrics
            log = {**{f"train_{k}": v for k, v in stats.items()}, **end.log}
            log.setdefault("epoch", epoch)
            ckpts.end_epoch(epoch, state(epoch, progress, **end.state), is_best=is_best, extra_outputs=end.pictures,
                            log=log)
            if epoch + 1 < epochs and preemption.requested_anywhere(info.device):
                barrier()
                preemption.exit(f"at the end of epoch {epoch}; saved {saved}")
    writer.close()
    return run


DRY_RUN_QUIET = ("steps_per_epoch", "total_steps", "epochs")  # said in the dry run's ``steps``


def _said(value: Any) -> Any:
    """A run-record value as the ``dry run OK`` line says it (lrs in scientific notation, class lists counted)."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return f"{len(value)}" if len(value) > 4 else ", ".join(str(_said(v)) for v in value)
    return value


def mid_epoch_state(state: Callable[..., dict], progress: EpochProgress) -> dict:
    """The state of a checkpoint saved inside epoch ``progress.epoch``: its ``epoch`` is the last *finished* one
    (``progress.epoch - 1``), so that a resume starts that epoch again and continues it from ``position``."""
    return state(progress.epoch - 1, progress)
