"""Detection: detectors (Mask R-CNN, Cascade), COCO-layout data with large-scale jitter, evaluation path and the
entry script end to end on synthetic scenes (tiny ViT, CPU)."""
import json
from collections import OrderedDict
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("faster_coco_eval")

import main_detect  # noqa: E402
from engine.detect import evaluate_detection  # noqa: E402
from models.detectors import CASCADE_IOUS, CASCADE_WEIGHTS, CascadeRoIHeads, build_detector  # noqa: E402
from util.args import parse_args  # noqa: E402
from detect_runs import untrained_and_trained  # noqa: E402
from util.data.coco import CocoInstances, collate_detection, large_scale_jitter  # noqa: E402
from util.data.scenes import write_coco  # noqa: E402


class TinyPyramid(nn.Module):
    """Stand-in backbone: one conv, average-pooled to strides 4..64."""
    out_channels = 32

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        out = OrderedDict((str(i), F.avg_pool2d(y, 4 * 2 ** i)) for i in range(4))
        out["pool"] = F.avg_pool2d(y, 64)
        return out


def _targets(size=128):
    mask = torch.zeros(1, size, size, dtype=torch.uint8)
    mask[0, 10:40, 20:60] = 1
    return [{"boxes": torch.tensor([[20., 10., 60., 40.]]), "labels": torch.tensor([2]), "masks": mask},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, size, size, dtype=torch.uint8)}]  # an image without objects


@pytest.mark.parametrize("kind", ["mask_rcnn", "cascade_mask_rcnn"])
def test_detectors_train_and_predict(kind):
    torch.manual_seed(0)
    model = build_detector(kind, TinyPyramid(), 3, img_size=128, anchor_sizes=(8, 16, 32, 64, 128), box_fc=64,
                           rois_per_image=64, proposals_per_image=100)
    losses = model([torch.rand(3, 128, 128) for _ in range(2)], _targets())
    stages = [""] if kind == "mask_rcnn" else ["s0.", "s1.", "s2."]
    expected = {"loss_objectness", "loss_rpn_box_reg"} | {
        f"{s}{name}" for s in stages for name in ("loss_classifier", "loss_box_reg", "loss_mask")}
    assert set(losses) == expected
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 100, 80)])  # any size: resized to 128 on the longer side and back
    assert out["masks"].shape[1:] == (1, 100, 80) and out["boxes"].shape[1] == 4
    assert (out["boxes"][:, 2] <= 80).all() and (out["boxes"][:, 3] <= 100).all()
    assert ((out["labels"] >= 1) & (out["labels"] <= 3)).all()


def test_cascade_stages_have_their_ious_and_regression_weights():
    model = build_detector("cascade_mask_rcnn", TinyPyramid(), 3, img_size=128)
    heads = model.roi_heads
    assert isinstance(heads, CascadeRoIHeads) and len(heads.stages) == 3
    for stage, iou, weights in zip(heads.stages, CASCADE_IOUS, CASCADE_WEIGHTS):
        assert stage.proposal_matcher.high_threshold == iou == stage.proposal_matcher.low_threshold
        assert tuple(stage.box_coder.weights) == weights
    assert [s.has_mask() for s in heads.stages] == [True, True, True]  # mmdet: a mask head per stage
    # the stages have their own box and mask heads (not shared weights)
    ids = {id(getattr(s, name)) for s in heads.stages
           for name in ("box_head", "box_predictor", "mask_head", "mask_predictor")}
    assert len(ids) == 12


def test_cascade_refines_boxes_between_stages():
    """A stage whose regression is the exact delta to a known box hands that box to the next stage."""
    torch.manual_seed(0)
    model = build_detector("cascade_mask_rcnn", TinyPyramid(), 3, img_size=128).eval()
    stage0 = model.roi_heads.stages[0]
    proposals = [torch.tensor([[10., 10., 50., 50.]])]
    goal = torch.tensor([[20., 15., 60., 45.]])
    delta = stage0.box_coder.encode_single(goal, proposals[0])  # [1, 4]
    stage0.box_predictor.bbox_pred.weight.data.zero_()
    stage0.box_predictor.bbox_pred.bias.data.copy_(delta[0])
    seen = []
    stage1 = model.roi_heads.stages[1]
    stage1.box_roi_pool.register_forward_pre_hook(lambda mod, args: seen.append([b.clone() for b in args[1]]))
    feats = TinyPyramid()(torch.rand(1, 3, 128, 128))
    with torch.no_grad():
        model.roi_heads(feats, proposals, [(128, 128)])
    # pool is shared by the stages: calls 0, 1, 2 (boxes), then the mask pool of the last stage
    assert torch.allclose(seen[1][0], goal, atol=1e-4)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, 12, 6, 64, seed=0)
    return root


