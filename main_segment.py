"""Semantic segmentation with UperNet on a pretrained ViT (ADE20K layout): BEiT's / MAE's / dBOT's ``ade20k_seg``.

Model: ``models/pyramid.py`` (our ViT + simple feature pyramid, BEiT-style taps of blocks 3, 5, 7, 11) under
``models/seg_heads.py`` (UperNet + auxiliary FCN, loss weight 0.4). Data: ``util/data/ade20k.py`` (mmseg's
ADE20K pipelines); ``--data_path demo`` writes synthetic scenes (``util/data/scenes.py``) into
``<output_dir>/demo_scenes`` first. Schedule: mmseg's poly lr with linear warmup, by iteration; ``--max_iters``
(BEiT's / MAE's 160k) is run as epochs of ``len(loader) // accum_iter`` steps, the last one cut short.
Example: ``python main_segment.py --config configs/segment/demo.yaml [--finetune output/demo/checkpoint-last.pth]``.
"""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import models
from engine.evaluate import eval_shard
from engine.segment import (ARCH, build_model, build_optimizer, demo_scenes, evaluate_segmentation, iteration_budget,
                            report_segmentation, segment_step)
from engine.run import Best, EpochEnd, fit, metric_writer, Outcome, Task
from engine.train import NonFiniteLossError
from models.registry import checkpoint_vs_model
from util import args as cli_args, preflight
from util.checkpoint import find_latest, load_checkpoint, load_model_state, NonFiniteStateError
from util.data.ade20k import ADE20KDataset, SegEvalTransform, SegTrainTransform, collate_eval
from util.data.loaders import build_train_loader
from util.distributed import barrier, broadcast_buffers, wrap_ddp
from util.cli_help import DefaultsHelpFormatter
from util.launch import add_launch_args, parse_or_dispatch
from util.lr_sched import apply_lr, poly_lr, training_budget
from util.runtime import resolve_amp, run_cli, seed_everything, setup_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ViTFreeze semantic segmentation (UperNet)", allow_abbrev=False,
                                      formatter_class=DefaultsHelpFormatter)
    cli_args.add_config_args(parser)
    cli_args.add_model_args(parser, default_model="vit_base_patch16")
    cli_args.add_backbone_args(parser)
    cli_args.add_optim_args(parser, blr=1.6e-3, weight_decay=0.05, epochs=1, warmup_epochs=0, batch_size=2)
    cli_args.add_segmentation_args(parser)
    cli_args.add_dist_args(parser)
    cli_args.add_output_args(parser, save_every=1000)
    add_launch_args(parser)
    return parser


