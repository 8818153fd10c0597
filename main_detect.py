"""Object detection and instance segmentation: Mask R-CNN / Cascade Mask R-CNN on the ViT feature pyramid (COCO).

dBOT's Cascade Mask R-CNN 1x and ViT-Adapter's Mask R-CNN 3x ran on mmdet; this script runs their recipes on
torchvision's detection models (``models/detectors.py``) over ``models/pyramid.py`` (ViTDet's simple feature
pyramid) or ``models/adapter.py``, with DETR's multi-scale training (``--train_aug detr_ms``, the recipes') or
ViTDet's large-scale jitter (``lsj``; ``util/data/det_transforms.py``), AdamW with layer-wise lr decay, mmdet's
step schedule (``--lr_steps``, ``--warmup_iters``) and COCO box / mask AP (``engine/coco_eval.py``, keys ``bbox_AP``,
``segm_AP``, ... in ``log.txt``). The training loop is the shared one (``engine/train.py``) with
``engine.detect.detect_step``. Recipes: ``configs/detect/``; ``./run.sh JOB cascade_coco_det vit_base 8 CKPT``.
Example: ``python main_detect.py --config configs/detect/demo.yaml --output_dir output/det_demo``.
"""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from engine.detect import (build_data, build_model, build_optimizer, check_args, detect_step, evaluate_detection,
                           report_detection, save_detections_png)
from engine.evaluate import eval_shard
from engine.run import EpochEnd, fit, metric_writer, Outcome, Task
from engine.train import NonFiniteLossError
from models.registry import checkpoint_vs_model, list_models
from util import args as cli_args, preflight
from util.checkpoint import find_latest, load_checkpoint, load_model_state, NonFiniteStateError
from util.data.coco import collate_detection
from util.data.loaders import build_train_loader
from util.distributed import wrap_ddp
from util.cli_help import DefaultsHelpFormatter
from util.launch import add_launch_args, parse_or_dispatch
from util.logging import write_results
from util.lr_sched import apply_lr, step_lr, training_budget
from util.runtime import resolve_amp, run_cli, seed_everything, setup_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ViTFreeze detection / instance segmentation", allow_abbrev=False,
                                      formatter_class=DefaultsHelpFormatter)
    cli_args.add_config_args(parser)
    cli_args.add_model_args(parser, default_model="vit_base_patch16")
    cli_args.add_detection_args(parser)
    cli_args.add_optim_args(parser, blr=1.6e-3, weight_decay=0.1, epochs=12, warmup_epochs=0, batch_size=2)
    cli_args.add_dist_args(parser)
    cli_args.add_output_args(parser, save_every=4)
    parser.set_defaults(input_size=1024)  # ViTDet's LSJ canvas
    cli_args.add_detection_head_args(parser)
    add_launch_args(parser)
    return parser


