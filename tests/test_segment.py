"""Semantic segmentation: metrics, ADE20K data and pipeline, UperNet, sliding window, poly lr, layer decay, and
short CPU runs of main_segment.py on the synthetic scenes."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import main_segment
from engine.segment import evaluate_segmentation, slide_inference, window_starts
from models.pyramid import ViTFeaturePyramid
from models.seg_heads import UperNetSegmentor
from util.data.ade20k import (ADE20KDataset, SegEvalTransform, SegTrainTransform, collate_eval, random_crop_box,
                              rescale_size)
from util.data.loaders import build_train_loader, set_loader_epoch
from util.data.scenes import write_ade20k
from util.lr_sched import poly_lr
from engine.metrics import segmentation_confusion, segmentation_metrics
from util.args import parse_args
from util.param_groups import param_groups

NAN = float("nan")


# ---- metrics -----------------------------------------------------------------------------------------------------

def test_miou_from_a_hand_made_confusion_matrix():
    cm = torch.tensor([[3, 1, 0, 0],   # rows: truth, columns: prediction
                       [1, 2, 1, 0],
                       [0, 0, 0, 0],   # class 2: never in the labels, predicted once -> IoU 0, Acc undefined
                       [0, 0, 0, 0]])  # class 3: nowhere -> IoU and Acc undefined (left out of the means)
    m = segmentation_metrics(cm)
    # class 0: TP 3, union 4 + 4 - 3 = 5; class 1: TP 2, union 4 + 3 - 2 = 5
    assert m["IoU"][:3] == pytest.approx([60.0, 40.0, 0.0]) and math.isnan(m["IoU"][3])
    assert m["Acc"][:2] == pytest.approx([75.0, 50.0]) and math.isnan(m["Acc"][2]) and math.isnan(m["Acc"][3])
    assert m["mIoU"] == pytest.approx(100 / 3) and m["mAcc"] == pytest.approx(62.5)
    assert m["aAcc"] == pytest.approx(62.5)  # 5 of 8 labelled pixels


def test_pixel_confusion_ignores_255_and_matches_a_loop():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, (2, 9, 7))
    label[rng.random(label.shape) < 0.2] = 255
    pred = rng.integers(0, 4, label.shape)
    cm = segmentation_confusion(torch.from_numpy(pred), torch.from_numpy(label), 4)
    ref = np.zeros((4, 4), dtype=np.int64)
    for t, p in zip(label.ravel(), pred.ravel()):
        if t != 255:
            ref[t, p] += 1
    assert (cm.numpy() == ref).all()


def test_class_ids_beyond_nb_classes_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"class ids \[4, 7\] outside \[0, 4\)"):
        segmentation_confusion(torch.zeros(3), torch.tensor([4, 7, 255]), 4)
    write_ade20k(tmp_path, 2, 1, 32, seed=0)  # labels 0..5 (5 classes + background)
    ds = ADE20KDataset(tmp_path, "train", None, num_classes=3)
    with pytest.raises(ValueError, match=r"scene_train_00000\d\.png: class ids \[.*\] are outside \[0, 3\)"):
        for i in range(len(ds)):
            ds[i]


# ---- data ----------------------------------------------------------------------------------------------------------

def _write_pair(root, split, name, image, label):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / split / f"{name}.jpg", quality=100)
    Image.fromarray(label, mode="L").save(root / "annotations" / split / f"{name}.png")


def test_reduce_zero_label_and_layout_errors(tmp_path):
    label = np.array([[0, 1, 5, 255]], dtype=np.uint8).repeat(4, 0)
    _write_pair(tmp_path, "training", "a", np.zeros((4, 4, 3), np.uint8), label)
    ds = ADE20KDataset(tmp_path, "train", None, num_classes=5)
    assert ds[0][1].tolist()[0] == [255, 0, 4, 255]
    assert ADE20KDataset(tmp_path, "train", None, num_classes=6, reduce_zero_label=False)[0][1].tolist()[0] == \
        [0, 1, 5, 255]
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "training" / "b.jpg")
    with pytest.raises(ValueError, match=r"1 images without a label map \['b'\]"):
        ADE20KDataset(tmp_path, "train", None, num_classes=5)
    with pytest.raises(FileNotFoundError, match="ADE20K layout"):
        ADE20KDataset(tmp_path, "val", None, num_classes=5)


def test_rescale_size_is_mmcv_keep_ratio():
    assert rescale_size(683, 512, (2048, 512)) == (683, 512)
    assert rescale_size(4000, 1000, (2048, 512)) == (2048, 512)   # long side bound
    assert rescale_size(300, 200, (2048, 512)) == (768, 512)       # upscaled to the short side


def test_random_crop_respects_cat_max_ratio():
    label = np.zeros((64, 64), dtype=np.uint8)
    label[:, 48:] = 1  # only crops reaching x >= 48 hold class 1 at >= 25 %
    rng = np.random.default_rng(0)
    boxes = [random_crop_box(label, 32, rng, cat_max_ratio=0.75) for _ in range(50)]
    shares = [(label[y0:y1, x0:x1] == 0).mean() for y0, y1, x0, x1 in boxes]
    assert np.mean([s < 0.75 for s in shares]) > 0.9  # retried crops avoid a dominant class
    plain = [random_crop_box(label, 32, np.random.default_rng(i), cat_max_ratio=1.0) for i in range(50)]
    assert np.mean([(label[a:b, c:d] == 0).mean() < 0.75 for a, b, c, d in plain]) < 0.6


def test_train_transform_keeps_image_and_label_aligned():
    # colour encodes the class: left half red (class 0), right half blue (class 1); bottom rows unlabelled
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, :32, 0] = 255
    image[:, 32:, 2] = 255
    label = np.zeros((48, 64), np.uint8)
    label[:, 32:] = 1
    label[40:] = 255
    tf = SegTrainTransform(crop=64, photometric=False)
    for seed in range(8):
        img, target = tf(Image.fromarray(image), label, np.random.default_rng(seed))
        assert img.shape == (3, 64, 64) and target.shape == (64, 64) and target.dtype == torch.int64
        red_wins = img[0] > img[2]
        labelled = target < 2
        agree = (red_wins[labelled] == (target[labelled] == 0)).float().mean()
        assert agree > 0.97, (seed, agree)
        assert set(target.unique().tolist()) <= {0, 1, 255}
    img, target = SegEvalTransform(crop=32)(Image.fromarray(image), label)
    assert img.shape == (3, 32, 43) and target.shape == (48, 64)  # labels stay at full size


# ---- model / inference -------------------------------------------------------------------------------------------

def tiny_segmentor(classes: int = 3, size: int = 32) -> UperNetSegmentor:
    return UperNetSegmentor(ViTFeaturePyramid("vit_tiny_patch16", img_size=size, depth=2, tap_blocks=(0, 0, 1, 1),
                                              neck="beit"), classes, channels=16, aux_channels=8)


def test_segmentation_augmentation_follows_the_epoch_in_persistent_workers(tmp_path, one_thread):
    """A worker process keeps its copy of the dataset across epochs: the epoch travels with the index, so epoch 1
    draws epoch 1's crops (as ``dataset.set_epoch(1); dataset[i]`` in this process), not epoch 0's again."""
    write_ade20k(tmp_path, 4, 1, 32, seed=0)
    ds = ADE20KDataset(tmp_path, "train", SegTrainTransform(32, (0.5, 2.0), 0.75), num_classes=5, seed=0)
    loader = build_train_loader(ds, batch_size=4, num_workers=1, pin_memory=False, rank=0, world_size=1, seed=0,
                                keyed=False, epoch_indices=True)
    for epoch in (0, 1, 2):
        set_loader_epoch(loader, seed=0, epoch=epoch, rank=0)
        images, _, indices = next(iter(loader))
        ds.set_epoch(epoch)
        expected = torch.stack([ds[int(i)][0] for i in indices])
        assert torch.equal(images, expected), epoch
    ds.set_epoch(0)
    assert not torch.equal(ds[0][0], ds[(1, 0)][0])  # the epochs do differ


def test_upernet_shapes_and_every_parameter_trains():
    model = tiny_segmentor()
    out = model(torch.randn(2, 3, 64, 32))
    assert out["seg"].shape == (2, 3, 16, 8) and out["aux"].shape == (2, 3, 4, 2)
    (out["seg"].sum() + out["aux"].sum()).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert list(model.eval()(torch.randn(1, 3, 32, 32))) == ["seg"]  # no auxiliary head at inference


def test_layer_decay_groups_of_the_segmentor_cover_every_parameter_once():
    model = tiny_segmentor()
    depth = model.depth
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.65, num_layers=depth + 1,
                          unit_of=lambda n: (lambda i: None if i > depth else i)(model.layer_id(n)),
                          no_weight_decay=model.no_weight_decay())
    names = [n for g in groups for n in g["param_names"]]
    assert len(names) == len(set(names)) and set(names) == {n for n, _ in model.named_parameters()}
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale["backbone.vit.patch_embed.proj.weight"] == pytest.approx(0.65 ** 3)
    assert scale["backbone.vit.blocks.1.attn.qkv.weight"] == pytest.approx(0.65)
    assert scale["decode_head.conv_seg.weight"] == scale["backbone.samplers.0.0.weight"] == 1.0



def test_segment_step_loss_is_mean_ce_over_all_pixels_plus_weighted_aux():
    import torch.nn.functional as F
    from engine.segment import segment_step
    torch.manual_seed(0)
    seg, aux = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)

    class Fixed(nn.Module):
        def forward(self, x):
            return {"seg": seg, "aux": aux}

    labels = torch.randint(0, 3, (2, 16, 16))
    labels[0, :5] = 255
    out = segment_step(Fixed(), (torch.zeros(2, 3, 16, 16), labels), 0, device=torch.device("cpu"), aux_weight=0.4)
    up = lambda x: F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)  # noqa: E731
    # mmseg CrossEntropyLoss(avg_non_ignore=False): per-pixel CE (0 where ignored), mean over all 2 x 16 x 16 pixels
    ref_seg = F.cross_entropy(up(seg), labels, ignore_index=255, reduction="none").mean()
    ref_aux = F.cross_entropy(up(aux), labels, ignore_index=255, reduction="none").mean()
    torch.testing.assert_close(out["loss"], ref_seg + 0.4 * ref_aux)
    torch.testing.assert_close(out["loss_aux"], ref_aux)
    labelled = segment_step(Fixed(), (torch.zeros(2, 3, 16, 16), labels), 0, device=torch.device("cpu"),
                            aux_weight=0.0, avg_non_ignore=True)
    torch.testing.assert_close(labelled["loss"], F.cross_entropy(up(seg), labels, ignore_index=255))
    empty = segment_step(Fixed(), (torch.zeros(2, 3, 16, 16), torch.full((2, 16, 16), 255)), 0,
                         device=torch.device("cpu"))
    assert float(empty["loss"]) == 0.0  # an all-ignored batch is no signal, not NaN


def test_segment_loss_with_ignored_pixels_by_hand():
    from engine.segment import segment_step
    # one image of 2 x 2 pixels, 2 classes; logits at the label size (the bilinear resize is the identity)
    logits = torch.tensor([[[[2.0, 0.0], [1.0, 5.0]], [[0.0, 0.0], [3.0, -5.0]]]])

    class Fixed(nn.Module):
        def forward(self, x):
            return {"seg": logits}

    labels = torch.tensor([[[0, 1], [255, 255]]])  # two labelled pixels, two ignored
    out = segment_step(Fixed(), (torch.zeros(1, 3, 2, 2), labels), 0, device=torch.device("cpu"))
    ce_a = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))  # pixel (0, 0), class 0
    ce_b = -math.log(0.5)                                        # pixel (0, 1), class 1, equal logits
    assert float(out["loss"]) == pytest.approx((ce_a + ce_b) / 4, rel=1e-6)  # / all 4 pixels, not / 2

def test_window_starts_follow_mmseg():
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(683, 512, 341) == [0, 171]       # 2 windows, the last moved back to the border
    assert window_starts(1100, 512, 341) == [0, 341, 588]  # (1100 - 512 + 340) // 341 + 1 = 3
    assert window_starts(300, 512, 341) == [0]             # smaller than the crop: one padded window


class PixelModel(nn.Module):
    """Per-pixel logits (a 1x1 conv at input resolution): sliding windows must reproduce the full-image output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"seg": self.conv(x)}


