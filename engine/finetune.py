"""Classification fine-tuning: the step function for the shared loop (fine-tuning and linear probing) and the run of
``main_finetune.py`` on one fold.

After MAE's ``engine_finetune.train_one_epoch`` body (mixup/cutmix through timm's ``Mixup``, then the criterion),
cut down to one micro-batch: the loop in ``engine/train.py`` owns autocast, backward, accumulation and the step.
``build_criterion`` is MAE's choice of mixup and loss (``main_finetune.py``).
A model may return the logits of several heads at once ([H, B, C], a linear-probe lr grid as in DINOv2): the
loss is the sum of the heads' losses, so each head receives exactly the gradient of its own loss.
``run`` is one fine-tuning (or evaluation) run of MAE's ``main_finetune.py`` recipe on one fold, with its builders
(``check_args``, ``build_data``, ``build_model``).
"""
from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader, Dataset

import models
from engine.evaluate import eval_shard, evaluate, evaluate_and_report
from engine.freezeout import Freezer, FreezeOutSchedule
from engine.run import Best, EpochEnd, fit, metric_writer, Outcome, Task
from models.backbone import freeze_unit, load_finetune_weights
from models.registry import checkpoint_vs_model
from util import preflight
from util.checkpoint import find_latest, load_checkpoint, load_model_state
from util.data.loaders import build_train_loader
from util.data.transfer import build_splits
from util.data.transforms import eval_transform, finetune_transform
from util.distributed import DistInfo, barrier
from util.logging import write_results
from util.lr_sched import training_budget
from util.param_groups import param_groups
from util.runtime import resolve_amp, seed_everything

logger = logging.getLogger("vitfreeze")
PRETRAIN_ONLY = ("all_stages", "dont_freeze_pe", "vitfreeze_compat")  # FreezeOut flags of the MIM models


