"""Every reference recipe under configs/segment/ against the values of its source config, row by row.

configs/segment/demo.yaml is a CPU smoke test with no reference and is not listed. Values are read from the
resolved arguments of main_segment.py (the recipe over the parser's defaults), so a default that stands in for a
reference value is checked too.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import main_segment
from util.args import parse_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "segment"

MAE_ADE = "implus/mae_segmentation configs/mae/upernet_mae_base_12_512_slide_160k_ade20k.py"
MAE_BACKBONE = "implus/mae_segmentation backbone/mae.py"
UPERNET = "mmsegmentation 0.x configs/_base_/models/upernet_r50.py (BEiT's / MAE's _base_/models/upernet.py)"
ADE = "mmsegmentation 0.x configs/_base_/datasets/ade20k.py"
SCHEDULE = "mmsegmentation 0.x configs/_base_/schedules/schedule_160k.py"

# (argument, reference value, source) for each recipe
REFERENCE = {
    "upernet_vit_base_512_160k_ade20k.yaml": [
        ("model", "vit_base_patch16", MAE_ADE + " (embed_dim 768, depth 12, num_heads 12, patch_size 16)"),
        ("input_size", 512, MAE_ADE + " (img_size=512, crop_size=(512, 512))"),
        ("lr", 1e-4, MAE_ADE + " (optimizer lr=1e-4)"),
        ("weight_decay", 0.05, MAE_ADE + " (optimizer weight_decay=0.05)"),
        ("layer_decay", 0.65, MAE_ADE + " (paramwise_cfg layer_decay_rate=0.65)"),
        ("drop_path", 0.1, MAE_ADE + " (backbone drop_path_rate=0.1)"),
        ("rel_pos_bias", True, MAE_ADE + " (use_rel_pos_bias=True)"),
        ("layer_scale_init_value", 1.0, MAE_ADE + " (init_values=1.)"),
        ("tap_blocks", None, MAE_ADE + " (out_indices=[3, 5, 7, 11]: main_segment's default for depth 12)"),
        ("neck", "beit", MAE_BACKBONE + " (fpn1..fpn4: deconvolutions + BN + GELU, identity, max-pool)"),
        ("warmup_iters", 1500, MAE_ADE + " (lr_config warmup_iters=1500)"),
        ("poly_power", 1.0, MAE_ADE + " (lr_config power=1.0, min_lr=0.0)"),
        ("max_iters", 160000, SCHEDULE + " (runner max_iters=160000)"),
        ("eval_interval", 16000, SCHEDULE + " (evaluation interval=16000)"),
        ("batch_size", 2, MAE_ADE + " (data samples_per_gpu=2)"),
        ("eff_batch_size", 16, MAE_ADE + " (2 images x 8 GPUs)"),
        ("slide_stride", 341, MAE_ADE + " (test_cfg mode='slide', stride=(341, 341))"),
        ("channels", None, MAE_ADE + " (decode_head channels=768: main_segment's default is the ViT width)"),
        ("aux_channels", 256, UPERNET + " (auxiliary_head FCNHead channels=256)"),
        ("aux_weight", 0.4, UPERNET + " (auxiliary_head loss_weight=0.4)"),
        ("nb_classes", 150, MAE_ADE + " (decode_head num_classes=150)"),
        ("reduce_zero_label", True, ADE + " (LoadAnnotations reduce_zero_label=True)"),
        ("ratio_range", [0.5, 2.0], ADE + " (Resize img_scale=(2048, 512), ratio_range=(0.5, 2.0))"),
        ("cat_max_ratio", 0.75, ADE + " (RandomCrop cat_max_ratio=0.75)"),
        ("clip_grad", None, MAE_ADE + " (optimizer_config grad_clip=None)"),
    ],
}


def test_every_reference_recipe_has_a_table():
    recipes = {p.name for p in CONFIGS.glob("*.yaml")} - {"demo.yaml"}
    assert recipes == set(REFERENCE)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_recipe_values_equal_the_reference(name):
    args = parse_args(main_segment.build_parser(), ["--config", str(CONFIGS / name)])
    wrong = [f"{key}: recipe {getattr(args, key)!r}, reference {value!r} ({source})"
             for key, value, source in REFERENCE[name] if getattr(args, key) != value]
    assert not wrong, "\n".join(wrong)


def test_recipe_backbone_options_load_a_pretrained_checkpoint_neutrally(tmp_path, caplog):
    """main_segment with MAE's backbone options: a LocalMIM checkpoint (no relative position bias, no LayerScale)
    loads, the new tensors stay at zero / one, and the ViT tokens are the checkpoint's own."""
    import logging

    import torch

    import models
    torch.manual_seed(1)
    mim = models.create_model("MIM_vit_tiny_patch16", img_size=64)
    path = tmp_path / "pre.pth"
    torch.save({"model": mim.state_dict(), "epoch": 9}, path)
    argv = ["--config", str(CONFIGS / "demo.yaml"), "--output_dir", str(tmp_path), "--finetune", str(path),
            "--rel_pos_bias", "--layer_scale_init_value", "1.0"]
    args = parse_args(main_segment.build_parser(), argv)
    with caplog.at_level(logging.INFO, logger="models.pyramid"):
        model = main_segment.build_model(args, finetune=str(path)).eval()
    vit = model.backbone.vit
    assert all(not b.attn.relative_position_bias_table.any() and torch.equal(b.ls1.gamma, torch.ones(192))
               for b in vit.blocks)
    assert sum("neutral initialisation" in r.getMessage() for r in caplog.records) == 1
    plain = main_segment.build_model(parse_args(main_segment.build_parser(), argv[:6]), finetune=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model.backbone.forward_tokens(x), plain.backbone.forward_tokens(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