def test_slide_inference_equals_full_image_for_a_pixelwise_model():
    torch.manual_seed(0)
    model = PixelModel().eval()
    image = torch.randn(3, 45, 70)
    logits = slide_inference(model, image, num_classes=4, crop=32, stride=21)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(image[None])["seg"][0])


def test_evaluation_metrics_equal_a_direct_computation():
    torch.manual_seed(0)
    model = PixelModel()
    images = [torch.randn(3, 20, 28), torch.randn(3, 32, 16)]
    labels = [torch.randint(0, 4, (20, 28)), torch.randint(0, 4, (32, 16))]
    labels[0][:3] = 255
    loader = [collate_eval([(images[0], labels[0], 0)]), collate_eval([(images[1], labels[1], 1)])]
    m = evaluate_segmentation(model, loader, device=torch.device("cpu"), num_classes=4, crop=16, stride=10)
    with torch.no_grad():
        preds = [model(x[None])["seg"][0].argmax(0) for x in images]
    keep = [lab != 255 for lab in labels]
    correct = sum(int((p[k] == lab[k]).sum()) for p, lab, k in zip(preds, labels, keep))
    assert m["aAcc"] == pytest.approx(100 * correct / sum(int(k.sum()) for k in keep))
    assert m["num_images"] == 2 and int(m["confusion"].sum()) == sum(int(k.sum()) for k in keep)


