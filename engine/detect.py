"""Detection / instance segmentation: the step function for ``engine.train.train_one_epoch`` and COCO evaluation.

torchvision's detection models return their loss dict in train mode (RPN objectness and box regression, RoI
classification and box regression per stage, mask); the step sums it, as mmdet and detectron2 do, and reports
each term. Evaluation runs the model on this rank's shard of the validation images (``engine.evaluate.eval_shard``),
turns detections into COCO results in the file's pixels and lets ``engine.coco_eval`` gather them on rank 0, so the
numbers are those of one process. ``build_model`` is ``main_detect.py``'s detector: the ``--detector`` heads
(``models/detectors.py``) over ViTDet's simple feature pyramid (``build_pyramid``) or the ViT-Adapter
(``build_adapter``).
"""
from __future__ import annotations

import argparse
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from engine.coco_eval import IOU_TYPES, distributed_coco_metrics, to_coco_results
from models.adapter import ADAPTER_MODELS, create_adapter
from models.backbone import load_pyramid_backbone
from models.detectors import BoxLoss, build_detector, detector_layer_id
from models.pyramid import ViTFeaturePyramid
from util import preflight
from util.checkpoint import load_checkpoint
from util.data.coco import CocoInstances
from util.data.det_transforms import train_transform
from util.distributed import all_reduce_sum, barrier, DistInfo, rank_and_world
from util.param_groups import param_groups

logger = logging.getLogger("vitfreeze")

TARGET_KEYS = ("boxes", "labels", "masks")


def _to_device(targets: Sequence[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: (v.to(device, non_blocking=True) if k in TARGET_KEYS else v) for k, v in t.items()} for t in targets]


def detect_step(model: nn.Module, batch: Sequence, step: int, *, device: torch.device) -> dict[str, torch.Tensor]:
    """One micro-batch: ``batch = (images, targets[, keys])`` as lists (``util.data.coco.collate_detection``).

    Returns:
        ``{'loss': sum of the model's losses, <each loss term>: detached}``.
    """
    images = [img.to(device, non_blocking=True) for img in batch[0]]
    losses = model(images, _to_device(batch[1], device))
    loss = sum(losses.values())
    return {"loss": loss, **{name: value.detach() for name, value in losses.items()}}


@torch.inference_mode()
def predict_coco(model: nn.Module, loader: Iterable, *, device: torch.device, category_ids: Sequence[int],
                 amp_dtype: torch.dtype | None = None, masks: bool = True) -> list[dict[str, Any]]:
    """This rank's detections as COCO result dicts, boxes and masks in the original images' pixels.

    ``loader`` yields ``(images, targets)`` lists whose targets carry ``image_id``, ``orig_size`` and ``scale``
    (item pixels per file pixel; 1 when the model's own transform does the resizing).
    """
    model.eval()
    results: list[dict[str, Any]] = []
    for images, targets, *_ in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model([img.to(device, non_blocking=True) for img in images])
        for out, target in zip(outputs, targets):
            scale, (h, w) = float(target["scale"]), target["orig_size"]
            prob = out.get("masks") if masks else None
            if prob is not None and (scale != 1.0 or tuple(prob.shape[-2:]) != (h, w)):
                size = (round(prob.shape[-2] / scale), round(prob.shape[-1] / scale))
                prob = torch.nn.functional.interpolate(prob.float(), size=size, mode="bilinear",
                                                       align_corners=False)[..., :h, :w]
            results += to_coco_results(int(target["image_id"]), out["boxes"].float() / scale, out["scores"],
                                       out["labels"], category_ids, prob)
    return results


