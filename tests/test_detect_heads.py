"""Detection heads against hand computations: Cascade Mask R-CNN's test-time ensemble and per-stage mask heads
(mmdet ``CascadeRoIHead``), aligned RoIAlign (mmcv / detectron2), the box and RPN losses of the reference configs,
and DETR's multi-scale augmentation (mmdet ``Resize`` / ``RandomCrop`` as ViT-Adapter's and dBOT's configs use)."""
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.detectors import (AlignedMultiScaleRoIAlign, BoxLoss, CascadeRoIHeads, RoIStage, SmoothL1RPN,
                              build_detector, merge_mask_probs)
from util.data.det_transforms import SHORT_SIDES, detr_multiscale_crop, keep_ratio_size
from torchvision.ops import MultiScaleRoIAlign


class TinyPyramid(nn.Module):
    out_channels = 16

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        out = OrderedDict((str(i), F.avg_pool2d(y, 4 * 2 ** i)) for i in range(4))
        out["pool"] = F.avg_pool2d(y, 64)
        return out


def _cascade(**kwargs):
    torch.manual_seed(0)
    return build_detector("cascade_mask_rcnn", TinyPyramid(), 3, img_size=128, box_fc=32, **kwargs)


def _constant_box_outputs(stage, logits):
    """The stage predicts ``logits`` for every RoI and no box change."""
    for layer in (stage.box_predictor.cls_score, stage.box_predictor.bbox_pred):
        layer.weight.data.zero_()
        layer.bias.data.zero_()
    stage.box_predictor.cls_score.bias.data.copy_(torch.tensor(logits))


def test_cascade_scores_are_the_softmax_of_the_stages_averaged_logits():
    model = _cascade().eval()
    stage_logits = [[0., 3., 0., -1.], [0., -2., 2., 0.], [0., 5., 0., 0.]]
    for stage, logits in zip(model.roi_heads.stages, stage_logits):
        _constant_box_outputs(stage, logits)
    feats = TinyPyramid()(torch.rand(1, 3, 128, 128))
    with torch.no_grad():
        (out,), _ = model.roi_heads(feats, [torch.tensor([[20., 20., 80., 90.]])], [(128, 128)])
    mean = [sum(col) / 3 for col in zip(*stage_logits)]  # [0, 2, 2/3, -1/3]
    expected = [math.exp(v) / sum(math.exp(u) for u in mean) for v in mean]
    scores = dict(zip(out["labels"].tolist(), out["scores"].tolist()))
    assert set(scores) == {1, 2, 3}  # one box, three classes above 0.05
    for label, score in scores.items():
        assert score == pytest.approx(expected[label], rel=1e-5)
    assert out["boxes"][0].tolist() == pytest.approx([20., 20., 80., 90.], abs=1e-4)


def test_cascade_masks_average_the_three_stages_sigmoids():
    model = _cascade().eval()
    for stage, logits in zip(model.roi_heads.stages, [[0., 3., 0., 0.]] * 3):
        _constant_box_outputs(stage, logits)  # every box is class 1
    mask_logits = [2.0, -1.0, 0.5]
    for stage, value in zip(model.roi_heads.stages, mask_logits):
        conv = stage.mask_predictor.mask_fcn_logits
        conv.weight.data.zero_()
        conv.bias.data.fill_(-9.0)
        conv.bias.data[1] = value
    feats = TinyPyramid()(torch.rand(1, 3, 128, 128))
    with torch.no_grad():
        (out,), _ = model.roi_heads(feats, [torch.tensor([[20., 20., 80., 90.]])], [(128, 128)])
    expected = sum(1 / (1 + math.exp(-v)) for v in mask_logits) / 3
    assert out["masks"].shape[1:] == (1, 28, 28) and (out["labels"] == 1).all()
    assert torch.allclose(out["masks"], torch.full_like(out["masks"], expected), atol=1e-6)
    assert torch.allclose(merge_mask_probs([torch.tensor(v) for v in mask_logits]), torch.tensor(expected))


def test_cascade_stage_losses_are_weighted_1_half_quarter_masks_included():
    model = _cascade()
    img = torch.rand(3, 128, 128)
    mask = torch.zeros(1, 128, 128, dtype=torch.uint8)
    mask[0, 20:90, 20:80] = 1
    target = [{"boxes": torch.tensor([[20., 20., 80., 90.]]), "labels": torch.tensor([2]), "masks": mask}]
    torch.manual_seed(1)
    weighted = model([img], target)
    model.roi_heads.loss_weights = (1.0, 1.0, 1.0)
    torch.manual_seed(1)
    plain = model([img], target)
    for k, w in enumerate((1.0, 0.5, 0.25)):
        for name in ("loss_classifier", "loss_box_reg", "loss_mask"):
            got, unweighted = float(weighted[f"s{k}.{name}"].detach()), float(plain[f"s{k}.{name}"].detach())
            assert got == pytest.approx(w * unweighted, rel=1e-5)
    assert float(plain["s2.loss_mask"]) > 0