def test_dataset_items_match_the_annotations(scenes):
    ds = CocoInstances(scenes, "val")
    gt = json.loads((scenes / "annotations" / "instances_val2017.json").read_text())
    img, target = ds[0]
    anns = [a for a in gt["annotations"] if a["image_id"] == ds.image_ids[0]]
    assert img.shape == (3, 64, 64) and 0 <= img.min() and img.max() <= 1
    assert len(target["boxes"]) == len(anns) and target["orig_size"] == (64, 64) and target["scale"] == 1.0
    for box, mask, label, ann in zip(target["boxes"], target["masks"], target["labels"], anns):
        x, y, w, h = ann["bbox"]
        assert box.tolist() == [x, y, x + w, y + h] and int(label) == ds.label_of[ann["category_id"]]
        rows, cols = torch.nonzero(mask, as_tuple=True)  # the decoded mask is tight in its box
        assert [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1] == [x, y, x + w, y + h]
        assert int(mask.sum()) == ann["area"]


def _copy_layout(src, dst, edit):
    import shutil
    shutil.copytree(src, dst)
    path = dst / "annotations" / "instances_val2017.json"
    gt = json.loads(path.read_text())
    edit(gt, dst)
    path.write_text(json.dumps(gt))
    return dst


def test_an_image_without_annotations(scenes, tmp_path):
    def drop_first(gt, _):
        gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != gt["images"][0]["id"]]
    root = _copy_layout(scenes, tmp_path / "c", drop_first)
    val = CocoInstances(root, "val")
    assert len(val) == 6 and len(val[0][1]["boxes"]) == 0 and val[0][1]["masks"].shape == (0, 64, 64)
    assert len(CocoInstances(root, "val", train=True)) == 5  # training skips it (detectron2 / mmdet)


@pytest.mark.parametrize("edit, message", [
    (lambda gt, root: (root / "val2017" / gt["images"][1]["file_name"]).unlink(), "1 of 6 listed images are not"),
    (lambda gt, root: gt["annotations"][0].update(image_id=999), "refers to image 999"),
    (lambda gt, root: gt["annotations"][0].update(category_id=42), "has category 42"),
    (lambda gt, root: gt["images"][0].update(width=65), "annotations and images do not match"),
])
def test_an_annotation_file_that_does_not_match_the_images(scenes, tmp_path, edit, message):
    root = _copy_layout(scenes, tmp_path / "c", edit)
    with pytest.raises(ValueError, match=message):
        CocoInstances(root, "val")[0]
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        CocoInstances(tmp_path / "nothing", "train")


def _item(size=40):
    img = torch.rand(3, size, size * 2)
    mask = torch.zeros(1, size, size * 2, dtype=torch.uint8)
    mask[0, 10:20, 2:12] = 1
    return img, {"boxes": torch.tensor([[2., 10., 12., 20.]]), "labels": torch.tensor([1]), "masks": mask,
                 "image_id": 1, "orig_size": (size, size * 2), "scale": 1.0}


def test_large_scale_jitter_by_hand():
    img, target = _item()  # 40 x 80
    # factor 1: the longer side fits 80 -> scale 1; no crop; no flip; pad the lower half with grey
    out, t = large_scale_jitter(img, target, size=80, scale_range=(1.0, 1.0), flip_prob=0.0)
    assert out.shape == (3, 80, 80) and t["scale"] == 1.0
    assert torch.allclose(out[:, :40], img, atol=1e-6) and torch.allclose(out[:, 40:], torch.tensor(128 / 255))
    assert t["boxes"].tolist() == [[2., 10., 12., 20.]] and t["masks"].shape == (1, 80, 80)
    # factor 0.5 and a flip: everything halves, then mirrors in the 40-wide image
    out, t = large_scale_jitter(img, target, size=80, scale_range=(0.5, 0.5), flip_prob=1.0)
    assert t["scale"] == 0.5 and t["boxes"].tolist() == [[40 - 6., 5., 40 - 1., 10.]]
    rows, cols = torch.nonzero(t["masks"][0], as_tuple=True)
    assert [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1] == [34, 5, 39, 10]
    # factor 2: 80 x 160 cropped to 80 x 80; an object outside the window is dropped, boxes stay in the canvas
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        out, t = large_scale_jitter(img, target, size=80, scale_range=(2.0, 2.0), flip_prob=0.0)
        assert out.shape == (3, 80, 80) and (t["boxes"] >= 0).all() and (t["boxes"] <= 80).all()
        assert len(t["boxes"]) == len(t["masks"]) == len(t["labels"])
        seen.add(len(t["boxes"]))
    assert seen == {0, 1}  # some windows hold the object, some do not


