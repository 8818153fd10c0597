"""Object detection and instance segmentation: Mask R-CNN / Cascade Mask R-CNN on the ViT feature pyramid (COCO).

The seeds' recipes ran on mmdet (dBOT's Cascade Mask R-CNN 1x, ViT-Adapter's Mask R-CNN 3x); this script runs
them on torchvision's detection models (``models/detectors.py``) over ``models/pyramid.py`` (ViTDet's simple
feature pyramid), with ViTDet's large-scale jitter (``util/data/coco.py``), AdamW with layer-wise lr decay, mmdet's
step schedule (``--lr_steps``, ``--warmup_iters``) and COCO box / mask AP (``engine/coco_eval.py``, keys ``bbox_AP``,
``segm_AP``, ... in ``log.txt``). The training loop is the shared one (``engine/train.py``) with
``engine.detect.detect_step``. Recipes: ``configs/detect/``; ``./run.sh JOB cascade_coco_det vit_base 8 CKPT``.
Example: ``python main_detect.py --config configs/detect/demo.yaml --output_dir output/det_demo``.
"""
from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from engine.detect import demo_coco, detect_step, evaluate_detection, report_detection, save_detections_png
from engine.evaluate import eval_shard
from engine.run import EpochEnd, fit, metric_writer, Outcome, Task
from engine.train import NonFiniteLossError
from models.adapter import ADAPTER_MODELS, create_adapter
from models.backbone import load_pyramid_backbone
from models.detectors import build_detector, detector_layer_id
from models.pyramid import ViTFeaturePyramid
from models.registry import checkpoint_vs_model, list_models
from util import args as cli_args
from util.checkpoint import find_latest, load_checkpoint, load_model_state, NonFiniteStateError
from util.data.coco import CocoInstances, collate_detection, large_scale_jitter
from util.data.loaders import build_train_loader
from util.distributed import rank_and_world, wrap_ddp
from util.cli_help import DefaultsHelpFormatter
from util.launch import add_launch_args, parse_or_dispatch
from util.logging import write_results
from util.lr_sched import apply_lr, step_lr, training_budget
from util.param_groups import param_groups
from util.runtime import resolve_amp, run_cli, seed_everything, setup_run