def test_ground_truth_boxes_are_not_passed_to_the_next_stage():
    model = _cascade()
    mask = torch.zeros(1, 128, 128, dtype=torch.uint8)
    mask[0, 20:90, 20:80] = 1
    gt = torch.tensor([[20., 20., 80., 90.]])
    seen = []
    stage1 = model.roi_heads.stages[1]
    original = stage1.select_training_samples
    stage1.select_training_samples = lambda proposals, targets: (seen.append(proposals), original(proposals,
                                                                                                   targets))[1]
    model([torch.rand(3, 128, 128)], [{"boxes": gt, "labels": torch.tensor([2]), "masks": mask}])
    (proposals,) = seen[0]
    # stage 0 sampled its proposals plus the appended ground truth; the refined ground truth is dropped (mmdet)
    assert not (proposals == gt).all(1).any() and len(proposals) > 0


def test_class_specific_refinement_uses_each_rois_class():
    model = _cascade(class_agnostic=False)
    stage = model.roi_heads.stages[0]
    proposals = [torch.tensor([[10., 10., 50., 50.], [10., 10., 50., 50.]])]
    goals = {1: torch.tensor([20., 15., 60., 45.]), 2: torch.tensor([0., 5., 30., 40.])}
    deltas = torch.zeros(2, 4 * 4)
    for c, goal in goals.items():
        deltas[:, 4 * c:4 * c + 4] = stage.box_coder.encode_single(goal[None], proposals[0][:1])
    (refined,) = stage.refine(deltas, proposals, torch.tensor([2, 1]), [(128, 128)])
    assert torch.allclose(refined, torch.stack([goals[2], goals[1]]), atol=1e-4)