@preflight.entry_point
def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train (or ``--eval``) as ``argv`` says. Returns the last evaluation's ``mIoU``, ``mAcc``, ``aAcc``
    (percent), ``best_mIoU`` / ``best_step`` and the final ``step``; with ``--eval`` the metrics, per-class ``IoU`` /
    ``Acc`` lists and ``num_images``."""
    args, result = parse_or_dispatch(build_parser(), argv, "main_segment", models=[  # dBOT's short forms too
        *[m for m in models.list_models() if m.startswith(("vit_", "adapter_"))], *ARCH, *(f"vit_{a}" for a in ARCH)])
    if result is not None:
        return result
    info = setup_run(args)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(args.seed + info.rank)
    device, amp_dtype, output_dir = info.device, resolve_amp(args.amp, info.device), Path(args.output_dir)
    data_path = args.data_path if args.data_path != "demo" else demo_scenes(
        preflight.scratch_dir(output_dir), args.input_size, is_main=info.is_main)
    crop, stride = args.input_size, args.slide_stride or max(1, (2 * args.input_size) // 3)
    val_set = ADE20KDataset(data_path, "val", SegEvalTransform(crop), num_classes=args.nb_classes,
                            reduce_zero_label=args.reduce_zero_label, strict_data=args.strict_data)
    val_loader = DataLoader(eval_shard(val_set, rank=info.rank, world_size=info.world_size), batch_size=1,
                            collate_fn=collate_eval, num_workers=min(args.num_workers, 2))
    resume = args.resume or (find_latest(output_dir) if args.auto_resume else None)
    model = build_model(args, finetune=None if resume else args.finetune).to(device)
    evaluate = partial(evaluate_segmentation, model, val_loader, device=device, num_classes=args.nb_classes,
                       crop=crop, stride=stride, amp_dtype=amp_dtype, keep=args.vis_images if info.is_main else 0)
    if args.eval:
        if not resume:
            raise ValueError("--eval needs --resume CKPT (or --auto_resume with a checkpoint in --output_dir)")
        load_model_state(model, load_checkpoint(resume)["model"], source=f"checkpoint {resume}",
                         describe=checkpoint_vs_model)
        if preflight.active(args):
            preflight.passed(args, model, evaluate=f"{resume} on {len(val_set)} images")
        return report_segmentation(evaluate(), output_dir, info.is_main, step=-1)

    train_set = ADE20KDataset(data_path, "train", SegTrainTransform(crop, tuple(args.ratio_range), args.cat_max_ratio),
                              num_classes=args.nb_classes, reduce_zero_label=args.reduce_zero_label, seed=args.seed,
                              strict_data=args.strict_data)
    loader = build_train_loader(train_set, batch_size=args.batch_size, num_workers=args.num_workers,
                                pin_memory=args.pin_mem, rank=info.rank, world_size=info.world_size, seed=args.seed,
                                keyed=False, epoch_indices=True)  # the dataset's own keys, (seed, epoch, index)
    steps_per_epoch, eff_batch, lr = training_budget(
        num_samples=len(train_set), num_batches=len(loader), batch_size=args.batch_size, accum_iter=args.accum_iter,
        world_size=info.world_size, blr=args.blr, lr=args.lr)
    total = args.max_iters or args.epochs * steps_per_epoch
    epochs = iteration_budget(total, steps_per_epoch)
    warmup = args.warmup_iters if args.warmup_iters is not None else args.warmup_epochs * steps_per_epoch
    optimizer = build_optimizer(model, args, lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    schedule = partial(poly_lr, base_lr=lr, total_steps=total, warmup_steps=warmup, power=args.poly_power)
    if info.distributed and device.type == "cuda":  # mmseg's SyncBN; torch's SyncBatchNorm has no CPU kernel
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = wrap_ddp(model, info)
    writer = metric_writer(args, info)

    def evaluate_due(epoch: int, progress) -> dict | None:
        """mmseg's evaluation by iteration: after the epoch in which the step passes a multiple of
        ``--eval_interval`` (every epoch when 0), and after the last."""
        step, first = progress.step, epoch * steps_per_epoch
        if epoch < epochs - 1 and args.eval_interval and step // args.eval_interval <= first // args.eval_interval:
            return None
        broadcast_buffers(model)  # BN statistics of rank 0 everywhere (per-rank BN without SyncBN on CPU)
        return report_segmentation(evaluate(), output_dir, info.is_main, step=step, vis=True)

    def end_epoch(epoch: int, stats: dict, metrics: dict | None, run: Outcome) -> EpochEnd:
        return EpochEnd(log={"epoch": epoch, "step": run.step, **({f"val_{k}": metrics[k] for k in
                                                                  ("mIoU", "mAcc", "aAcc")} if metrics else {})})

    task = Task(step=partial(segment_step, ddp, device=device, aux_weight=args.aux_weight),
                before_update=lambda step: apply_lr(optimizer, schedule(step)), train=model.train,
                no_sync=getattr(ddp, "no_sync", None), evaluate=evaluate_due, end_epoch=end_epoch,
                best=Best("mIoU", {"mIoU": -1.0, "step": -1},
                          lambda m, epoch, progress: {"mIoU": m["mIoU"], "step": progress.step}))
    # the epoch-end writes of the classification scripts: no non-finite state saved, checkpoint-last.pth last
    run = fit(task, args, info, model=model, optimizer=optimizer, scaler=scaler, loader=loader, writer=writer,
              steps_per_epoch=steps_per_epoch, images_per_update=eff_batch, amp_dtype=amp_dtype, epochs=epochs,
              total_steps=total, hint="a pretrained backbone goes to --finetune",
              record={"lr": lr, "effective_batch": eff_batch, "total_steps": total, "epochs": epochs,
                      "steps_per_epoch": steps_per_epoch, "world_size": info.world_size},
              script=Path(__file__).name, argv=argv)
    barrier()
    return {**{k: run.metrics[k] for k in ("mIoU", "mAcc", "aAcc") if k in run.metrics},
            "best_mIoU": run.best["mIoU"], "best_step": run.best["step"], "step": run.step}


def cli(argv: Sequence[str] | None = None) -> None:
    """The command line (``python main_segment.py``): :func:`main` with one-line errors."""
    run_cli(lambda: main(argv), NonFiniteLossError, NonFiniteStateError)


if __name__ == "__main__":
    cli()