def test_poly_lr_with_linear_warmup_is_mmcv():
    kw = dict(base_lr=1e-4, total_steps=1000, warmup_steps=100, power=1.0, warmup_ratio=1e-6)
    assert poly_lr(0, **kw) == pytest.approx(1e-4 * 1e-6)
    assert poly_lr(50, **kw) == pytest.approx(1e-4 * 0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert poly_lr(100, **kw) == pytest.approx(1e-4 * 0.9)
    assert poly_lr(1000, **kw) == 0.0
    assert poly_lr(500, base_lr=1.0, total_steps=1000, power=0.9, min_lr=0.1) == pytest.approx(0.9 * 0.5 ** 0.9 + 0.1)


# ---- main_segment.py end to end (synthetic scenes, tiny ViT, one CPU thread) ---------------------------------------

DEMO = ["--config", "configs/segment/demo.yaml", "--batch_size", "8", "--warmup_iters", "5", "--vis_images", "2"]


def untrained_miou(out_dir) -> float:
    """mIoU of the demo model before any step (same seed, same init as main_segment's run)."""
    args = parse_args(main_segment.build_parser(), DEMO + ["--output_dir", str(out_dir)])
    torch.manual_seed(args.seed)
    model = main_segment.build_model(args, finetune=None)
    val = ADE20KDataset(out_dir / "demo_scenes", "val", SegEvalTransform(args.input_size), num_classes=5)
    loader = torch.utils.data.DataLoader(val, batch_size=4, collate_fn=collate_eval)
    return evaluate_segmentation(model, loader, device=torch.device("cpu"), num_classes=5, crop=64, stride=42)["mIoU"]


def test_demo_training_learns_and_eval_and_auto_resume_work(tmp_path, one_thread, monkeypatch):
    monkeypatch.chdir(main_segment.Path(main_segment.__file__).parent)
    out = tmp_path / "run"
    result = main_segment.main(DEMO + ["--output_dir", str(out), "--max_iters", "40"])
    before = untrained_miou(out)
    assert result["mIoU"] > before + 25 and result["mIoU"] > 40, (before, result)  # seen: ~10 -> ~58
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert lines[-1]["step"] == 40 and lines[-1]["val_mIoU"] == pytest.approx(result["mIoU"])
    assert (out / "val_step40.png").is_file() and (out / "checkpoint-best.pth").is_file()
    # --eval on the checkpoint reproduces the last evaluation exactly
    evaluated = main_segment.main(DEMO + ["--output_dir", str(out), "--eval", "--resume",
                                          str(out / "checkpoint-last.pth")])
    assert evaluated["mIoU"] == pytest.approx(result["mIoU"], abs=1e-9)
    assert json.loads((out / "results.json").read_text())["mIoU"] == pytest.approx(result["mIoU"], abs=1e-9)
    # --auto_resume continues after the saved epoch (40 steps per epoch here) up to the new budget
    main_segment.main(DEMO + ["--output_dir", str(out), "--max_iters", "50", "--auto_resume"])
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["step"] for line in lines] == [40, 50] and lines[-1]["epoch"] == 1