def test_aligned_roi_align_shifts_by_half_a_feature_pixel():
    """Features equal to their x coordinate: a bin's value is the x of its centre (bilinear is exact on a line)."""
    feats = OrderedDict((str(i), torch.arange(32 // 2 ** i).float().expand(1, 1, 32 // 2 ** i, 32 // 2 ** i))
                        for i in range(2))  # strides 4 and 8 of a 128 x 128 image
    small, large = torch.tensor([[16., 16., 32., 32.]]), torch.tensor([[8., 8., 120., 120.]])
    aligned = AlignedMultiScaleRoIAlign(["0", "1"], output_size=2, sampling_ratio=0)
    legacy = MultiScaleRoIAlign(["0", "1"], output_size=2, sampling_ratio=0)
    # the 16-px box pools from stride 4 (torchvision's level mapper): x from 16/4 - 0.5 = 3.5 to 7.5, bins of 2
    # the 112-px box from stride 8: x from 8/8 - 0.5 = 0.5 to 14.5, bins of 7
    out = aligned(feats, [torch.cat([small, large])], [(128, 128)])
    assert out[0, 0, 0].tolist() == pytest.approx([4.5, 6.5], abs=1e-5)
    assert out[1, 0, 0].tolist() == pytest.approx([4.0, 11.0], abs=1e-5)
    old = legacy(feats, [torch.cat([small, large])], [(128, 128)])  # no offset: half a pixel to the right
    assert old[0, 0, 0].tolist() == pytest.approx([5.0, 7.0], abs=1e-5)
    assert old[1, 0, 0].tolist() == pytest.approx([4.5, 11.5], abs=1e-5)


def _stage(box_loss):
    return _cascade(box_loss=box_loss, class_agnostic=False).roi_heads.stages[0]


def test_box_losses_by_hand():
    proposals = [torch.tensor([[0., 0., 10., 10.], [30., 30., 40., 40.]])]
    labels, gt = [torch.tensor([1, 0])], [torch.tensor([[5., 0., 15., 10.], [0., 0., 1., 1.]])]
    logits = torch.zeros(2, 4)
    deltas = torch.zeros(2, 16)
    deltas[0, 4:8] = torch.tensor([0.1, -0.2, 0.3, 0.0])
    targets = [torch.tensor([[0.5, 0.0, 0.0, 0.0], [9., 9., 9., 9.]])]
    # L1 (beta 0) over the positive RoI's class-1 deltas, divided by both sampled RoIs
    cls, box = _stage(BoxLoss("smooth_l1", 0.0)).losses(logits, deltas, proposals, labels, targets, gt)
    assert float(box) == pytest.approx((0.4 + 0.2 + 0.3 + 0.0) / 2)
    assert float(cls) == pytest.approx(math.log(4))
    # GIoU x 10 of the decoded box: deltas 0 leave [0, 0, 10, 10]; with [5, 0, 15, 10]: IoU 50 / 150, the hull
    # is the union, so GIoU = 1/3 and the loss 10 (1 - 1/3) / 2
    deltas[0, 4:8] = 0
    _, box = _stage(BoxLoss("giou", weight=10.0)).losses(logits, deltas, proposals, labels, targets, gt)
    assert float(box) == pytest.approx(10 * (2 / 3) / 2, rel=1e-5)


def test_rpn_box_loss_is_l1_at_beta_0():
    model = _cascade(rpn_smooth_l1_beta=0.0)
    assert isinstance(model.rpn, SmoothL1RPN) and model.rpn.beta == 0.0
    torch.manual_seed(0)
    labels = [torch.tensor([1., 0., 1.])]
    targets = [torch.tensor([[0.5, 0., 0., 0.], [0., 0., 0., 0.], [0., 0.05, 0., 0.]])]
    pred = torch.zeros(3, 4)
    _, box = model.rpn.compute_loss(torch.zeros(3, 1), pred, labels, targets)
    assert float(box) == pytest.approx((0.5 + 0.05) / 3)  # torchvision's beta 1/9 gives (0.5 - 1/18 + 0.05^2 * 4.5) / 3


def test_mask_rcnn_keeps_torchvisions_state_dict_names():
    model = build_detector("mask_rcnn", TinyPyramid(), 3, img_size=128, box_fc=32)
    names = {n.split(".")[1] for n in model.state_dict() if n.startswith("roi_heads.")}
    assert names == {"box_head", "box_predictor", "mask_head", "mask_predictor"}
    assert isinstance(model.roi_heads, RoIStage) and not isinstance(model.roi_heads, CascadeRoIHeads)


def test_keep_ratio_size_is_mmcvs_rescale_size():
    assert keep_ratio_size(480, 640, 800) == (800, 1067)  # shorter side 800
    assert keep_ratio_size(500, 2000, 800) == (333, 1333)  # longer side capped at 1333
    assert keep_ratio_size(640, 480, 480) == (640, 480)


def test_detr_multiscale_crop_keeps_image_boxes_and_masks_together():
    h, w = 60, 80
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    img = torch.stack([ys / h, xs / w, torch.zeros(h, w)])
    mask = torch.zeros(1, h, w, dtype=torch.uint8)
    mask[0, 10:40, 20:50] = 1
    target = {"boxes": torch.tensor([[20., 10., 50., 40.]]), "labels": torch.tensor([1]), "masks": mask,
              "image_id": 1, "orig_size": (h, w), "scale": 1.0}
    torch.manual_seed(0)
    shapes = set()
    for _ in range(12):
        out, t = detr_multiscale_crop(img, target, crop=700)
        oh, ow = out.shape[1:]
        shapes.add((oh, ow))
        assert oh <= 700 and ow <= 700 and t["masks"].shape[1:] == (oh, ow)
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
        if len(t["boxes"]):  # the box is the mask's box (two nearest resizes, x1.3-2 the second: within 3 px)
            rows, cols = torch.nonzero(t["masks"][0], as_tuple=True)
            tight = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]).float()
            assert (t["boxes"][0] - tight).abs().max() <= 3.0
        # every pixel holds the source row it came from (bilinear vs nearest: within one source pixel)
        src_rows = out[0] * h
        assert src_rows.min() >= -0.5 and src_rows.max() <= h
    uncropped = [s for s in shapes if max(s) < 700]
    assert all(min(s) in SHORT_SIDES for s in uncropped) and len(shapes) > 3


def test_layernorm_heads_normalise_over_channels():
    model = build_detector("mask_rcnn", TinyPyramid(), 3, img_size=128, box_fc=32, box_head_norm="ln",
                           mask_head_norm="ln")
    x = torch.randn(2, 16, 7, 7) * 5 + 3
    norm = model.roi_heads.box_head[0][1]  # conv, norm, relu
    y = norm(x)
    assert torch.allclose(y.mean(1), torch.zeros(2, 7, 7), atol=1e-5)
    assert torch.allclose(y.var(1, unbiased=False), torch.ones(2, 7, 7), atol=1e-3)
    assert type(model.roi_heads.mask_head[0][1]) is type(norm)