logger = logging.getLogger("vitfreeze")


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
    add_launch_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train (``--eval``: evaluate) as ``argv`` says; returns the last evaluation's metrics (``bbox_AP``,
    ``segm_AP``, AP50, AP75, APs/m/l, percent) plus ``epoch``."""
    args, result = parse_or_dispatch(build_parser(), argv, "main_detect",
                                     models=[m for m in list_models() if m.startswith(("vit_", "adapter_"))])
    if result is not None:
        return result
    if not args.model.startswith(("vit_", "adapter_")):
        raise ValueError(f"--model {args.model}: the detection backbone is a ViT (vit_base_patch16, ...) or a "
                         f"ViT-Adapter ({', '.join(sorted(ADAPTER_MODELS))})")
    info = setup_run(args)
    if args.deterministic:  # mmdet's --deterministic
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    seed_everything(args.seed + info.rank)
    output_dir, device, amp_dtype = Path(args.output_dir), info.device, resolve_amp(args.amp, info.device)
    root = Path(args.data_path) if args.data_path != "scenes" else demo_coco(
        Path(args.output_dir) / "scenes", n_train=args.scene_images[0], n_val=args.scene_images[1],
        size=args.input_size, seed=args.seed, is_main=info.is_main)
    train_set = CocoInstances(root, "train", train=True, strict_data=args.strict_data, transform=partial(
        large_scale_jitter, size=args.input_size, scale_range=args.scale_range))
    val_set = CocoInstances(root, "val", strict_data=args.strict_data)  # validated here, before any training
    if train_set.category_ids != val_set.category_ids:
        raise ValueError(f"train and val categories differ: {train_set.category_ids} vs {val_set.category_ids}")
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
        return write_results(output_dir if info.is_main else None, report_detection(evaluate(), "eval"))

    loader = build_train_loader(train_set, batch_size=args.batch_size, num_workers=args.num_workers,
                                pin_memory=args.pin_mem, rank=info.rank, world_size=info.world_size, seed=args.seed,
                                collate_fn=collate_detection)
    steps_per_epoch, eff_batch, lr = training_budget(
        num_samples=len(train_set), num_batches=len(loader), batch_size=args.batch_size, accum_iter=args.accum_iter,
        world_size=info.world_size, blr=args.blr, lr=args.lr)
    backbone, depth = model.backbone, model.backbone.depth
    optimizer = torch.optim.AdamW(param_groups(
        model, weight_decay=args.weight_decay, unit_of=partial(detector_layer_id, backbone=backbone),
        no_weight_decay={f"backbone.{n}" for n in backbone.no_weight_decay()}, layer_decay=args.layer_decay,
        num_layers=depth + 1), lr=lr)
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


def build_model(args: argparse.Namespace, num_classes: int, *, finetune: str | None) -> nn.Module:
    """Pyramid backbone (with the ``finetune`` checkpoint's ViT, if any) under the ``--detector`` heads."""
    if args.model.startswith("adapter_"):
        backbone = build_adapter(args, finetune=finetune)
    else:
        backbone = build_pyramid(args, finetune=finetune)
    if not finetune and not (args.resume or args.auto_resume):
        logger.warning("no --finetune checkpoint: the ViT starts from random initialisation (a baseline)")
    return build_detector(args.detector, backbone, num_classes, img_size=args.input_size,
                          anchor_sizes=args.anchor_sizes, box_fc=args.box_fc, detections_per_img=args.max_dets,
                          rois_per_image=args.rois_per_image, proposals_per_image=args.proposals_per_image)


def build_adapter(args: argparse.Namespace, *, finetune: str | None) -> nn.Module:
    """ViT-Adapter (``--model adapter_*``, models/adapter.py) + FPN neck to ``--out_channels`` with the stride-64
    level, as the seed's configs (mmdet FPN, num_outs 5). The checkpoint goes in as loaded, so DINOv2's
    LayerScale stays a parameter and register tokens / SwiGLU map; its position grid is resampled on the fly."""
    if args.use_rel_pos:
        raise ValueError(f"--use_rel_pos is an option of the plain-ViT pyramid, not of the ViT-Adapter --model "
                         f"{args.model}; drop it")
    backbone = create_adapter(args.model, fpn_channels=args.out_channels, drop_path_rate=args.drop_path,
                              window_size=args.window_size, global_blocks=args.global_blocks,
                              grad_checkpointing=args.grad_checkpointing)
    if finetune:
        backbone.load_backbone(load_checkpoint(finetune), source=args.checkpoint_source, what=finetune)
    if rank_and_world()[1] > 1 and torch.cuda.is_available():  # the reference's SyncBN (CUDA only); heads use GN
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    return backbone


def build_pyramid(args: argparse.Namespace, *, finetune: str | None) -> nn.Module:
    """The plain-ViT simple feature pyramid (models/pyramid.py) with the ``finetune`` checkpoint's ViT."""
    backbone = ViTFeaturePyramid(args.model, img_size=args.input_size, out_channels=args.out_channels,
                                 extra_pool=True, drop_path_rate=args.drop_path, window_size=args.window_size,
                                 global_blocks=args.global_blocks, grad_checkpointing=args.grad_checkpointing,
                                 use_rel_pos=args.use_rel_pos)
    if finetune:
        load_pyramid_backbone(backbone, load_checkpoint(finetune), source=args.checkpoint_source, name=finetune)
    return backbone


def cli(argv: Sequence[str] | None = None) -> None:
    """The command line (``python main_detect.py``): :func:`main` with one-line errors."""
    run_cli(lambda: main(argv), NonFiniteLossError, NonFiniteStateError)


if __name__ == "__main__":
    cli()
