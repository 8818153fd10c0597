"""Pieces of fine-tuning: MAE's augmentation, checkpoint resampling on load, criterion, reports, recipes, flags."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.layers import resample_abs_pos_embed
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer

import main_finetune
import models
from engine.finetune import build_criterion
from models.backbone import load_finetune_weights
from util.args import parse_args
from util.checkpoint import load_checkpoint
from util.data.transforms import MEAN, STD, finetune_transform
from engine.metrics import mean_and_std
from util.vis import confusion_colours, confusion_layout, save_confusion_png

ROOT = Path(__file__).resolve().parent.parent
# the fine-tuning flags (MAE main_finetune.py names plus data sets, folds, FreezeOut)
FLAGS = ["--model", "--finetune", "--epochs", "--warmup_epochs", "--blr", "--lr", "--min_lr", "--layer_decay",
         "--weight_decay", "--drop_path", "--clip_grad", "--smoothing", "--mixup", "--cutmix", "--cutmix_minmax",
         "--mixup_prob", "--mixup_switch_prob", "--mixup_mode", "--reprob", "--remode", "--recount", "--aa",
         "--color_jitter", "--global_pool", "--cls_token", "--input_size", "--nb_classes", "--batch_size",
         "--accum_iter", "--dist_eval", "--eval", "--resume", "--auto_resume", "--output_dir", "--log_dir", "--seed",
         "--amp", "--config", "--data_set", "--data_path", "--split_file", "--fold", "--download", "--freezeout",
         "--t_0", "--how_scale", "--num_workers"]


def test_flags_exist_and_seed_commands_parse():
    parser = main_finetune.build_parser()
    options = {opt for action in parser._actions for opt in action.option_strings}
    assert [f for f in FLAGS if f not in options] == []
    mae_b = ("--batch_size 32 --model vit_base_patch16 --finetune ckpt.pth --epochs 100 --blr 5e-4 --layer_decay 0.65 "
             "--weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval --data_path x")
    args = parse_args(parser, mae_b.split())
    assert (args.blr, args.layer_decay, args.mixup, args.cutmix, args.global_pool) == (5e-4, 0.65, 0.8, 1.0, True)
    assert args.smoothing == 0.1 and args.aa == "rand-m9-mstd0.5-inc1" and args.remode == "pixel"  # MAE defaults
    gastro = ("--batch_size 50 --model vit_large_patch16 --finetune c.pth --epochs 50 --blr 1e-3 --smoothing 0 "
              "--num_workers 8 --data_path d --output_dir o --log_dir l --nb_classes 22")
    args = parse_args(parser, gastro.split())
    assert (args.nb_classes, args.smoothing, args.layer_decay, args.min_lr) == (22, 0.0, 0.75, 1e-6)
    args = parse_args(parser, "--cls_token --cutmix_minmax 0.2 0.8 --fold 0 1".split())
    assert not args.global_pool and args.cutmix_minmax == [0.2, 0.8] and args.fold == [0, 1]


def test_recipes_cover_spec_tables():
    names = {p.stem for p in (ROOT / "configs" / "finetune").glob("*.yaml")}
    assert {"mae_vit_base", "mae_vit_large", "mae_vit_huge", "dbot_vit_huge_448", "localmim_vit_base_100e",
            "localmim_vit_base_1600e", "moco_v3_cifar10", "moco_v3_cifar100", "moco_v3_flowers", "moco_v3_pets",
            "mae_gastrovision", "mae_hyperkvasir"} <= names


# ---------------------------------------------------------------------------------------------------- augmentation
def test_finetune_transform_is_maes_timm_pipeline():
    steps = finetune_transform(32).transforms
    crop, flip, randaug, _, norm, erase = steps
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3)) and crop.size == (32, 32)
    assert str(crop.interpolation).lower().endswith("bicubic") and flip.p == 0.5
    assert isinstance(randaug, RandAugment) and randaug.num_layers == 2 and len(randaug.ops) == 15
    assert all(op.magnitude == 9 and op.magnitude_std == 0.5 and op.prob == 0.5 for op in randaug.ops)
    assert sum("Increasing" in op.name for op in randaug.ops) == 6  # the 'inc1' op set
    assert norm.mean.tolist() == pytest.approx(list(MEAN)) and norm.std.tolist() == pytest.approx(list(STD))
    assert isinstance(erase, RandomErasing) and erase.probability == 0.25 and erase.mode == "pixel"
    plain = finetune_transform(32, auto_augment="none", re_prob=0.0).transforms
    assert not any(isinstance(t, (RandAugment, RandomErasing)) for t in plain)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    assert finetune_transform(32)(img).shape == (3, 32, 32)


def test_posterize_to_zero_bits_gives_black_instead_of_raising():
    """'inc1' posterize keeps 0 bits at magnitude 10; Pillow 13 raises there, older Pillow returned black."""
    op = next(op for op in finetune_transform(32).transforms[2].ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0
    img = Image.fromarray(np.random.default_rng(0).integers(1, 256, (8, 8, 3), dtype=np.uint8))
    assert np.asarray(op(img)).max() == 0
    op.magnitude = 5  # int(5 / 10 * 4) = 2 -> keep 4 - 2 = 2 bits, as PIL does
    assert np.array_equal(np.asarray(op(img)), np.asarray(img) & 0b11000000)


# ------------------------------------------------------------------------------------------------ checkpoint load
def test_load_resamples_pos_embed_like_timm_and_reinitialises_the_head(tmp_path):
    torch.manual_seed(0)
    source = models.create_model("mae_vit_tiny_patch16", img_size=32)  # 2x2 patch grid
    torch.save({"model": source.state_dict()}, tmp_path / "pre.pth")
    model = models.create_model("vit_tiny_patch16", img_size=64, num_classes=7, global_pool="avg")  # 4x4 grid
    load_finetune_weights(model, load_checkpoint(tmp_path / "pre.pth"))
    old = source.state_dict()["pos_embed"]
    expected = resample_abs_pos_embed(old, new_size=[4, 4], old_size=[2, 2], num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=False)
    torch.testing.assert_close(model.pos_embed.data, expected, rtol=0, atol=0)
    grid = old[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)  # MAE's interpolate_pos_embed, written out
    direct = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    torch.testing.assert_close(model.pos_embed.data, torch.cat([old[:, :1], direct], dim=1))
    for key, value in model.state_dict().items():
        if key.startswith(("blocks.", "patch_embed.")) or key == "cls_token":
            assert torch.equal(value, source.state_dict()[key]), key
    assert model.head.bias.abs().max() == 0 and 1e-5 < model.head.weight.std() < 3e-5  # MAE: trunc_normal(2e-5)


def test_load_resizes_a_patch_14_kernel(tmp_path):
    torch.manual_seed(0)
    source = VisionTransformer(img_size=28, patch_size=14, embed_dim=192, depth=12, num_heads=3, num_classes=0)
    torch.save(source.state_dict(), tmp_path / "p14.pth")
    model = models.create_model("vit_tiny_patch16", img_size=32, num_classes=3, global_pool="token")
    load_finetune_weights(model, load_checkpoint(tmp_path / "p14.pth"), global_pool=False, head_init_std=0.01)
    kernel = source.patch_embed.proj.weight.data
    expected = F.interpolate(kernel, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.patch_embed.proj.weight.data, expected)
    assert torch.equal(model.norm.weight, source.norm.weight) and 0.005 < model.head.weight.std() < 0.015


# ------------------------------------------------------------------------------------------- criterion and reports
def _args(**kw) -> dict:
    base = dict(mixup=0.0, cutmix=0.0, cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch",
                smoothing=0.1)
    return {**base, **kw}


def test_criterion_follows_mae():
    mixup, criterion = build_criterion(num_classes=10, **_args(mixup=0.8, cutmix=1.0))
    assert isinstance(mixup, Mixup) and isinstance(criterion, SoftTargetCrossEntropy)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing, mixup.num_classes) == (0.8, 1.0, 0.1, 10)
    mixup, criterion = build_criterion(num_classes=10, **_args())
    assert mixup is None and isinstance(criterion, LabelSmoothingCrossEntropy) and criterion.smoothing == 0.1
    mixup, criterion = build_criterion(num_classes=10, **_args(smoothing=0.0))
    assert mixup is None and type(criterion) is nn.CrossEntropyLoss


def test_confusion_png_colours_rows_by_share(tmp_path):
    confusion = torch.tensor([[6, 2, 0], [0, 0, 5], [0, 0, 0]])
    colours = confusion_colours(confusion)
    assert colours[0, 1].tolist() == [round(255 - (255 - c) * 0.25) for c in (8, 48, 107)]
    assert colours[1, 2].tolist() == [8, 48, 107] and colours[2].tolist() == [[255, 255, 255]] * 3
    path = save_confusion_png(tmp_path / "cm.png", confusion, ["a", "b", "c"])
    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB"))
    cell, left, top = confusion_layout(["a", "b", "c"])  # 48 px cells for 3 classes; names left of and above
    assert cell == 48 and left > 8 and top > 24
    assert tuple(pixels[top + cell + 1, left + 2 * cell + cell - 2]) == (8, 48, 107)  # row b, column c: all of b
    assert tuple(pixels[top + 2 * cell + 1, left + cell - 2]) == (255, 255, 255)  # empty row
    with pytest.raises(ValueError, match="class names"):
        save_confusion_png(tmp_path / "x.png", confusion, ["a"])


def test_fold_summary_is_mean_and_population_std():
    summary = mean_and_std([{"acc1": 90.0, "f1": 80.0, "only_here": 1.0, "note": "x"},
                                             {"acc1": 94.0, "f1": 81.0}])
    assert summary == {"acc1": 92.0, "acc1_std": 2.0, "f1": 80.5, "f1_std": 0.5}


def test_classify_step_with_several_heads_reports_each_head_and_their_mean():
    from engine.finetune import classify_step
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5)  # 3 heads, batch 4, 5 classes
    targets = torch.tensor([0, 1, 2, 3])
    out = classify_step(lambda x: logits, (torch.zeros(4, 1), targets), 0, criterion=torch.nn.CrossEntropyLoss(),
                        device=torch.device("cpu"))
    per_head = [torch.nn.functional.cross_entropy(h, targets) for h in logits]
    for h, expected in enumerate(per_head):
        assert torch.allclose(out[f"loss_head{h}"], expected)
    assert torch.allclose(out["loss"], sum(per_head))
    assert torch.allclose(out["loss_head_mean"], sum(per_head) / 3)
