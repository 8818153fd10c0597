"""COCO box and mask AP (AP, AP50, AP75, APs, APm, APl) of detections, exact under DDP.

Library: **faster-coco-eval** (github.com/MiXaiLL76/faster_coco_eval), not pycocotools. Both give the same
numbers at the standard ``maxDets=(1, 10, 100)`` (``tests/test_coco_eval.py`` checks it on hand examples), but
pycocotools' ``summarize()`` hard-codes ``maxDets=100`` for the first line, so with any other last threshold
its AP is -1 (a hand example with ``maxDets=(1, 2, 3)``: pycocotools AP -1, faster-coco-eval 0.4716, which is
the AP recomputed by pycocotools itself at ``maxDets=(1, 10, 100)`` where 3 detections per image are all there
are). faster-coco-eval fixes that, evaluates in C++ (several times faster on COCO val) and is released
regularly; pycocotools stays a test-only dependency, as the independent reference.

Detections are COCO result dicts (``image_id``, ``category_id``, ``bbox`` in xywh, ``score``, and
``segmentation`` as RLE with str counts). A distributed evaluation gathers every rank's list on rank 0
(each image lives on exactly one rank: ``engine.evaluate.eval_shard``), which evaluates and broadcasts the
numbers, so every rank returns the single-process result. Values are percentages (dBOT and ViT-Adapter report "box AP
51.5"); -1 is COCO's "no ground truth in this area range".
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from util.distributed import broadcast_object, gather_objects

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


def to_coco_results(image_id: int, boxes: Tensor, scores: Tensor, labels: Tensor, category_ids: Sequence[int],
                    masks: Tensor | None = None, mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """One image's detections as COCO result dicts.

    Args:
        image_id: the COCO image id.
        boxes: [N, 4] xyxy in the original image's pixels.
        scores: [N].
        labels: [N] contiguous labels 1..K (0 is torchvision's background).
        category_ids: COCO category id of label k at index k - 1.
        masks: [N, 1, H, W] or [N, H, W] mask probabilities at the original image size, or None.
        mask_threshold: probability at which a pixel belongs to the mask.
    """
    from faster_coco_eval.core import mask as mask_util  # lazy: only evaluation needs it
    boxes, scores, labels = boxes.detach().float().cpu(), scores.detach().float().cpu(), labels.detach().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    rles: list[dict | None] = [None] * len(xywh)
    if masks is not None and len(xywh):
        binary = (masks.detach().reshape(len(xywh), *masks.shape[-2:]) > mask_threshold).cpu().numpy()
        rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")  # str: JSON- and pickle-friendly
    out = []
    for box, score, label, rle in zip(xywh, scores.tolist(), labels.tolist(), rles):
        result = {"image_id": int(image_id), "category_id": int(category_ids[label - 1]),
                  "bbox": [round(v, 3) for v in box], "score": float(score)}
        if rle is not None:
            result["segmentation"] = rle
        out.append(result)
    return out


def coco_metrics(gt: dict[str, Any], results: Iterable[dict[str, Any]], *, iou_types: Sequence[str] = IOU_TYPES,
                 max_dets: Sequence[int] = (1, 10, 100), image_ids: Sequence[int] | None = None
                 ) -> dict[str, float]:
    """COCO metrics of ``results`` against the ground truth ``gt`` (a COCO instances dict).

    Args:
        gt: ``{"images", "annotations", "categories"}`` as in ``instances_val2017.json``.
        results: COCO result dicts (see the module docstring); may be empty.
        iou_types: ``bbox`` and/or ``segm``.
        max_dets: detections per image kept at the three recall thresholds; AP uses the last.
        image_ids: evaluate these images only (default: every image of ``gt``).

    Returns:
        ``{f"{iou_type}_{name}": percent}`` for ``name`` in ``METRICS``. No detections at all gives AP 0 for every
        area range that has ground truth (COCO's loadRes cannot take an empty list, so this case is ours).
    """
    from faster_coco_eval import COCO, COCOeval_faster
    results = list(results)
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
    out: dict[str, float] = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
        dets = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not dets:
            stats = _empty_stats(coco_gt, image_ids)
        else:
            with quiet:
                coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
                evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type)
                evaluator.params.maxDets = list(max_dets)
                if image_ids is not None:
                    evaluator.params.imgIds = list(image_ids)
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
            stats = [float(s) for s in evaluator.stats[:len(METRICS)]]
        out.update({f"{iou_type}_{name}": (100.0 * s if s >= 0 else -1.0) for name, s in zip(METRICS, stats)})
    return out


def _empty_stats(coco_gt: Any, image_ids: Sequence[int] | None) -> list[float]:
    """AP of no detections: 0 where some non-crowd ground truth falls in the area range, else COCO's -1."""
    ids = set(image_ids) if image_ids is not None else None
    areas = [a["area"] for a in coco_gt.dataset.get("annotations", [])
             if not a.get("iscrowd", 0) and (ids is None or a["image_id"] in ids)]
    ranges = [(0, 1e10), (0, 1e10), (0, 1e10), (0, 32 ** 2), (32 ** 2, 96 ** 2), (96 ** 2, 1e10)]
    return [0.0 if any(lo <= a <= hi for a in areas) else -1.0 for lo, hi in ranges]


def distributed_coco_metrics(gt: dict[str, Any], local_results: list[dict[str, Any]], *,
                             iou_types: Sequence[str] = IOU_TYPES, max_dets: Sequence[int] = (1, 10, 100),
                             image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """:func:`coco_metrics` of the results of all ranks together: gathered on rank 0, numbers broadcast back.

    ``image_ids`` (default: every image of ``gt``) must be the union of all ranks' images, so that an image
    without any detection still counts its ground truth as missed.
    """
    gathered = gather_objects(local_results)
    metrics = None
    if gathered is not None:
        metrics = coco_metrics(gt, [r for part in gathered for r in part], iou_types=iou_types, max_dets=max_dets,
                               image_ids=image_ids)
    return broadcast_object(metrics)