class Oracle(nn.Module):
    """Returns the ground truth of each image (by image size) as detections: AP must be 100."""

    def __init__(self, dataset):
        super().__init__()
        self.truth = {}
        for i in range(len(dataset)):
            img, t = dataset[i]
            self.truth[float(img.sum())] = t

    def forward(self, images):
        outs = []
        for img in images:
            t = self.truth[float(img.sum())]
            n = len(t["boxes"])
            outs.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.linspace(1, 0.5, n),
                         "masks": t["masks"][:, None].float()})
        return outs


def test_evaluation_path_gives_100_for_the_truth_and_0_for_nothing(scenes):
    ds = CocoInstances(scenes, "val")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_detection)
    evaluate = partial(evaluate_detection, loader=loader, device=torch.device("cpu"), gt=ds.gt,
                       category_ids=ds.category_ids, image_ids=ds.image_ids)
    perfect = evaluate(Oracle(ds))
    assert perfect["bbox_AP"] == pytest.approx(100) and perfect["segm_AP"] == pytest.approx(100)

    class Blind(nn.Module):
        def forward(self, images):
            return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
                     "masks": torch.zeros(0, 1, *img.shape[1:])} for img in images]
    nothing = evaluate(Blind())
    assert nothing["bbox_AP"] == 0.0 and nothing["segm_AP"] == 0.0 and nothing["num_detections"] == 0


def _argv(out, *extra):
    return ["--config", "configs/detect/demo.yaml", "--output_dir", str(out), "--input_size", "64",
            "--scene_images", "8", "4", "--epochs", "1", "--batch_size", "2", "--rois_per_image", "32",
            "--proposals_per_image", "100", "--anchor_sizes", "4", "8", "16", "32", "64", *extra]


def test_layer_decay_groups_cover_every_parameter_once(tmp_path):
    args = parse_args(main_detect.build_parser(), _argv(tmp_path))
    model = main_detect.build_model(args, 5, finetune=None)
    from models.detectors import detector_layer_id
    from util.param_groups import param_groups
    depth = model.backbone.depth
    groups = param_groups(model, weight_decay=0.05, unit_of=partial(detector_layer_id, backbone=model.backbone),
                          layer_decay=0.75, num_layers=depth + 1)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale["backbone.vit.patch_embed.proj.weight"] == pytest.approx(0.75 ** (depth + 1))
    assert scale[f"backbone.vit.blocks.{depth - 1}.mlp.fc1.weight"] == pytest.approx(0.75)
    assert scale["rpn.head.cls_logits.weight"] == 1.0 and scale["roi_heads.box_predictor.cls_score.weight"] == 1.0


def test_main_detect_end_to_end_eval_and_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(main_detect.Path(main_detect.__file__).parent)
    out = tmp_path / "run"
    result = main_detect.main(_argv(out, "--vis_every", "1"))
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(lines) == 1 and {"val_bbox_AP", "val_segm_AP", "val_bbox_AP50", "train_loss_mask"} <= set(lines[0])
    assert (out / "detections_000.png").exists() and (out / "checkpoint-last.pth").exists()
    evaluated = main_detect.main(_argv(out, "--eval", "--resume", str(out / "checkpoint-last.pth")))
    assert evaluated["bbox_AP"] == pytest.approx(result["bbox_AP"]) and evaluated["segm_AP"] == \
        pytest.approx(result["segm_AP"])
    main_detect.main(_argv(out, "--epochs", "2", "--auto_resume", "--eval_every", "2"))
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]  # resumed after epoch 0