@preflight.entry_point
def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train (``--eval``: evaluate) as ``argv`` says; returns the last evaluation's metrics (``bbox_AP``,
    ``segm_AP``, AP50, AP75, APs/m/l, percent) plus ``epoch``."""
    args, result = parse_or_dispatch(build_parser(), argv, "main_detect",
                                     models=[m for m in list_models() if m.startswith(("vit_", "adapter_"))])
    if result is not None:
        return result
    check_args(args)
    info = setup_run(args)
    if args.deterministic:  # mmdet's --deterministic
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    seed_everything(args.seed + info.rank)
    output_dir, device, amp_dtype = Path(args.output_dir), info.device, resolve_amp(args.amp, info.device)
    train_set, val_set = build_data(args, output_dir, info)
    resume = args.resume or (find_latest(output_dir) if args.auto_resume else None)
    if args.eval and not resume:
        raise ValueError("--eval evaluates a trained checkpoint: pass --resume CKPT (or --auto_resume)")
    model = build_model(args, len(val_set.classes), finetune=None if resume else args.finetune).to(device)
    val_loader = DataLoader(eval_shard(val_set, rank=info.rank, world_size=info.world_size), shuffle=False,
                            batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate_detection)
    evaluate = partial(evaluate_detection, model, val_loader, device=device, gt=val_set.gt,
                       category_ids=val_set.category_ids, image_ids=val_set.image_ids, amp_dtype=amp_dtype,
                       max_dets=(1, 10, args.max_dets))
    if args.eval:
        load_model_state(model, load_checkpoint(resume)["model"], source=f"checkpoint {resume}",
                         describe=checkpoint_vs_model)
        if preflight.active(args):
            preflight.passed(args, model, evaluate=f"{resume} on {len(val_set)} images")
        return write_results(output_dir if info.is_main else None, report_detection(evaluate(), "eval"))

    loader = build_train_loader(train_set, batch_size=args.batch_size, num_workers=args.num_workers,
                                pin_memory=args.pin_mem, rank=info.rank, world_size=info.world_size, seed=args.seed,
                                collate_fn=collate_detection)
    steps_per_epoch, eff_batch, lr = training_budget(
        num_samples=len(train_set), num_batches=len(loader), batch_size=args.batch_size, accum_iter=args.accum_iter,
        world_size=info.world_size, blr=args.blr, lr=args.lr)
    optimizer = build_optimizer(model, args, lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    schedule = partial(step_lr, base_lr=lr, milestones=[e * steps_per_epoch for e in args.lr_steps],
                       warmup_steps=args.warmup_iters + args.warmup_epochs * steps_per_epoch)
    ddp = wrap_ddp(model, info)
    writer = metric_writer(args, info)

    def evaluate_due(epoch: int, progress) -> dict | None:
        if (epoch + 1) % args.eval_every and epoch + 1 != args.epochs:
            return None
        metrics = report_detection(evaluate(), f"epoch {epoch}")
        writer.log({f"val/{k}": v for k, v in metrics.items()}, progress.step)
        return metrics

    def end_epoch(epoch: int, stats: dict, metrics: dict | None, run: Outcome) -> EpochEnd:
        pictures = metrics is not None and args.vis_every and (epoch + 1) % args.vis_every == 0
        draw = partial(save_detections_png, model, val_set, output_dir / f"detections_{epoch:03d}.png", device=device)
        return EpochEnd(log={f"val_{k}": v for k, v in (metrics or {}).items()}, pictures=draw if pictures else None)

    task = Task(step=partial(_step, ddp, device=device), before_update=lambda step: apply_lr(optimizer, schedule(step)),
                train=model.train, no_sync=getattr(ddp, "no_sync", None), evaluate=evaluate_due, end_epoch=end_epoch,
                state=lambda run: {"metrics": run.metrics, "classes": val_set.classes,
                                   "category_ids": val_set.category_ids})
    # the epoch-end writes of the classification scripts: no non-finite state saved, checkpoint-last.pth last
    run = fit(task, args, info, model=model, optimizer=optimizer, scaler=scaler, loader=loader, writer=writer,
              steps_per_epoch=steps_per_epoch, images_per_update=eff_batch, amp_dtype=amp_dtype,
              hint="a pretrained backbone goes to --finetune; --eval evaluates a checkpoint",
              record={"lr": lr, "effective_batch": eff_batch, "classes": val_set.classes,
                      "steps_per_epoch": steps_per_epoch, "world_size": info.world_size},
              script=Path(__file__).name, argv=argv)
    return write_results(output_dir if info.is_main else None, {**run.metrics, "epoch": args.epochs - 1})


def _step(model: nn.Module, batch, step: int, *, device: torch.device) -> dict:
    return detect_step(model, batch, step, device=device)


def cli(argv: Sequence[str] | None = None) -> None:
    """The command line (``python main_detect.py``): :func:`main` with one-line errors."""
    run_cli(lambda: main(argv), NonFiniteLossError, NonFiniteStateError)


if __name__ == "__main__":
    cli()
