"""Semantic segmentation: the model, the step function for the shared loop, sliding-window evaluation and its report.

After mmsegmentation's ``EncoderDecoder`` (``forward_train``: logits upsampled bilinearly to the label size, cross
entropy with ignore index 255 averaged over every pixel of the batch, ignored ones included (``CrossEntropyLoss``
with ``avg_non_ignore=False``, its default and the only behaviour of the mmseg BEiT and MAE ran), auxiliary head loss
x 0.4; ``slide_inference``: overlapping crops, logits summed and
divided by the number of windows covering each pixel, then resized to the original label size) and
``eval_metrics`` (confusion matrix over labelled pixels). The confusion matrix of a rank's shard is all-reduced as
int64, so a distributed evaluation gives exactly the single-process numbers. ``build_model`` is ``main_segment.py``'s
UperNet on the ViT feature pyramid (the ``out_indices`` of BEiT's ``semantic_segmentation`` configs) or on the
ViT-Adapter.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import models
from models.adapter import create_adapter
from models.backbone import load_pyramid_backbone
from models.pyramid import ViTFeaturePyramid
from models.seg_heads import UperNetSegmentor
from util.checkpoint import load_checkpoint
from util.param_groups import param_groups
from util.data.scenes import write_ade20k
from util.distributed import all_reduce_sum, barrier
from util.outputs import write_text
from engine.metrics import segmentation_confusion, segmentation_metrics, segmentation_table

logger = logging.getLogger("vitfreeze")

IGNORE_INDEX = 255
TAPS = {12: [3, 5, 7, 11], 24: [7, 11, 15, 23]}  # BEiT's / MAE's out_indices for ViT-B and ViT-L
ARCH = {"tiny": "vit_tiny_patch16", "small": "vit_small_patch16", "base": "vit_base_patch16",
        "large": "vit_large_patch16", "huge": "vit_huge_patch14"}


def _up(logits: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def segment_step(model: nn.Module, batch: Any, step: int, *, device: torch.device, aux_weight: float = 0.4,
                 ignore_index: int = IGNORE_INDEX, avg_non_ignore: bool = False) -> dict[str, Tensor]:
    """One micro-batch of segmentation training.

    Args:
        model: returns ``{'seg': logits [B, K, h, w], 'aux': logits (optional)}`` (``UperNetSegmentor``).
        batch: ``(images [B, 3, H, W], labels int64 [B, H, W], ...)``.
        step: optimizer updates so far (unused; part of the step-function contract).
        aux_weight: weight of the auxiliary head's loss.
        avg_non_ignore: False (mmseg's default): the summed cross entropy is divided by all B H W pixels, so a batch
            with many ignored pixels weighs less; True: by the labelled pixels only (mmseg ``avg_non_ignore=True``).

    Returns:
        ``{'loss', 'loss_seg'[, 'loss_aux']}``; a batch whose pixels are all ignored gives loss 0 (not NaN).
    """
    images = batch[0].to(device, non_blocking=True)
    labels = batch[1].to(device, non_blocking=True)
    out = model(images)
    size = labels.shape[-2:]

    def ce(logits: Tensor) -> Tensor:
        loss = F.cross_entropy(_up(logits, size).float(), labels, ignore_index=ignore_index, reduction="sum")
        return loss / ((labels != ignore_index).sum().clamp(min=1) if avg_non_ignore else labels.numel())

    loss_seg = ce(out["seg"])
    result = {"loss": loss_seg, "loss_seg": loss_seg.detach()}
    if "aux" in out and aux_weight > 0:
        loss_aux = ce(out["aux"])
        result["loss"] = loss_seg + aux_weight * loss_aux
        result["loss_aux"] = loss_aux.detach()
    return result


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg's slide grid along one axis: ``max(size - crop + stride - 1, 0) // stride + 1`` windows, the last one
    moved back to end at the border."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, size - crop), 0) for i in range(n)})


@torch.no_grad()
def slide_inference(model: nn.Module, image: Tensor, *, num_classes: int, crop: int, stride: int,
                    batch_windows: int = 8) -> Tensor:
    """Class logits [K, H, W] of one normalised image [3, H, W] from overlapping ``crop`` windows.

    Windows smaller than ``crop`` (an image side under ``crop``) are zero-padded to ``crop`` and their logits
    cropped back; each window's logits are upsampled to the window size, summed, and divided by the count of
    windows covering each pixel.
    """
    _, h, w = image.shape
    logits = image.new_zeros((num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, h, w), dtype=torch.float32)
    boxes = [(y, min(y + crop, h), x, min(x + crop, w)) for y in window_starts(h, crop, stride)
             for x in window_starts(w, crop, stride)]
    for first in range(0, len(boxes), batch_windows):
        chunk = boxes[first:first + batch_windows]
        crops = torch.stack([F.pad(image[:, y0:y1, x0:x1], (0, crop - (x1 - x0), 0, crop - (y1 - y0)))
                             for y0, y1, x0, x1 in chunk])
        out = _up(model(crops)["seg"].float(), (crop, crop))
        for (y0, y1, x0, x1), window in zip(chunk, out):
            logits[:, y0:y1, x0:x1] += window[:, :y1 - y0, :x1 - x0]
            count[:, y0:y1, x0:x1] += 1
    return logits / count


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: Iterable, *, device: torch.device, num_classes: int, crop: int,
                          stride: int, amp_dtype: torch.dtype | None = None, ignore_index: int = IGNORE_INDEX,
                          keep: int = 0) -> dict[str, Any]:
    """mIoU / mAcc / aAcc (percent) and per-class IoU / Acc over ``loader``, exact under DDP.

    Args:
        loader: yields ``(images, labels, indices)`` as lists (``util.data.ade20k.collate_eval``): each image
            normalised [3, h, w] (resized for the model), each label int64 [H, W] at the original size.
        crop, stride: sliding window.
        keep: also return the first ``keep`` (image, label, prediction) triples of this rank (for pictures).

    Returns:
        :func:`engine.metrics.segmentation_metrics` plus ``'confusion'`` (int64 [K, K]), ``'num_images'`` and
        ``'samples'`` (the kept triples, on the CPU).
    """
    was_training = model.training
    model.eval()
    confusion = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    images_seen, samples = 0, []
    for images, labels, _ in loader:
        for image, label in zip(images, labels):
            image, label = image.to(device), label.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = slide_inference(model, image, num_classes=num_classes, crop=crop, stride=stride)
            pred = _up(logits[None], tuple(label.shape))[0].argmax(0)
            confusion += segmentation_confusion(pred, label, num_classes, ignore_index)
            images_seen += 1
            if len(samples) < keep:
                samples.append((image.cpu(), label.cpu(), pred.cpu()))
    model.train(was_training)
    confusion = all_reduce_sum(confusion)
    total = all_reduce_sum(torch.tensor([images_seen], device=device))
    metrics = segmentation_metrics(confusion.cpu())
    return {**metrics, "confusion": confusion.cpu(), "num_images": int(total.item()), "samples": samples}


def iteration_budget(max_iters: int, steps_per_epoch: int) -> int:
    """Epochs needed to run ``max_iters`` optimizer steps at ``steps_per_epoch`` (the last one may be partial)."""
    return math.ceil(max_iters / steps_per_epoch)


def demo_scenes(output_dir: Path, size: int, *, is_main: bool) -> str:
    """``--data_path demo``: synthetic scenes in the ADE20K layout under ``<output_dir>/demo_scenes`` (written once,
    by rank 0): 320 training and 64 validation scenes of 5 classes, colour-coded (``class_colours``) so that a CPU
    demo learns."""
    root = output_dir / "demo_scenes"
    if is_main and not (root / "annotations" / "validation").is_dir():
        write_ade20k(root, n_train=320, n_val=64, size=size, seed=0, class_colours=True)
    barrier()
    return str(root)


def report_segmentation(metrics: dict[str, Any], output_dir: Path, is_main: bool, *, step: int,
                        vis: bool = False) -> dict:
    """Log an evaluation's metrics and per-class table; rank 0 writes ``results.json`` and, with samples, the
    pictures (``val_step<step>.png``, or ``val_eval.png`` for ``--eval``). Returns what ``results.json`` holds."""
    logger.info("step %d: mIoU %.2f  mAcc %.2f  aAcc %.2f  (%d images)", step, metrics["mIoU"], metrics["mAcc"],
                metrics["aAcc"], metrics["num_images"])
    logger.info("per-class results:\n%s", segmentation_table(metrics))
    out = {k: metrics[k] for k in ("mIoU", "mAcc", "aAcc", "IoU", "Acc", "num_images")}
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text(output_dir / "results.json", json.dumps(out, indent=2) + "\n")
        if metrics["samples"]:
            from util.vis import save_segmentation_png  # lazy: pictures are optional
            save_segmentation_png(output_dir / (f"val_step{step}.png" if vis else "val_eval.png"), metrics["samples"],
                                  num_classes=len(metrics["IoU"]))
    return out


def model_name(name: str) -> str:
    """dBOT's model forms: ``base`` / ``vit_base`` -> ``vit_base_patch16`` (a registered name is kept)."""
    short = name[4:] if name.startswith("vit_") and name[4:] in ARCH else name
    return ARCH.get(short, name)


def build_model(args: argparse.Namespace, *, finetune: str | None) -> UperNetSegmentor:
    """Pyramid + UperNet; the backbone from ``finetune`` (any supported checkpoint) or random."""
    if args.model.startswith("adapter_"):  # ViT-Adapter's four levels (its paper's ADE20K setting)
        if args.use_rel_pos or args.rel_pos_bias or args.layer_scale_init_value is not None:
            raise ValueError(f"--use_rel_pos / --rel_pos_bias / --layer_scale_init_value are options of the plain-ViT "
                             f"pyramid, not of the ViT-Adapter --model {args.model}; drop them")
        adapter = create_adapter(args.model, drop_path_rate=args.drop_path, window_size=args.window_size,
                                 global_blocks=tuple(args.global_blocks), grad_checkpointing=args.grad_checkpointing,
                                 vit_feature_per_interaction=True)  # the reference's segmentation backbone
        if finetune:  # as loaded: LayerScale stays a parameter, registers / SwiGLU map (models/adapter.py)
            adapter.load_backbone(load_checkpoint(finetune), source=args.checkpoint_source, what=finetune)
        return UperNetSegmentor(adapter, args.nb_classes, channels=args.channels or adapter.embed_dim,
                                aux_channels=args.aux_channels)
    name = model_name(args.model)
    width, depth = _arch(name)
    taps = args.tap_blocks
    if taps is None:
        taps = TAPS.get(depth, [depth * k // 4 - 1 for k in (1, 2, 3, 4)])
    backbone = ViTFeaturePyramid(name, img_size=args.input_size, out_channels=args.out_channels,
                                 drop_path_rate=args.drop_path, window_size=args.window_size,
                                 global_blocks=tuple(args.global_blocks), grad_checkpointing=args.grad_checkpointing,
                                 tap_blocks=tuple(taps) or None, neck=args.neck, use_rel_pos=args.use_rel_pos,
                                 rel_pos_bias=args.rel_pos_bias, layer_scale_init_value=args.layer_scale_init_value)
    if finetune:
        load_pyramid_backbone(backbone, load_checkpoint(finetune), source=args.checkpoint_source, name=finetune)
    elif not (args.resume or args.auto_resume):
        logger.warning("no --finetune checkpoint: the backbone starts from random initialisation (a baseline)")
    return UperNetSegmentor(backbone, args.nb_classes, channels=args.channels or width,
                            aux_channels=args.aux_channels)


def _arch(name: str) -> tuple[int, int]:
    """(embed_dim, depth) of a registered ViT, read from a meta-device instance (no memory, no init cost)."""
    with torch.device("meta"):
        vit = models.create_model(name, num_classes=0)
    return vit.embed_dim, len(vit.blocks)


def build_optimizer(model: UperNetSegmentor, args: argparse.Namespace, lr: float) -> torch.optim.AdamW:
    """AdamW with BEiT's layer-wise lr decay (``--layer_decay``; MAE ``util/lr_decay.py``): the ViT's layers by
    ``model.layer_id``, the neck and heads (layer ``depth + 1``) at the full ``lr``."""
    depth = model.depth
    unit_of = lambda name: (lambda i: None if i > depth else i)(model.layer_id(name))  # noqa: E731
    return torch.optim.AdamW(param_groups(model, weight_decay=args.weight_decay, unit_of=unit_of,
                                          no_weight_decay=model.no_weight_decay(), layer_decay=args.layer_decay,
                                          num_layers=depth + 1), lr=lr)
