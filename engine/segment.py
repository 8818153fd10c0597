"""Semantic segmentation: the step function for the shared loop, sliding-window evaluation and its report.

After mmsegmentation's ``EncoderDecoder`` (``forward_train``: logits upsampled bilinearly to the label size, cross
entropy with ignore index 255 averaged over every pixel of the batch, ignored ones included (``CrossEntropyLoss``
with ``avg_non_ignore=False``, its default and the only behaviour of the mmseg BEiT and MAE ran), auxiliary head loss
x 0.4; ``slide_inference``: overlapping crops, logits summed and
divided by the number of windows covering each pixel, then resized to the original label size) and
``eval_metrics`` (confusion matrix over labelled pixels). The confusion matrix of a rank's shard is all-reduced as
int64, so a distributed evaluation gives exactly the single-process numbers.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from util.data.scenes import write_ade20k
from util.distributed import all_reduce_sum, barrier
from util.outputs import write_text
from engine.metrics import segmentation_confusion, segmentation_metrics, segmentation_table

logger = logging.getLogger("vitfreeze")

IGNORE_INDEX = 255


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
