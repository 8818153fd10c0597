"""Mask R-CNN and Cascade Mask R-CNN on a feature-pyramid backbone, from torchvision's detection pieces.

The backbone is anything that maps images [B, 3, H, W] to an ``OrderedDict`` of feature maps ``'0'``..``'3'``
(strides 4..32) plus ``'pool'`` (stride 64) and has ``out_channels`` (``models.pyramid.ViTFeaturePyramid`` with
``extra_pool=True``, ``models.adapter.ViTAdapter``): torchvision's ``MaskRCNN`` (He et al., ICCV 2017) takes it as
is. Heads follow ViTDet (Li et al., ECCV 2022, detectron2 ``projects/ViTDet``): RPN with 2 convolutions, box head
of 4 convolutions + 1 fully connected layer, mask head of 4 convolutions, all normalised. ViTDet normalises them
with LayerNorm; we use GroupNorm with 32 groups (mmdet's ``GN`` heads): both are independent of the batch size,
which BatchNorm is not at 2 images per GPU.

**Cascade Mask R-CNN** (Cai & Vasconcelos, CVPR 2018; mmdet ``CascadeRoIHead``): three box stages trained at
IoU 0.5 / 0.6 / 0.7 with regression weights (10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15); each stage
regresses class-agnostically, and its refined (detached) boxes are the next stage's proposals; losses of stages
2 and 3 are weighted 0.5 and 0.25. At test time the class scores of the three stages are averaged and the boxes
are those of the last stage; the mask head runs on the last stage (mmdet runs one mask head per stage in
training; one head keeps this small and matches its inference, where only the last stage's masks are used).
Each stage is a torchvision ``RoIHeads`` (its matcher, sampler, box coder and post-processing at that stage's
IoU and weights); the cascade only chains them, so no torchvision internals are overridden. One difference from
mmdet: ground-truth boxes that torchvision appends to a stage's proposals are refined and passed on too.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from models.det_transform import SquarePadTransform

__all__ = ["DETECTORS", "CASCADE_IOUS", "CASCADE_WEIGHTS", "CascadeRoIHeads", "build_detector"]

DETECTORS = ("mask_rcnn", "cascade_mask_rcnn")
CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
CASCADE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


class ClassAgnosticPredictor(nn.Module):
    """Class scores [N, K + 1] and one box delta [N, 4] per RoI, repeated per class ([N, 4 (K + 1)]) so that
    torchvision's ``fastrcnn_loss`` and ``postprocess_detections`` (which index deltas by class) take it."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x).repeat(1, self.num_classes)


class CascadeRoIHeads(nn.Module):
    """Three (or more) chained ``RoIHeads`` box stages, masks on the last; same call as torchvision's RoIHeads:
    ``forward(features, proposals, image_shapes, targets) -> (detections, losses)``."""

    def __init__(self, stages: Sequence[RoIHeads], loss_weights: Sequence[float] = CASCADE_LOSS_WEIGHTS) -> None:
        super().__init__()
        if len(loss_weights) != len(stages):
            raise ValueError(f"one loss weight per stage: {len(stages)} stages, {len(loss_weights)} weights")
        self.stages = nn.ModuleList(stages)
        self.loss_weights = tuple(loss_weights)

    def forward(self, features: "OrderedDict[str, Tensor]", proposals: list[Tensor],
                image_shapes: list[tuple[int, int]], targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        losses: dict[str, Tensor] = {}
        probs: list[Tensor] = []
        labels = matched = None
        for k, stage in enumerate(self.stages):
            if self.training:
                proposals, matched, labels, reg_targets = stage.select_training_samples(proposals, targets)
            logits, deltas = stage.box_predictor(stage.box_head(stage.box_roi_pool(features, proposals,
                                                                                   image_shapes)))
            if self.training:
                cls_loss, box_loss = fastrcnn_loss(logits, deltas, labels, reg_targets)
                losses[f"s{k}.loss_classifier"] = cls_loss * self.loss_weights[k]
                losses[f"s{k}.loss_box_reg"] = box_loss * self.loss_weights[k]
            else:
                probs.append(F.softmax(logits, -1))
            if k < len(self.stages) - 1:  # refine: the next stage pools from this stage's boxes (no gradient)
                boxes = stage.box_coder.decode(deltas[:, :4].detach(), proposals)[:, 0]
                proposals = [_clip(b, s) for b, s in zip(boxes.split([len(p) for p in proposals]), image_shapes)]
        last = self.stages[-1]
        if self.training:
            if last.has_mask():
                losses["loss_mask"] = self._mask_loss(features, proposals, image_shapes, targets, labels, matched)
            return [], losses
        mean_prob = torch.stack(probs).mean(0)  # the stages' scores averaged (mmdet's test-time ensemble)
        boxes, scores, classes = last.postprocess_detections(mean_prob.clamp_min(1e-12).log(), deltas, proposals,
                                                             image_shapes)
        result = [{"boxes": b, "labels": c, "scores": s} for b, s, c in zip(boxes, scores, classes)]
        if last.has_mask():
            mask_logits = last.mask_predictor(last.mask_head(last.mask_roi_pool(features, boxes, image_shapes)))
            for r, prob in zip(result, maskrcnn_inference(mask_logits, classes)):
                r["masks"] = prob
        return result, losses

    def _mask_loss(self, features, proposals, image_shapes, targets, labels, matched) -> Tensor:
        last = self.stages[-1]
        pos = [torch.where(lab > 0)[0] for lab in labels]
        mask_props = [p[i] for p, i in zip(proposals, pos)]
        logits = last.mask_predictor(last.mask_head(last.mask_roi_pool(features, mask_props, image_shapes)))
        return maskrcnn_loss(logits, mask_props, [t["masks"] for t in targets], [t["labels"] for t in targets],
                             [m[i] for m, i in zip(matched, pos)])


def _clip(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    h, w = size
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                        boxes[:, 3].clamp(0, h)], dim=1)


