"""Detection / instance segmentation: the step function for ``engine.train.train_one_epoch`` and COCO evaluation.

torchvision's detection models return their loss dict in train mode (RPN objectness and box regression, RoI
classification and box regression per stage, mask); the step sums it, as mmdet and detectron2 do, and reports
each term. Evaluation runs the model on this rank's shard of the validation images (``engine.evaluate.eval_shard``),
turns detections into COCO results in the file's pixels and lets ``engine.coco_eval`` gather them on rank 0, so the
numbers are those of one process.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from engine.coco_eval import IOU_TYPES, distributed_coco_metrics, to_coco_results
from util.distributed import all_reduce_sum, barrier

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