def test_a_pretrained_checkpoint_loads_into_the_segmentor(tmp_path, one_thread):
    """--finetune with one of our pretraining checkpoints (LocalMIM layout, stage norms): every encoder weight
    arrives in the pyramid's ViT (the unused final norm is reported, nothing is missing)."""
    import models
    torch.manual_seed(1)
    mim = models.create_model("MIM_vit_tiny_patch16", img_size=64)
    path = tmp_path / "pre.pth"
    torch.save({"model": mim.state_dict(), "epoch": 9}, path)
    args = parse_args(main_segment.build_parser(), DEMO + ["--output_dir", str(tmp_path), "--finetune", str(path)])
    model = main_segment.build_model(args, finetune=str(path))
    vit = model.backbone.vit
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.bias", "pos_embed"):
        torch.testing.assert_close(vit.state_dict()[name], mim.state_dict()[name], msg=name)



def test_two_processes_train_and_evaluate_like_the_checkpoint_on_one(tmp_path, monkeypatch):
    """main_segment on 2 gloo ranks (DDP, 64 validation scenes sharded 32 / 32): the mIoU it reports equals a
    1-process --eval of the checkpoint it wrote, i.e. the all-reduced confusion matrix counts every image once and
    every rank evaluated rank 0's weights and BatchNorm statistics."""
    from spawn_ranks import main_of, spawn
    monkeypatch.chdir(main_segment.Path(main_segment.__file__).parent)
    out = tmp_path / "ddp"
    argv = DEMO + ["--output_dir", str(out), "--max_iters", "4", "--batch_size", "4", "--device", "cpu"]
    spawn(main_of("main_segment", argv))
    reported = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert reported["step"] == 4
    torch.set_num_threads(1)
    single = main_segment.main(DEMO + ["--output_dir", str(tmp_path / "eval"), "--data_path", str(out / "demo_scenes"),
                                       "--eval", "--resume", str(out / "checkpoint-last.pth")])
    assert single["num_images"] == 64
    assert reported["val_mIoU"] == pytest.approx(single["mIoU"], abs=1e-9)


def test_a_backbone_checkpoint_with_keys_the_model_cannot_use_is_refused(tmp_path):
    """Weights that would be silently dropped (here a deeper ViT's block 12) make --finetune fail loudly."""
    import models
    vit = models.create_model("vit_tiny_patch16", img_size=64, num_classes=0)
    state = dict(vit.state_dict())
    state.update({k.replace("blocks.0.", "blocks.12.", 1): v for k, v in vit.state_dict().items()
                  if k.startswith("blocks.0.")})
    path = tmp_path / "deeper.pth"
    torch.save({"model": state}, path)
    args = parse_args(main_segment.build_parser(), DEMO + ["--output_dir", str(tmp_path), "--finetune", str(path)])
    with pytest.raises(ValueError, match=r"deeper\.pth \(\w+ checkpoint\) into the pyramid's ViT has 12 encoder "
                                         r"parameters the model lacks \(blocks\.12\."):
        main_segment.build_model(args, finetune=str(path))