def _box_head(channels: int, convs: int = 4, fc: int = 1024) -> FastRCNNConvFCHead:
    return FastRCNNConvFCHead((channels, 7, 7), [channels] * convs, [fc], norm_layer=_group_norm)


def build_detector(kind: str, backbone: nn.Module, num_classes: int, *, img_size: int,
                   anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512), box_fc: int = 1024,
                   detections_per_img: int = 100, score_thresh: float = 0.05, rois_per_image: int = 512,
                   proposals_per_image: int = 2000, pad_to_square: bool = True) -> MaskRCNN:
    """Mask R-CNN or Cascade Mask R-CNN (``kind`` in ``DETECTORS``) over ``backbone``.

    Args:
        kind: ``mask_rcnn`` or ``cascade_mask_rcnn``.
        backbone: images -> ``OrderedDict`` ``'0'``..``'3'``, ``'pool'`` (strides 4..64), with ``out_channels``.
        num_classes: object classes, without the background (torchvision's count is this + 1).
        img_size: images are resized so that their longer side is this (ViTDet 1024); the training loader's
            large-scale-jitter canvases already have this size, so training inputs pass unresized.
        anchor_sizes: one anchor size per level (strides 4..64), three aspect ratios each.
        box_fc: width of the box head's fully connected layer.
        detections_per_img: detections kept per image (COCO: 100).
        score_thresh: detections below this score are dropped.
        rois_per_image: RoIs sampled per image and stage to train the box heads (mmdet / detectron2: 512).
        proposals_per_image: RPN proposals kept after NMS in training (2000) and testing (1000 = half).
        pad_to_square: pad every batch to img_size x img_size, the training grid (ViTDet's test-time square pad,
            models/det_transform.py); False: torchvision's padding to a multiple of 32.

    Returns:
        torchvision's ``MaskRCNN``; in train mode ``model(images, targets)`` returns a loss dict, in eval mode a
        list of ``{'boxes' [N, 4] xyxy, 'labels' [N], 'scores' [N], 'masks' [N, 1, H, W]}`` at the input size.
    """
    if kind not in DETECTORS:
        raise ValueError(f"unknown detector {kind!r}; choose one of {DETECTORS}")
    if len(anchor_sizes) != 5:
        raise ValueError(f"anchor_sizes needs one size per level (strides 4, 8, 16, 32, 64), got {anchor_sizes}")
    c, k = backbone.out_channels, num_classes + 1
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    box_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=0)
    model = MaskRCNN(backbone, num_classes=None, min_size=img_size, max_size=img_size, image_mean=IMAGENET_MEAN,
                     image_std=IMAGENET_STD, rpn_anchor_generator=anchors,
                     rpn_head=RPNHead(c, anchors.num_anchors_per_location()[0], conv_depth=2),
                     box_roi_pool=box_pool, box_head=_box_head(c, fc=box_fc),
                     box_predictor=FastRCNNPredictor(box_fc, k), box_detections_per_img=detections_per_img,
                     box_batch_size_per_image=rois_per_image, rpn_post_nms_top_n_train=proposals_per_image,
                     rpn_pre_nms_top_n_train=proposals_per_image, rpn_post_nms_top_n_test=proposals_per_image // 2,
                     rpn_pre_nms_top_n_test=proposals_per_image // 2,
                     box_score_thresh=score_thresh,
                     mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=14, sampling_ratio=0),
                     mask_head=MaskRCNNHeads(c, [c] * 4, 1, norm_layer=_group_norm),
                     mask_predictor=MaskRCNNPredictor(c, c, k))
    if pad_to_square:
        model.transform = SquarePadTransform.like(model.transform, img_size)
    if kind == "cascade_mask_rcnn":
        heads = model.roi_heads
        stages = []
        for i, (iou, weights) in enumerate(zip(CASCADE_IOUS, CASCADE_WEIGHTS)):
            last = i == len(CASCADE_IOUS) - 1
            stages.append(RoIHeads(box_pool, _box_head(c, fc=box_fc), ClassAgnosticPredictor(box_fc, k),
                                   fg_iou_thresh=iou, bg_iou_thresh=iou, batch_size_per_image=rois_per_image,
                                   positive_fraction=0.25, bbox_reg_weights=weights, score_thresh=score_thresh,
                                   nms_thresh=0.5, detections_per_img=detections_per_img,
                                   mask_roi_pool=heads.mask_roi_pool if last else None,
                                   mask_head=heads.mask_head if last else None,
                                   mask_predictor=heads.mask_predictor if last else None))
        model.roi_heads = CascadeRoIHeads(stages)
    return model


def detector_layer_id(name: str, backbone: nn.Module) -> int | None:
    """Layer id of a detector parameter for layer-wise lr decay: the backbone's ``layer_id`` for ``backbone.*``
    names (its ViT layers), None (scale 1, like a classifier head) for the RPN and RoI heads."""
    if name.startswith("backbone."):
        return backbone.layer_id(name[len("backbone."):])
    return None