def classify_step(model: nn.Module, batch: Any, step: int, *, criterion: Callable[[torch.Tensor, torch.Tensor],
                  torch.Tensor], device: torch.device, mixup_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch of supervised classification.

    Args:
        model: maps inputs [B, ...] to logits [B, C], or [H, B, C] for H heads trained side by side.
        batch: ``(inputs [B, ...], targets [B], ...)``; extra items (e.g. sample indices) are ignored.
        step: optimizer updates so far (unused; part of the step-function contract).
        criterion: ``criterion(logits [B, C], targets) -> scalar`` (targets are soft [B, C] after mixup).
        device: where the model lives.
        mixup_fn: timm ``Mixup`` applied to (inputs, targets) first, or None.

    Returns:
        ``{'loss': scalar}``; with H > 1 heads the loss is their sum (each head gets its own gradient) and
        ``loss_head<h>`` per head and ``loss_head_mean`` (detached) are logged too: the sum grows with the lr grid
        and is no curve to read.
    """
    inputs = batch[0].to(device, non_blocking=True)
    targets = batch[1].to(device, non_blocking=True)
    if mixup_fn is not None:
        inputs, targets = mixup_fn(inputs, targets)
    logits = model(inputs)
    if logits.ndim == 2:
        return {"loss": criterion(logits, targets)}
    losses = torch.stack([criterion(head_logits, targets) for head_logits in logits])
    out = {"loss": losses.sum()}
    if len(losses) > 1:
        out.update({f"loss_head{h}": loss.detach() for h, loss in enumerate(losses)})
        out["loss_head_mean"] = losses.detach().mean()
    return out


def build_criterion(*, num_classes: int, smoothing: float, mixup: float = 0.0, cutmix: float = 0.0,
                    cutmix_minmax: list[float] | None = None, mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5,
                    mixup_mode: str = "batch") -> tuple[Mixup | None, nn.Module]:
    """MAE's choice (``main_finetune.py``): timm mixup/cutmix with smoothing folded into soft targets -> soft-target CE;
    else label-smoothing CE when ``smoothing`` > 0; else plain CE. Arguments are MAE's flags of the same names.

    Returns:
        ``(mixup_fn or None, criterion)``.
    """
    if mixup > 0 or cutmix > 0 or cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, cutmix_minmax=cutmix_minmax, prob=mixup_prob,
                         switch_prob=mixup_switch_prob, mode=mixup_mode, label_smoothing=smoothing,
                         num_classes=num_classes)
        return mixup_fn, SoftTargetCrossEntropy()
    return None, LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss()


def run(args: argparse.Namespace, info: DistInfo, argv: Sequence[str] | None, *, fold: int | None,
        output_dir: Path, log_dir: str | None) -> dict[str, float]:
    """One fine-tuning (or evaluation) run on one fold; see :func:`main` for the returned keys."""
    seed_everything(args.seed + info.rank)
    device, amp_dtype = info.device, resolve_amp(args.amp, info.device)
    train_set, eval_sets, names = build_data(args, fold)
    resume = args.resume or (find_latest(output_dir) if args.auto_resume else None)
    if args.eval and not resume:
        raise ValueError("--eval evaluates a fine-tuned checkpoint: pass --resume CKPT (or --auto_resume with a "
                         f"checkpoint in {output_dir}); --finetune loads a backbone under a fresh head")
    model = build_model(args, len(names), finetune=None if resume else args.finetune).to(device)
    eval_loaders = {split: DataLoader(eval_shard(ds, rank=info.rank, world_size=info.world_size), shuffle=False,
                                      batch_size=args.batch_size, num_workers=args.num_workers) for split, ds in
                    eval_sets.items()}
    report = partial(evaluate_and_report, model, eval_loaders, names=names, device=device, amp_dtype=amp_dtype,
                     output_dir=output_dir if info.is_main else None)
    if args.eval:
        load_model_state(model, load_checkpoint(resume)["model"], source=f"checkpoint {resume}",
                         describe=checkpoint_vs_model)
        if preflight.active(args):
            preflight.passed(args, model, evaluate=f"{resume} on {', '.join(eval_sets)}")
        return write_results(output_dir if info.is_main else None, report())

    loader = build_train_loader(train_set, batch_size=args.batch_size, num_workers=args.num_workers,
                                pin_memory=args.pin_mem, rank=info.rank, world_size=info.world_size, seed=args.seed)
    steps_per_epoch, eff_batch, lr = training_budget(
        num_samples=len(train_set), num_batches=len(loader), batch_size=args.batch_size, accum_iter=args.accum_iter,
        world_size=info.world_size, blr=args.blr, lr=args.lr)
    depth = len(model.blocks)
    unit_of = partial(freeze_unit, depth=depth)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=args.weight_decay, unit_of=unit_of,
                                               no_weight_decay=model.no_weight_decay(), layer_decay=args.layer_decay,
                                               num_layers=depth + 1), lr=lr)  # betas (0.9, 0.999) as MAE's
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # without --freezeout t_0 = 1: each group follows cosine_lr x lr_scale and nothing freezes (one code path)
    schedule = FreezeOutSchedule(num_units=depth + 1, total_steps=args.epochs * steps_per_epoch, base_lr=lr,
                                 warmup_steps=args.warmup_epochs * steps_per_epoch, min_lr=args.min_lr,
                                 t_0=args.t_0 if args.freezeout else 1.0, how_scale=args.how_scale,
                                 scale_lr=not args.not_scale_lr, layerwise_lr=not args.non_layerwise_lr)
    freezer = Freezer(model, optimizer, schedule, unit_of=unit_of, dist=info,
                      describe_unit=lambda u: f"blocks.{u - 1} (unit {u})" if u else "patch embedding + tokens")
    if info.is_main and args.freezeout and not preflight.active(args):
        from util.vis import save_schedule_png  # lazy: pictures are optional
        logger.info("wrote %s", save_schedule_png(output_dir / "freezeout_schedule.png", schedule,
                                                  steps_per_epoch=steps_per_epoch))
    mixup_fn, criterion = build_criterion(num_classes=len(names), smoothing=args.smoothing, mixup=args.mixup,
                                          cutmix=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                                          mixup_prob=args.mixup_prob, mixup_switch_prob=args.mixup_switch_prob,
                                          mixup_mode=args.mixup_mode)
    writer = metric_writer(args, info, output_dir, log_dir)

    def step_fn(batch, step: int) -> dict:
        return classify_step(freezer.module, batch, step, criterion=criterion, device=device, mixup_fn=mixup_fn)

    def end_epoch(epoch: int, stats: dict, metrics: dict, run: Outcome) -> EpochEnd:
        result = {k: v for k, v in metrics.items() if k != "confusion"}  # the matrix stays with the best record
        writer.log_validation(result, epoch)
        logger.info("epoch %d: val acc1 %.2f  acc5 %.2f  f1 %.2f  mcc %.2f  loss %.4f  (best acc1 %.2f, epoch %d)",
                    epoch, result["acc1"], result["acc5"], result["f1"], result["mcc"], result["loss"],
                    run.best["acc1"], run.best["epoch"])
        return EpochEnd(log={**{f"val_{k}": v for k, v in result.items()}, "epoch": epoch,
                             "num_frozen": freezer.num_frozen}, state={"metrics": result}, metrics=result)

    task = Task(step=step_fn, before_update=freezer.before_update, train=freezer.train, no_sync=freezer.no_sync,
                evaluate=lambda epoch, progress: evaluate(model, eval_loaders["val"], device=device,
                                                          num_classes=len(names), amp_dtype=amp_dtype),
                best=Best("acc1", {"acc1": -1.0, "epoch": -1}, lambda m, epoch, progress: {
                    "acc1": m["acc1"], "epoch": epoch, "confusion": m["confusion"]}),
                end_epoch=end_epoch, state=lambda run: {"classes": names})
    run = fit(task, args, info, model=model, optimizer=optimizer, scaler=scaler, loader=loader, writer=writer,
              steps_per_epoch=steps_per_epoch, images_per_update=eff_batch, amp_dtype=amp_dtype, output_dir=output_dir,
              sync=freezer.sync, required=("model", "optimizer", "epoch", "best"),
              hint="a pretrained or foreign checkpoint goes to --finetune; --eval evaluates one",
              record={"lr": lr, "effective_batch": eff_batch, "classes": len(names), "fold": fold,
                      "steps_per_epoch": steps_per_epoch, "world_size": info.world_size},
              script="main_finetune.py", argv=argv)
    result, best = run.metrics, run.best
    if "test" in eval_loaders and best["epoch"] != args.epochs - 1:  # test the model selected on val
        barrier()  # rank 0 has written checkpoint-best.pth
        load_model_state(model, load_checkpoint(output_dir / "checkpoint-best.pth")["model"], source="best checkpoint",
                         describe=checkpoint_vs_model)
    tested = {k: v for k, v in report(best=best).items() if k.startswith("test_")}
    return write_results(output_dir if info.is_main else None,
                         {**result, "best_acc1": best["acc1"], "best_epoch": best["epoch"], **tested})


def check_args(args: argparse.Namespace) -> None:
    """Reject flag combinations that cannot work, before anything is built (ValueError)."""
    bad = [f"--{name}" for name in PRETRAIN_ONLY if getattr(args, name)]
    if bad:
        raise ValueError(f"{', '.join(bad)} applies to pretraining (MIM models) only, not to fine-tuning")
    if mixup_active(args) and args.batch_size % 2:
        raise ValueError(f"mixup/cutmix pairs the images of a batch: --batch_size must be even, got {args.batch_size}")
    if args.split_file and args.data_set != "folder":
        raise ValueError(f"--split_file needs --data_set folder, got --data_set {args.data_set}")
    if args.fold and not args.split_file:
        raise ValueError("--fold selects a fold of --split_file (CSV with columns file,label,fold); none given")


def build_data(args: argparse.Namespace, fold: int | None) -> tuple[Dataset, dict[str, Dataset], list[str]]:
    """Training set (fine-tuning augmentation), evaluation sets and class names (``build_splits``)."""
    train_tf = finetune_transform(args.input_size, auto_augment=args.aa, color_jitter=args.color_jitter,
                                  re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    return build_splits(args.data_set, args.data_path, train_transform=train_tf,
                        eval_transform=eval_transform(args.input_size), download=args.download,
                        split_file=args.split_file, fold=fold, train_per_class=args.train_per_class, seed=args.seed,
                        nb_classes=args.nb_classes)


def build_model(args: argparse.Namespace, classes: int, *, finetune: str | None) -> nn.Module:
    """timm ViT with a ``classes``-way head and the backbone of ``finetune`` (None: random, or resumed later)."""
    if not args.model.startswith("vit_"):
        raise ValueError(f"--model {args.model} is not a classification backbone; choose one of "
                         f"{[m for m in models.list_models() if m.startswith('vit_')]}")
    model = models.create_model(args.model, img_size=args.input_size, num_classes=classes,
                                global_pool="avg" if args.global_pool else "token", drop_path_rate=args.drop_path)
    if finetune:
        load_finetune_weights(model, load_checkpoint(finetune), source=args.checkpoint_source, name=finetune,
                              global_pool=args.global_pool, head_init_std=args.head_init_std,
                              what=f"--model {args.model}")
    elif not (args.resume or args.auto_resume):
        logger.warning("no --finetune checkpoint: training from random initialisation (a baseline)")
    return model


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
