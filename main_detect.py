"""Object detection and instance segmentation: Mask R-CNN / Cascade Mask R-CNN on the ViT feature pyramid (COCO).

The seeds' recipes ran on mmdet (dBOT's Cascade Mask R-CNN 1x, ViT-Adapter's Mask R-CNN 3x); this script runs
them on torchvision's detection models (``models/detectors.py``) over ``models/pyramid.py`` (ViTDet's simple
feature pyramid), with ViTDet's large-scale jitter (``util/data/coco.py``), AdamW with layer-wise lr decay, mmdet's
step schedule (``--lr_steps``, ``--warmup_iters``) and COCO box / mask AP (``util/coco_eval.py``, keys ``bbox_AP``,
``segm_AP``, ... in ``log.txt``). The training loop is the shared one (``engine/train.py``) with
``engine.detect.detect_step``. Recipes: ``configs/detect/``; ``./run.sh JOB cascade_coco_det vit_base 8 CKPT``.
Example: ``python main_detect.py --config configs/detect/demo.yaml --output_dir output/det_demo``.
"""
from __future__ import annotations

import argparse
import json
import logging
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from engine.detect import detect_step, evaluate_detection
from engine.evaluate import eval_shard
from engine.train import begin_epoch, EpochProgress, LoopConfig, NonFiniteLossError, train_one_epoch
from models.adapter import ADAPTER_MODELS, create_adapter
from models.convert import to_timm_vit
from models.detectors import (BOX_HEADS, BOX_LOSSES, BoxLoss, build_detector, detector_layer_id, HEAD_NORMS,
                              MASK_HEAD_NORMS)
from models.pyramid import ViTFeaturePyramid
from util import args as cli
from util.checkpoint import (find_latest, LAST_NAME, load_checkpoint, load_model_state, NonFiniteStateError,
                             RunCheckpoints, training_state)
from util.data.coco import CocoInstances, collate_detection
from util.data.det_transforms import TRAIN_AUGMENTATIONS, train_transform
from util.data.loaders import build_train_loader
from util.distributed import DistInfo, barrier, rank_and_world, wrap_ddp
from util.launch import add_launch_args, parse_or_dispatch, Preemption
from util.logging import MetricWriter, write_results
from util.lr_sched import apply_lr, step_lr, training_budget
from util.param_groups import param_groups
from util.runtime import resolve_amp, run_cli, seed_everything, setup_run, write_run_record

