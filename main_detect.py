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
from models.detectors import (BOX_HEADS, BOX_LOSSES, BoxLoss, build_detector, detector_layer_id, HEAD_NORMS,
                              MASK_HEAD_NORMS)
from models.pyramid import ViTFeaturePyramid
from models.registry import checkpoint_vs_model, list_models
from util import args as cli_args, preflight
from util.checkpoint import find_latest, load_checkpoint, load_model_state, NonFiniteStateError
from util.data.coco import CocoInstances, collate_detection
from util.data.det_transforms import TRAIN_AUGMENTATIONS, train_transform
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
    add_head_args(parser)
    add_launch_args(parser)
    return parser


def add_head_args(parser: argparse.ArgumentParser) -> None:
    """RoI pooling, losses, box / mask heads and training augmentation (models/detectors.py,
    util/data/det_transforms.py); defaults are mmdet's / detectron2's, the recipes set their reference's."""
    group = parser.add_argument_group("detection heads and augmentation")
    group.add_argument("--train_aug", default="detr_ms", choices=TRAIN_AUGMENTATIONS,
                       help="training augmentation: detr_ms = DETR's multi-scale resize and crop (mmdet configs of "
                            "ViT-Adapter and dBOT, '3x+MS'); lsj = ViTDet's large-scale jitter onto --input_size")
    group.add_argument("--train_crop", default=0, type=cli_args.non_negative_int,
                       help="detr_ms: final random crop of at most this side (ViT-Adapter 1024); 0: none (dBOT)")
    group.add_argument("--test_size", default=None, type=cli_args.positive_int, nargs=2, metavar=("SHORT", "LONG"),
                       help="test images resized to fit SHORT x LONG (mmdet: 800 1333); default: --input_size on "
                            "the longer side")
    group.add_argument("--roi_align", default="aligned", choices=["aligned", "legacy"],
                       help="aligned: RoIAlign with the half-pixel offset (mmcv, detectron2); legacy: "
                            "torchvision's MultiScaleRoIAlign")
    group.add_argument("--rpn_smooth_l1_beta", default=0.0, type=cli_args.non_negative_float,
                       help="RPN box loss: smooth L1 beta (0 = L1: mmdet Mask R-CNN, ViTDet; iBOT/dBOT 0.111)")
    group.add_argument("--box_loss", default="smooth_l1", choices=BOX_LOSSES,
                       help="RoI box loss: smooth_l1 (with --box_smooth_l1_beta) or giou on decoded boxes (dBOT)")
    group.add_argument("--box_smooth_l1_beta", default=0.0, type=cli_args.non_negative_float,
                       help="RoI box loss smooth L1 beta (0 = L1: mmdet Mask R-CNN, ViTDet)")
    group.add_argument("--box_loss_weight", default=1.0, type=cli_args.positive_float,
                       help="RoI box loss weight (dBOT's GIoU: 10)")
    group.add_argument("--class_specific_cascade", action="store_true",
                       help="cascade stages regress one box per class (dBOT, reg_class_agnostic=False); default one "
                            "box per RoI (ViTDet, mmdet cascade_mask_rcnn_r50_fpn)")
    group.add_argument("--box_head", default="4conv1fc", choices=BOX_HEADS,
                       help="4conv1fc (ViTDet, dBOT) or 2fc (mmdet Shared2FCBBoxHead)")
    group.add_argument("--box_head_norm", default="gn", choices=HEAD_NORMS,
                       help="norm of the 4conv1fc box head: gn (GroupNorm 32), ln (LayerNorm, ViTDet), bn (SyncBN "
                            "when distributed on CUDA: dBOT's norm_cfg=SyncBN), none")
    group.add_argument("--mask_head_norm", default="gn", choices=MASK_HEAD_NORMS,
                       help="norm of the mask head's 4 convolutions: gn, ln (ViTDet), none (mmdet FCNMaskHead)")


@preflight.entry_point
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
        preflight.scratch_dir(output_dir) / "scenes", n_train=args.scene_images[0], n_val=args.scene_images[1],
        size=args.input_size, seed=args.seed, is_main=info.is_main)
    train_set = CocoInstances(root, "train", train=True, strict_data=args.strict_data, transform=train_transform(
        args.train_aug, size=args.input_size, scale_range=args.scale_range, crop=args.train_crop))
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
        if preflight.active(args):
            preflight.passed(args, model, evaluate=f"{resume} on {len(val_set)} images")
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
    model = build_detector(
        args.detector, backbone, num_classes, img_size=args.input_size, anchor_sizes=args.anchor_sizes,
        box_fc=args.box_fc, detections_per_img=args.max_dets, rois_per_image=args.rois_per_image,
        proposals_per_image=args.proposals_per_image, test_size=args.test_size,
        roi_align_aligned=args.roi_align == "aligned", rpn_smooth_l1_beta=args.rpn_smooth_l1_beta,
        box_loss=BoxLoss(args.box_loss, args.box_smooth_l1_beta, args.box_loss_weight),
        class_agnostic=not args.class_specific_cascade, box_head=args.box_head, box_head_norm=args.box_head_norm,
        mask_head_norm=args.mask_head_norm, train_as_given=args.train_aug != "lsj",
        pad_to_square=args.train_aug == "lsj")  # LSJ trains on img_size squares: test on that grid too
    if args.box_head_norm == "bn" and rank_and_world()[1] > 1 and torch.cuda.is_available():
        model.roi_heads = nn.SyncBatchNorm.convert_sync_batchnorm(model.roi_heads)  # dBOT's norm_cfg=SyncBN
    return model


def build_adapter(args: argparse.Namespace, *, finetune: str | None) -> nn.Module:
    """ViT-Adapter (``--model adapter_*``, models/adapter.py) + FPN neck to ``--out_channels`` with the stride-64
    level, as ViT-Adapter's configs (mmdet FPN, num_outs 5). The checkpoint goes in as loaded, so DINOv2's
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