def test_a_pretrained_backbone_loads(tmp_path):
    """A classification ViT checkpoint (timm keys) fills the pyramid's encoder; position grid resampled."""
    import models
    vit = models.create_model("vit_tiny_patch16", img_size=32, num_classes=10)
    torch.save({"model": vit.state_dict()}, tmp_path / "vit.pth")
    args = parse_args(main_detect.build_parser(), _argv(tmp_path))
    model = main_detect.build_model(args, 5, finetune=str(tmp_path / "vit.pth"))
    assert torch.equal(model.backbone.vit.blocks[3].attn.qkv.weight, vit.blocks[3].attn.qkv.weight)
    assert model.backbone.vit.pos_embed.shape[1] == 1 + (64 // 16) ** 2


@pytest.mark.slow
def test_short_training_beats_the_untrained_model(tmp_path, monkeypatch):
    """Mask R-CNN on a tiny ViT from scratch, 140 updates on 40 synthetic 128-px scenes (one class, one object):
    box and mask AP end clearly above the untrained model's (0). About 60 s on a shared 2-core CPU; the run is
    deterministic (AP 9.5 box, 11.1 mask here), the thresholds leave room for other CPUs' float rounding."""
    monkeypatch.chdir(main_detect.Path(main_detect.__file__).parent)
    untrained, trained = untrained_and_trained(tmp_path, [
        "--config", "configs/detect/demo.yaml", "--epochs", "7", "--lr", "1e-3", "--lr_steps", "5",
        "--warmup_iters", "10", "--batch_size", "2", "--rois_per_image", "64", "--eval_every", "7", "--vis_every", "0"])
    assert untrained["bbox_AP"] < 1 and untrained["segm_AP"] < 1
    assert trained["bbox_AP"] > untrained["bbox_AP"] + 4 and trained["segm_AP"] > untrained["segm_AP"] + 4
    assert trained["bbox_AP50"] > 10


def test_cascade_through_the_entry_script(tmp_path, monkeypatch):
    monkeypatch.chdir(main_detect.Path(main_detect.__file__).parent)
    out = tmp_path / "run"
    result = main_detect.main(_argv(out, "--detector", "cascade_mask_rcnn"))
    (line,) = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert {"train_s0.loss_box_reg", "train_s2.loss_classifier", "train_s0.loss_mask",
            "train_s2.loss_mask"} <= set(line)  # a mask head per stage
    assert {k: line[f"val_{k}"] for k in ("bbox_AP", "segm_AP", "num_detections")} == \
        {k: result[k] for k in ("bbox_AP", "segm_AP", "num_detections")}
    # what was trained and saved is the cascade: three stages, each with its own box and mask heads
    from util.checkpoint import load_checkpoint
    state = load_checkpoint(out / "checkpoint-last.pth")["model"]
    assert {int(k.split(".")[2]) for k in state if k.startswith("roi_heads.stages.")} == {0, 1, 2}
    assert all(any(k.startswith(f"roi_heads.stages.{i}.mask_") for k in state) for i in range(3))


@pytest.mark.parametrize("h, w, nh, nw", [(37, 53, 91, 13), (480, 640, 1536, 2048), (100, 80, 33, 27)])
def test_jitter_resizes_masks_like_nearest_interpolation(h, w, nh, nw):
    """The jitter gathers only the crop window's mask pixels; the full nearest resize is the reference."""
    from util.data.coco import _nearest_rows
    masks = (torch.rand(2, h, w, generator=torch.Generator().manual_seed(0)) > 0.5).to(torch.uint8)
    reference = F.interpolate(masks[None].float(), size=(nh, nw), mode="nearest")[0].to(torch.uint8)
    assert torch.equal(masks[:, _nearest_rows(0, nh, h, nh)][:, :, _nearest_rows(0, nw, w, nw)], reference)
    assert torch.equal(masks[:, _nearest_rows(5, 7, h, nh)][:, :, _nearest_rows(3, 4, w, nw)], reference[:, 5:12, 3:7])


def test_two_process_evaluation_equals_one_process(tmp_path, monkeypatch):
    """--eval of one checkpoint on 2 gloo processes (uneven shards: 5 images) gives the 1-process numbers."""
    from spawn_ranks import main_of, spawn
    monkeypatch.chdir(main_detect.Path(main_detect.__file__).parent)
    out = tmp_path / "run"
    argv = _argv(out, "--scene_images", "8", "5", "--device", "cpu")
    main_detect.main(argv)
    ckpt = str(out / "checkpoint-last.pth")
    single = main_detect.main(argv + ["--eval", "--resume", ckpt])
    (out / "results.json").unlink()
    spawn(main_of("main_detect", argv + ["--eval", "--resume", ckpt]), world=2)
    assert json.loads((out / "results.json").read_text()) == pytest.approx(single)
    assert single["num_detections"] > 0


def test_step_lr_is_mmdets_step_policy():
    from util.lr_sched import step_lr
    lr = partial(step_lr, base_lr=1e-4, milestones=[80, 110], warmup_steps=10)
    assert lr(0) == pytest.approx(1e-7)  # warmup_ratio 0.001
    assert lr(5) == pytest.approx(1e-4 * (0.001 + 0.999 * 0.5))
    assert [lr(s) for s in (10, 79, 80, 109, 110, 200)] == pytest.approx([1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6])
