"""Mask R-CNN and Cascade Mask R-CNN on a feature-pyramid backbone, from torchvision's detection pieces.

The backbone is anything that maps images [B, 3, H, W] to an ``OrderedDict`` of feature maps ``'0'``..``'3'``
(strides 4..32) plus ``'pool'`` (stride 64) and has ``out_channels`` (``models.pyramid.ViTFeaturePyramid`` with
``extra_pool=True``, ``models.adapter.ViTAdapter``): torchvision's ``MaskRCNN`` (He et al., ICCV 2017) takes it as
is. Heads follow ViTDet (Li et al., ECCV 2022, detectron2 ``projects/ViTDet``): RPN with 2 convolutions, box head
of 4 convolutions + 1 fully connected layer, mask head of 4 convolutions, all normalised. ViTDet normalises them
with LayerNorm over channels (``box_head_norm='ln'``, ``mask_head_norm='ln'``); the default is GroupNorm with 32
groups (mmdet's ``GN`` heads): both are independent of the batch size, which BatchNorm is not at 2 images per GPU.
``box_head_norm='bn'`` gives the BatchNorm box head of
iBOT / dBOT's ``ConvFCBBoxHead`` (``norm_cfg=SyncBN``; the entry script makes it SyncBN when distributed),
``box_head='2fc'`` mmdet's ``Shared2FCBBoxHead`` (``configs/_base_/models/mask_rcnn_r50_fpn.py``) and
``mask_head_norm='none'`` mmdet's ``FCNMaskHead``.

RoIs are pooled with *aligned* RoIAlign (half-pixel offset, ``torchvision.ops.roi_align(aligned=True)``; mmcv's
``RoIAlign`` default and detectron2's ``ROIAlignV2``) on the level of torchvision's FPN level mapper
(:class:`AlignedMultiScaleRoIAlign`); ``roi_align_aligned=False`` is torchvision's ``MultiScaleRoIAlign``.

Losses (the reference configs'): the RPN's box regression is smooth L1 with ``rpn_smooth_l1_beta`` (0 = L1: mmdet
``mask_rcnn_r50_fpn.py`` ``L1Loss``, detectron2 ``smooth_l1_beta=0``; iBOT / dBOT's cascade 1/9); the RoI box loss
is smooth L1 with ``box_smooth_l1_beta`` (0 = L1, as above) or ``box_loss='giou'``: GIoU (Rezatofighi et al., CVPR
2019) of the decoded box with its ground truth (mmdet ``reg_decoded_bbox=True``, ``GIoULoss``), times
``box_loss_weight`` (dBOT: 10). Either is summed over the positive RoIs and divided by all sampled RoIs (mmdet's
``avg_factor``, torchvision's ``fastrcnn_loss``).

**Cascade Mask R-CNN** (Cai & Vasconcelos, CVPR 2018), as mmdet's ``CascadeRoIHead``
(``configs/_base_/models/cascade_mask_rcnn_r50_fpn.py``): three box stages trained at IoU 0.5 / 0.6 / 0.7 with
target stds (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067) (box-coder weights
1 / std); each stage's refined (detached) boxes are the next stage's proposals, without the ground-truth boxes
that sampling added (mmdet ``refine_bboxes`` drops ``pos_is_gt``); regression is class-agnostic
(``reg_class_agnostic=True``, ViTDet's cascade) or class-specific (``class_agnostic=False``, dBOT's config: a
positive RoI is refined by its ground-truth class, others by their predicted class). Each stage has its own mask
head; its box and mask losses are weighted 1 / 0.5 / 0.25 (``stage_loss_weights``). At test time the class scores
are the softmax of the three stages' *averaged logits* (``cls_score = sum(ms_scores) / num_stages``, then
``get_bboxes``' softmax), the boxes those of the last stage, and the masks the mean of the three mask heads'
sigmoid outputs on the final boxes (``merge_aug_masks``). Each stage is a :class:`RoIStage` (torchvision's
``RoIHeads``: its matcher, sampler, box coder and post-processing at that stage's IoU and weights); Mask R-CNN is
the same code with one stage.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, generalized_box_iou_loss, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from models.det_transform import square_padded
from models.pyramid import LayerNorm2d

__all__ = ["DETECTORS", "CASCADE_IOUS", "CASCADE_WEIGHTS", "BoxLoss", "RoIStage", "CascadeRoIHeads",
           "AlignedMultiScaleRoIAlign", "build_detector"]

DETECTORS = ("mask_rcnn", "cascade_mask_rcnn")
BOX_LOSSES = ("smooth_l1", "giou")
BOX_HEADS = ("4conv1fc", "2fc")
HEAD_NORMS = ("gn", "ln", "bn", "none")
MASK_HEAD_NORMS = ("gn", "ln", "none")
CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
CASCADE_WEIGHTS = tuple(tuple(1.0 / s for s in stds) for stds in CASCADE_STDS)
CASCADE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


NORM_LAYERS = {"gn": _group_norm, "ln": LayerNorm2d, "bn": nn.BatchNorm2d, "none": None}


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same level mapper and scales) with ``roi_align(aligned=True)``: box
    corners are shifted by half a feature pixel, as mmcv's ``RoIAlign(aligned=True)`` and detectron2's
    ``ROIAlignV2`` (a box [x0, x1] covers features (x0 * scale - 0.5) .. (x1 * scale - 0.5))."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes) if len(feats) > 1 else torch.zeros(len(rois), dtype=torch.int64)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels.to(rois.device) == level)[0]
            out[idx] = roi_align(feat, rois[idx], self.output_size, spatial_scale=scale,
                                 sampling_ratio=self.sampling_ratio, aligned=True).to(out.dtype)
        return out


@dataclass(frozen=True)
class BoxLoss:
    """The RoI box-regression loss: ``kind`` ``smooth_l1`` (``beta`` 0 = L1) on the encoded deltas, or ``giou`` on
    the decoded boxes; times ``weight``."""
    kind: str = "smooth_l1"
    beta: float = 0.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in BOX_LOSSES:
            raise ValueError(f"unknown box loss {self.kind!r}; choose one of {BOX_LOSSES}")


class ClassAgnosticPredictor(nn.Module):
    """Class scores [N, K + 1] and one box delta [N, 4] per RoI, repeated per class ([N, 4 (K + 1)]) so that
    torchvision's ``postprocess_detections`` (which indexes deltas by class) takes it."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x).repeat(1, self.num_classes)