logger = logging.getLogger("vitfreeze")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ViTFreeze detection / instance segmentation", allow_abbrev=False)
    cli.add_config_args(parser)
    cli.add_model_args(parser, default_model="vit_base_patch16")
    cli.add_detection_args(parser)
    cli.add_optim_args(parser, blr=1.6e-3, weight_decay=0.1, epochs=12, warmup_epochs=0, batch_size=2)
    cli.add_dist_args(parser)
    cli.add_output_args(parser, save_every=4)
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
    group.add_argument("--train_crop", default=0, type=cli.non_negative_int,
                       help="detr_ms: final random crop of at most this side (ViT-Adapter 1024); 0: none (dBOT)")
    group.add_argument("--test_size", default=None, type=cli.positive_int, nargs=2, metavar=("SHORT", "LONG"),
                       help="test images resized to fit SHORT x LONG (mmdet: 800 1333); default: --input_size on "
                            "the longer side")
    group.add_argument("--roi_align", default="aligned", choices=["aligned", "legacy"],
                       help="aligned: RoIAlign with the half-pixel offset (mmcv, detectron2); legacy: "
                            "torchvision's MultiScaleRoIAlign")
    group.add_argument("--rpn_smooth_l1_beta", default=0.0, type=cli.non_negative_float,
                       help="RPN box loss: smooth L1 beta (0 = L1: mmdet Mask R-CNN, ViTDet; iBOT/dBOT 0.111)")
    group.add_argument("--box_loss", default="smooth_l1", choices=BOX_LOSSES,
                       help="RoI box loss: smooth_l1 (with --box_smooth_l1_beta) or giou on decoded boxes (dBOT)")
    group.add_argument("--box_smooth_l1_beta", default=0.0, type=cli.non_negative_float,
                       help="RoI box loss smooth L1 beta (0 = L1: mmdet Mask R-CNN, ViTDet)")
    group.add_argument("--box_loss_weight", default=1.0, type=cli.positive_float,
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


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train (``--eval``: evaluate) as ``argv`` says; returns the last evaluation's metrics (``bbox_AP``,
    ``segm_AP``, AP50, AP75, APs/m/l, percent) plus ``epoch``."""
    args, result = parse_or_dispatch(build_parser(), argv, "main_detect")
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
    root = prepare_data(args, info)
    train_set = CocoInstances(root, "train", train=True, transform=train_transform(
        args.train_aug, size=args.input_size, scale_range=args.scale_range, crop=args.train_crop))
    val_set = CocoInstances(root, "val")
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
        load_model_state(model, load_checkpoint(resume)["model"], source=f"checkpoint {resume}")
        return write_results(output_dir if info.is_main else None, report(evaluate(), "eval"))

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
    writer = MetricWriter(output_dir, args.log_dir or output_dir / "tensorboard", enabled=info.is_main)
    # the epoch-end writes of the classification scripts: no non-finite state saved, checkpoint-last.pth last
    ckpts = RunCheckpoints(output_dir, epochs=args.epochs, save_every=args.save_every, enabled=info.is_main,
                           log_epoch=writer.log_epoch)
    checkpoint = ckpts.resume(args.resume, auto=args.auto_resume, model=model, optimizer=optimizer, scaler=scaler,
                              sync=lambda step: None, steps_per_epoch=steps_per_epoch,
                              required=("model", "optimizer", "epoch"),
                              hint="a pretrained backbone goes to --finetune; --eval evaluates a checkpoint")
    start_epoch = checkpoint["epoch"] + 1 if checkpoint else args.start_epoch
    skipped, result = (checkpoint.get("skipped_steps", 0), checkpoint.get("metrics", {})) if checkpoint else (0, {})
    if info.is_main:
        write_run_record(output_dir, vars(args), {"lr": lr, "effective_batch": eff_batch, "classes": val_set.classes,
                         "steps_per_epoch": steps_per_epoch, "world_size": info.world_size}, argv)
    ddp = wrap_ddp(model, info)
    loop = LoopConfig(steps_per_epoch=steps_per_epoch, accum_steps=args.accum_iter, clip_grad=args.clip_grad,
                      amp_dtype=amp_dtype, device=device, max_skipped_steps=args.max_skipped_steps,
                      print_freq=args.print_freq, images_per_update=eff_batch, save_every_steps=args.save_every_steps,
                      total_steps=args.epochs * steps_per_epoch)

    def state(epoch: int, progress: EpochProgress) -> dict:
        return training_state(model, optimizer, scaler, epoch=epoch, step=progress.step, skipped=progress.skipped,
                              args=vars(args), metrics=result, classes=val_set.classes,
                              category_ids=val_set.category_ids)

    with Preemption(Path(__file__).name, argv) as preemption, ckpts:
        for epoch in range(start_epoch, args.epochs):
            progress = begin_epoch(loader, checkpoint, epoch, info, seed=args.seed, steps_per_epoch=steps_per_epoch,
                                   accum_steps=args.accum_iter, skipped=skipped)
            model.train()
            stats = train_one_epoch(partial(_step, ddp, device=device), loader, optimizer, scaler, loop, progress,
                                    before_update=lambda step: apply_lr(optimizer, schedule(step)),
                                    no_sync=getattr(ddp, "no_sync", None), log_fn=writer.log,
                                    should_stop=preemption.requested,
                                    checkpoint_fn=lambda p: ckpts.save_position(state(p.epoch - 1, p), p.state_dict()))
            preemption.exit_if_stopped(progress, steps_per_epoch=steps_per_epoch, saved=output_dir / LAST_NAME)
            skipped, evaluated = progress.skipped, {}
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                result = evaluated = report(evaluate(), f"epoch {epoch}")
                writer.log({f"val/{k}": v for k, v in result.items()}, progress.step)
                if info.is_main and args.vis_every and (epoch + 1) % args.vis_every == 0:
                    save_pictures(model, val_set, output_dir / f"detections_{epoch:03d}.png", device=device)
            ckpts.end_epoch(epoch, state(epoch, progress), log={**{f"train_{k}": v for k, v in stats.items()},
                                                                **{f"val_{k}": v for k, v in evaluated.items()},
                                                                "epoch": epoch})
            if epoch + 1 < args.epochs and preemption.requested_anywhere(device):
                barrier()
                preemption.exit(f"at the end of epoch {epoch}; saved {output_dir / LAST_NAME}")
    writer.close()
    return write_results(output_dir if info.is_main else None, {**result, "epoch": args.epochs - 1})


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
        mask_head_norm=args.mask_head_norm, train_as_given=args.train_aug != "lsj")
    if args.box_head_norm == "bn" and rank_and_world()[1] > 1 and torch.cuda.is_available():
        model.roi_heads = nn.SyncBatchNorm.convert_sync_batchnorm(model.roi_heads)  # dBOT's norm_cfg=SyncBN
    return model


def build_adapter(args: argparse.Namespace, *, finetune: str | None) -> nn.Module:
    """ViT-Adapter (``--model adapter_*``, models/adapter.py) + FPN neck to ``--out_channels`` with the stride-64
    level, as the seed's configs (mmdet FPN, num_outs 5). The checkpoint goes in as loaded, so DINOv2's
    LayerScale stays a parameter and register tokens / SwiGLU map; its position grid is resampled on the fly."""
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
                                 global_blocks=args.global_blocks, grad_checkpointing=args.grad_checkpointing)
    if finetune:
        state, source = to_timm_vit(load_checkpoint(finetune), source=args.checkpoint_source)
        missing, unexpected = backbone.load_backbone(state)
        if missing:
            raise ValueError(f"{finetune} ({source}) did not load the backbone: missing {missing[:8]}")
        logger.info("loaded %s (%s checkpoint) into the pyramid's ViT; ignored: %s", finetune, source,
                    unexpected[:8] or "none")
    return backbone


def prepare_data(args: argparse.Namespace, info: DistInfo) -> Path:
    """The COCO root: ``--data_path``, or synthetic scenes written once into ``<output_dir>/scenes`` (5 classes,
    colour-coded as the segmentation demo's, so that a CPU demo learns in minutes)."""
    if args.data_path != "scenes":
        return Path(args.data_path)
    from util.data.scenes import write_coco
    root = Path(args.output_dir) / "scenes"
    spec = {"n_train": args.scene_images[0], "n_val": args.scene_images[1], "size": args.input_size,
            "seed": args.seed, "class_colours": True}
    marker = root / "scenes.json"
    if info.is_main and not (marker.exists() and json.loads(marker.read_text()) == spec):
        write_coco(root, **spec)
        marker.write_text(json.dumps(spec))
    barrier()
    return root


def report(metrics: dict[str, float], what: str) -> dict[str, float]:
    logger.info("%s: box AP %.2f (AP50 %.2f, AP75 %.2f)  mask AP %.2f (AP50 %.2f, AP75 %.2f)", what,
                *(metrics.get(k, float("nan")) for k in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP",
                                                         "segm_AP50", "segm_AP75")))
    return metrics


def save_pictures(model: nn.Module, dataset: CocoInstances, path: Path, *, device: torch.device,
                  count: int = 4) -> None:
    """Predicted boxes and masks (score >= 0.5) over the first ``count`` validation images (one PNG)."""
    from util.vis import save_detection_png
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    model.eval()
    with torch.inference_mode():
        outputs = model([img.to(device) for img, _ in items])
    save_detection_png(path, [img for img, _ in items], [{k: v.cpu() for k, v in o.items()} for o in outputs],
                       dataset.classes)



if __name__ == "__main__":
    run_cli(main, NonFiniteLossError, NonFiniteStateError)