def evaluate_detection(model: nn.Module, loader: Iterable, *, device: torch.device, gt: dict[str, Any],
                       category_ids: Sequence[int], image_ids: Sequence[int] | None = None,
                       amp_dtype: torch.dtype | None = None, iou_types: Sequence[str] = IOU_TYPES,
                       max_dets: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
    """COCO ``bbox_*`` / ``segm_*`` metrics (percent) of ``model`` on the images of ``loader`` over all ranks.

    Args:
        gt: the COCO annotation dict of the evaluated split.
        image_ids: the evaluated images (all ranks together; default: every image in ``gt``).
        iou_types: ``bbox`` and/or ``segm``.
    """
    results = predict_coco(model, loader, device=device, category_ids=category_ids, amp_dtype=amp_dtype,
                           masks="segm" in iou_types)
    metrics = distributed_coco_metrics(gt, results, iou_types=iou_types, max_dets=max_dets, image_ids=image_ids)
    metrics["num_detections"] = float(all_reduce_sum(torch.tensor(len(results), device=device)))  # all ranks'
    return metrics


def demo_coco(root: Path, *, n_train: int, n_val: int, size: int, seed: int, is_main: bool) -> Path:
    """``--data_path scenes``: synthetic scenes in the COCO layout written once into ``root`` (5 classes,
    colour-coded as the segmentation demo's, so that a CPU demo learns in minutes); rewritten when the spec
    (counts, size, seed) changes."""
    from util.data.scenes import write_coco
    spec = {"n_train": n_train, "n_val": n_val, "size": size, "seed": seed, "class_colours": True}
    marker = root / "scenes.json"
    if is_main and not (marker.exists() and json.loads(marker.read_text()) == spec):
        write_coco(root, **spec)
        marker.write_text(json.dumps(spec))
    barrier()
    return root


def report_detection(metrics: dict[str, float], what: str) -> dict[str, float]:
    """Log box and mask AP (AP50, AP75) of an evaluation; returns ``metrics``."""
    logger.info("%s: box AP %.2f (AP50 %.2f, AP75 %.2f)  mask AP %.2f (AP50 %.2f, AP75 %.2f)", what,
                *(metrics.get(k, float("nan")) for k in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP",
                                                         "segm_AP50", "segm_AP75")))
    return metrics


def save_detections_png(model: nn.Module, dataset: Any, path: Path, *, device: torch.device, count: int = 4) -> None:
    """Ground truth beside the predicted boxes and masks (score >= 0.5) of the first ``count`` images of ``dataset``
    (one PNG)."""
    from util.vis import save_detection_png  # lazy: pictures are optional
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    model.eval()
    with torch.inference_mode():
        outputs = model([img.to(device) for img, _ in items])
    save_detection_png(path, [img for img, _ in items], [{k: v.cpu() for k, v in o.items()} for o in outputs],
                       dataset.classes, targets=[target for _, target in items])


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


def check_args(args: argparse.Namespace) -> None:
    """Reject a ``--model`` that is no detection backbone, before anything is built (ValueError)."""
    if not args.model.startswith(("vit_", "adapter_")):
        raise ValueError(f"--model {args.model}: the detection backbone is a ViT (vit_base_patch16, ...) or a "
                         f"ViT-Adapter ({', '.join(sorted(ADAPTER_MODELS))})")


def build_data(args: argparse.Namespace, output_dir: Path, info: DistInfo) -> tuple[CocoInstances, CocoInstances]:
    """The COCO training set (``--train_aug``) and validation set of ``--data_path`` (``scenes``: :func:`demo_coco`
    first), their categories checked to agree."""
    root = Path(args.data_path) if args.data_path != "scenes" else demo_coco(
        preflight.scratch_dir(output_dir) / "scenes", n_train=args.scene_images[0], n_val=args.scene_images[1],
        size=args.input_size, seed=args.seed, is_main=info.is_main)
    train_set = CocoInstances(root, "train", train=True, strict_data=args.strict_data, transform=train_transform(
        args.train_aug, size=args.input_size, scale_range=args.scale_range, crop=args.train_crop))
    val_set = CocoInstances(root, "val", strict_data=args.strict_data)  # validated here, before any training
    if train_set.category_ids != val_set.category_ids:
        raise ValueError(f"train and val categories differ: {train_set.category_ids} vs {val_set.category_ids}")
    return train_set, val_set


def build_optimizer(model: nn.Module, args: argparse.Namespace, lr: float) -> torch.optim.AdamW:
    """AdamW with layer-wise lr decay (``--layer_decay``; BEiT, MAE ``util/lr_decay.py``) over the backbone's ViT
    layers (``models.detectors.detector_layer_id``); the RPN and RoI heads keep the full ``lr``."""
    backbone, depth = model.backbone, model.backbone.depth
    return torch.optim.AdamW(param_groups(
        model, weight_decay=args.weight_decay, unit_of=partial(detector_layer_id, backbone=backbone),
        no_weight_decay={f"backbone.{n}" for n in backbone.no_weight_decay()}, layer_decay=args.layer_decay,
        num_layers=depth + 1), lr=lr)