class SmoothL1RPN(RegionProposalNetwork):
    """torchvision's RPN with the box-regression loss's smooth-L1 ``beta`` as a setting (torchvision: 1/9;
    0 = L1, mmdet ``mask_rcnn_r50_fpn.py`` / detectron2)."""

    def __init__(self, *args, beta: float = 1.0 / 9, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.beta = beta

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        pos, neg = self.fg_bg_sampler(labels)
        pos, neg = torch.where(torch.cat(pos, dim=0))[0], torch.where(torch.cat(neg, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        labels, regression_targets = torch.cat(labels, dim=0), torch.cat(regression_targets, dim=0)
        box_loss = F.smooth_l1_loss(pred_bbox_deltas[pos], regression_targets[pos], beta=self.beta,
                                    reduction="sum") / sampled.numel()
        cls_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return cls_loss, box_loss


def _clip(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    h, w = size
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                        boxes[:, 3].clamp(0, h)], dim=1)


class RoIStage(RoIHeads):
    """One box (+ mask) stage: torchvision's ``RoIHeads`` with :class:`BoxLoss` and with its steps as methods the
    cascade chains. Called on its own it is Mask R-CNN's RoI head (a one-stage :func:`cascade_forward`)."""

    def __init__(self, *args, box_loss: BoxLoss = BoxLoss(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.box_loss = box_loss

    def predict_boxes(self, features, proposals, image_shapes) -> tuple[Tensor, Tensor]:
        """Class logits [N, K + 1] and per-class box deltas [N, 4 (K + 1)] of the proposals (all images)."""
        return self.box_predictor(self.box_head(self.box_roi_pool(features, proposals, image_shapes)))

    def predict_masks(self, features, boxes, image_shapes) -> Tensor:
        """Mask logits [N, K + 1, 28, 28] of the boxes."""
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))

    def losses(self, logits: Tensor, deltas: Tensor, proposals: list[Tensor], labels: list[Tensor],
               regression_targets: list[Tensor], gt_boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Cross-entropy over all sampled RoIs and the box loss over the positive ones, divided by all of them.
        ``gt_boxes``: each RoI's matched ground-truth box (read by ``giou`` only)."""
        labels, targets = torch.cat(labels), torch.cat(regression_targets)
        cls_loss = F.cross_entropy(logits, labels)
        pos = torch.where(labels > 0)[0]
        pred = deltas.reshape(len(labels), -1, 4)[pos, labels[pos]]
        if self.box_loss.kind == "giou":
            boxes = self.box_coder.decode_single(pred, torch.cat(proposals)[pos])
            box_loss = generalized_box_iou_loss(boxes, torch.cat(gt_boxes)[pos], reduction="sum")
        else:
            box_loss = F.smooth_l1_loss(pred, targets[pos], beta=self.box_loss.beta, reduction="sum")
        return cls_loss, self.box_loss.weight * box_loss / labels.numel()

    def refine(self, deltas: Tensor, proposals: list[Tensor], classes: Tensor,
               image_shapes: list[tuple[int, int]]) -> list[Tensor]:
        """The proposals regressed by each one's ``classes`` deltas, clipped to the image (no gradient)."""
        pred = deltas.detach().reshape(len(classes), -1, 4)[torch.arange(len(classes)), classes]
        boxes = self.box_coder.decode_single(pred, torch.cat(proposals))
        return [_clip(b, s) for b, s in zip(boxes.split([len(p) for p in proposals]), image_shapes)]

    def forward(self, features, proposals, image_shapes, targets=None):
        return cascade_forward([self], (1.0,), features, proposals, image_shapes, targets, prefix=False)


def cascade_forward(stages: Sequence[RoIStage], loss_weights: Sequence[float], features: "OrderedDict[str, Tensor]",
                    proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                    targets: list[dict[str, Tensor]] | None = None, *, prefix: bool = True
                    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """mmdet ``CascadeRoIHead.forward_train`` / ``simple_test`` over ``stages`` (see the module docstring);
    torchvision's ``RoIHeads`` call: ``(detections, losses)``. Loss keys ``s<k>.loss_*`` (``prefix``) or
    ``loss_classifier`` / ``loss_box_reg`` / ``loss_mask`` (one stage, as torchvision's)."""
    training = stages[0].training
    losses: dict[str, Tensor] = {}
    logits_per_stage: list[Tensor] = []
    for k, stage in enumerate(stages):
        name = f"s{k}." if prefix else ""
        if training:
            proposals, matched, labels, reg_targets = stage.select_training_samples(proposals, targets)
        logits, deltas = stage.predict_boxes(features, proposals, image_shapes)
        if training:
            gt = [t["boxes"][m.clamp(min=0)] if len(t["boxes"]) else p for t, m, p in zip(targets, matched, proposals)]
            cls_loss, box_loss = stage.losses(logits, deltas, proposals, labels, reg_targets, gt)
            losses[f"{name}loss_classifier"] = cls_loss * loss_weights[k]
            losses[f"{name}loss_box_reg"] = box_loss * loss_weights[k]
            if stage.has_mask():
                losses[f"{name}loss_mask"] = _mask_loss(stage, features, proposals, image_shapes, targets, labels,
                                                        matched) * loss_weights[k]
        else:
            logits_per_stage.append(logits)
        if k < len(stages) - 1:  # refine: the next stage pools from this stage's boxes
            predicted = logits.detach()[:, 1:].argmax(1) + 1
            classes = torch.where(torch.cat(labels) > 0, torch.cat(labels), predicted) if training else predicted
            refined = stage.refine(deltas, proposals, classes, image_shapes)
            if training:  # mmdet drops the ground-truth boxes that sampling appended
                refined = [r[~_is_gt(p, t["boxes"])] for r, p, t in zip(refined, proposals, targets)]
            proposals = refined
    if training:
        return [], losses
    last = stages[-1]
    mean_logits = torch.stack(logits_per_stage).mean(0)  # mmdet: cls_score = sum(ms_scores) / num_stages
    boxes, scores, classes = last.postprocess_detections(mean_logits, deltas, proposals, image_shapes)
    result = [{"boxes": b, "labels": c, "scores": s} for b, s, c in zip(boxes, scores, classes)]
    if last.has_mask():
        probs = merge_mask_probs([s.predict_masks(features, boxes, image_shapes) for s in stages if s.has_mask()])
        labels = torch.cat(classes)
        probs = probs[torch.arange(len(labels), device=labels.device), labels][:, None]
        for r, p in zip(result, probs.split([len(b) for b in boxes])):
            r["masks"] = p
    return result, losses


def merge_mask_probs(mask_logits: Sequence[Tensor]) -> Tensor:
    """mmdet ``merge_aug_masks``: the mean of the stages' mask probabilities (sigmoid of each head's logits)."""
    return torch.stack([m.sigmoid() for m in mask_logits]).mean(0)


def _is_gt(proposals: Tensor, gt_boxes: Tensor) -> Tensor:
    """Which of a stage's sampled proposals are ground-truth boxes appended by sampling (exact copies)."""
    if not len(gt_boxes):
        return torch.zeros(len(proposals), dtype=torch.bool, device=proposals.device)
    return (proposals[:, None, :] == gt_boxes[None]).all(-1).any(1)


def _mask_loss(stage: RoIStage, features, proposals, image_shapes, targets, labels, matched) -> Tensor:
    pos = [torch.where(lab > 0)[0] for lab in labels]
    mask_props = [p[i] for p, i in zip(proposals, pos)]
    return maskrcnn_loss(stage.predict_masks(features, mask_props, image_shapes), mask_props,
                         [t["masks"] for t in targets], [t["labels"] for t in targets],
                         [m[i] for m, i in zip(matched, pos)])


class CascadeRoIHeads(nn.Module):
    """Three (or more) chained :class:`RoIStage` s, each with its box and mask head; same call as torchvision's
    RoIHeads: ``forward(features, proposals, image_shapes, targets) -> (detections, losses)``."""

    def __init__(self, stages: Sequence[RoIStage], loss_weights: Sequence[float] = CASCADE_LOSS_WEIGHTS) -> None:
        super().__init__()
        if len(loss_weights) != len(stages):
            raise ValueError(f"one loss weight per stage: {len(stages)} stages, {len(loss_weights)} weights")
        self.stages = nn.ModuleList(stages)
        self.loss_weights = tuple(loss_weights)

    def forward(self, features: "OrderedDict[str, Tensor]", proposals: list[Tensor],
                image_shapes: list[tuple[int, int]], targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        return cascade_forward(list(self.stages), self.loss_weights, features, proposals, image_shapes, targets)


class TrainAsGivenTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform that resizes only at test time: training images arrive already
    augmented to their training size (large-scale jitter canvases, multi-scale resize and crop)."""

    def resize(self, image: Tensor, target=None):
        if self.training:
            return image, target
        return super().resize(image, target)


def _box_head(channels: int, kind: str = "4conv1fc", norm: str = "gn", fc: int = 1024) -> nn.Module:
    if kind == "2fc":
        return TwoMLPHead(channels * 7 * 7, fc)
    return FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [fc], norm_layer=NORM_LAYERS[norm])


def _choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}")
    return value


def build_detector(kind: str, backbone: nn.Module, num_classes: int, *, img_size: int,
                   anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512), box_fc: int = 1024,
                   detections_per_img: int = 100, score_thresh: float = 0.05, rois_per_image: int = 512,
                   proposals_per_image: int = 2000, test_size: Sequence[int] | None = None,
                   roi_align_aligned: bool = True, rpn_smooth_l1_beta: float = 0.0, box_loss: BoxLoss = BoxLoss(),
                   class_agnostic: bool = True, box_head: str = "4conv1fc", box_head_norm: str = "gn",
                   mask_head_norm: str = "gn", train_as_given: bool = True,
                   pad_to_square: bool = True) -> MaskRCNN:
    """Mask R-CNN or Cascade Mask R-CNN (``kind`` in ``DETECTORS``) over ``backbone``.

    Args:
        kind: ``mask_rcnn`` or ``cascade_mask_rcnn``.
        backbone: images -> ``OrderedDict`` ``'0'``..``'3'``, ``'pool'`` (strides 4..64), with ``out_channels``.
        num_classes: object classes, without the background (torchvision's count is this + 1).
        img_size: test images are resized so that their longer side is this (ViTDet 1024), unless ``test_size``.
        anchor_sizes: one anchor size per level (strides 4..64), three aspect ratios each.
        box_fc: width of the box head's fully connected layer(s).
        detections_per_img: detections kept per image (COCO: 100).
        score_thresh: detections below this score are dropped.
        rois_per_image: RoIs sampled per image and stage to train the box heads (mmdet / detectron2: 512).
        proposals_per_image: RPN proposals kept after NMS in training (2000) and testing (1000 = half).
        test_size: (shorter, longer) side of test images (mmdet's ``img_scale=(1333, 800)``: (800, 1333)).
        roi_align_aligned: aligned RoIAlign (mmcv / detectron2); False: torchvision's ``MultiScaleRoIAlign``.
        rpn_smooth_l1_beta: the RPN's box loss (0 = L1).
        box_loss: the RoI heads' box loss (:class:`BoxLoss`).
        class_agnostic: the cascade stages regress one box per RoI (Mask R-CNN is always class-specific).
        box_head: ``4conv1fc`` (ViTDet, dBOT) or ``2fc`` (mmdet ``Shared2FCBBoxHead``).
        train_as_given: training images pass unresized (:class:`TrainAsGivenTransform`); False: torchvision's
            transform resizes them too (a no-op on ``img_size`` canvases, but it draws from torch's generator).
        box_head_norm, mask_head_norm: ``gn`` (GroupNorm 32), ``ln`` (LayerNorm over channels, ViTDet), ``bn``
            (box head only; SyncBN when converted), ``none``.
        pad_to_square: pad every test batch to img_size x img_size, the training grid of LSJ training (ViTDet's
            test-time square pad, models/det_transform.py); False: torchvision's padding to a multiple of 32 (the
            multi-scale recipes, whose images are not square).

    Returns:
        torchvision's ``MaskRCNN``; in train mode ``model(images, targets)`` returns a loss dict, in eval mode a
        list of ``{'boxes' [N, 4] xyxy, 'labels' [N], 'scores' [N], 'masks' [N, 1, H, W]}`` at the input size.
    """
    _choice("detector", kind, DETECTORS)
    _choice("box head", box_head, BOX_HEADS)
    _choice("box head norm", box_head_norm, HEAD_NORMS)
    _choice("mask head norm", mask_head_norm, MASK_HEAD_NORMS)
    if len(anchor_sizes) != 5:
        raise ValueError(f"anchor_sizes needs one size per level (strides 4, 8, 16, 32, 64), got {anchor_sizes}")
    c, k = backbone.out_channels, num_classes + 1
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    pool = AlignedMultiScaleRoIAlign if roi_align_aligned else MultiScaleRoIAlign
    box_pool = pool(["0", "1", "2", "3"], output_size=7, sampling_ratio=0)
    mask_pool = pool(["0", "1", "2", "3"], output_size=14, sampling_ratio=0)
    model = MaskRCNN(backbone, num_classes=None, min_size=img_size, max_size=img_size, image_mean=IMAGENET_MEAN,
                     image_std=IMAGENET_STD, rpn_anchor_generator=anchors,
                     rpn_head=RPNHead(c, anchors.num_anchors_per_location()[0], conv_depth=2),
                     box_roi_pool=box_pool, box_head=nn.Identity(), box_predictor=nn.Identity(),
                     mask_roi_pool=mask_pool, mask_head=nn.Identity(), mask_predictor=nn.Identity())
    shorter, longer = test_size if test_size else (img_size, img_size)
    transform = TrainAsGivenTransform if train_as_given else GeneralizedRCNNTransform
    if pad_to_square:
        if longer > img_size:
            raise ValueError(f"test images of up to {shorter} x {longer} cannot be padded to the {img_size} square "
                             "of training: pad_to_square is for LSJ training on img_size canvases")
        model.transform = square_padded(transform)(shorter, longer, IMAGENET_MEAN, IMAGENET_STD, square=img_size)
    else:
        model.transform = transform(shorter, longer, IMAGENET_MEAN, IMAGENET_STD)
    rpn = model.rpn
    model.rpn = SmoothL1RPN(anchors, rpn.head, 0.7, 0.3, 256, 0.5,
                            dict(training=proposals_per_image, testing=proposals_per_image // 2),
                            dict(training=proposals_per_image, testing=proposals_per_image // 2), 0.7,
                            beta=rpn_smooth_l1_beta)

    def stage(iou: float, weights, with_class_agnostic: bool) -> RoIStage:
        # built in the order torchvision's MaskRCNN arguments were: the same initialisation for the same seed
        head = _box_head(c, box_head, box_head_norm, box_fc)
        predictor = (ClassAgnosticPredictor if with_class_agnostic else FastRCNNPredictor)(box_fc, k)
        mask_head = MaskRCNNHeads(c, [c] * 4, 1, norm_layer=NORM_LAYERS[mask_head_norm])
        return RoIStage(box_pool, head, predictor, fg_iou_thresh=iou,
                        bg_iou_thresh=iou, batch_size_per_image=rois_per_image, positive_fraction=0.25,
                        bbox_reg_weights=weights, score_thresh=score_thresh, nms_thresh=0.5,
                        detections_per_img=detections_per_img, mask_roi_pool=mask_pool, mask_head=mask_head,
                        mask_predictor=MaskRCNNPredictor(c, c, k), box_loss=box_loss)

    if kind == "mask_rcnn":
        model.roi_heads = stage(0.5, None, False)
    else:
        model.roi_heads = CascadeRoIHeads([stage(iou, w, class_agnostic)
                                           for iou, w in zip(CASCADE_IOUS, CASCADE_WEIGHTS)])
    return model


def detector_layer_id(name: str, backbone: nn.Module) -> int | None:
    """Layer id of a detector parameter for layer-wise lr decay: the backbone's ``layer_id`` for ``backbone.*``
    names (its ViT layers), None (scale 1, like a classifier head) for the RPN and RoI heads."""
    if name.startswith("backbone."):
        return backbone.layer_id(name[len("backbone."):])
    return None
