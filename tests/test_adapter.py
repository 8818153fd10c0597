"""ViT-Adapter (models/adapter.py) and its DINOv2 checkpoints (models/convert.py, tools/convert_14to16.py).

References: timm's own ViT / DINOv2 models (random weights, real key names and shapes) run at patch 16 on
weights resized in the test with F.interpolate, the explicit per-window computation, and the lr-decay formula.
"""
from __future__ import annotations

import importlib.util
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import GluMlp

from models.adapter import ADAPTER_MODELS, PyramidFPN, ViTAdapter, create_adapter, default_interaction_indexes
from models.backbone import load_pretrained
from models.convert import backbone_state, detect_source
from util.param_groups import param_groups

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(embed_dim=32, depth=4, num_heads=2, deform_num_heads=2, conv_inplane=8, img_size=64)


def plain_tokens(vit, x: torch.Tensor, last_blocks: list[int]) -> list[torch.Tensor]:
    """timm's own forward: token sequences [B, T + hw, D] after the given blocks, no final norm."""
    with torch.no_grad():
        outs = vit.forward_intermediates(x, indices=last_blocks, norm=False, output_fmt="NLC",
                                         return_prefix_tokens=True, intermediates_only=True)
    return [torch.cat([prefix, patches], dim=1) for patches, prefix in outs]


def adapter_tokens(model: ViTAdapter, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.forward_interactions(x)[0]


def as_plain_vit(model: ViTAdapter, img_size: int | tuple[int, int], **timm_kwargs) -> torch.nn.Module:
    """A timm ViT of the same architecture holding the adapter's ViT weights (pos grid resampled by the test)."""
    plain = timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=16, embed_dim=model.embed_dim, depth=model.depth,
        num_heads=model.vit.blocks[0].attn.num_heads, num_classes=0, qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **timm_kwargs).eval()
    state = {k: v for k, v in model.vit.state_dict().items()}
    state["pos_embed"] = resample_grid(state["pos_embed"], plain.patch_embed.grid_size,
                                       0 if plain.no_embed_class else plain.num_prefix_tokens)
    plain.load_state_dict(state, strict=False)  # only norm.* (the adapter has none) stays missing
    return plain


def resample_grid(pos: torch.Tensor, size: tuple[int, int], prefix: int) -> torch.Tensor:
    """ViT-Adapter's ``_get_pos_embed``: bicubic, align_corners False, no antialias; prefix rows kept."""
    grid = pos[:, prefix:]
    g = int(grid.shape[1] ** 0.5)
    if (g, g) == tuple(size):
        return pos
    grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(size), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :prefix], grid.flatten(2).transpose(1, 2)], dim=1)


# ---- architecture ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{}, {"layer_scale": True, "reg_tokens": 4}])
def test_vit_tokens_equal_the_plain_vit_while_gammas_are_zero(extra):
    torch.manual_seed(0)
    model = ViTAdapter(**TINY, **extra).eval()
    x = torch.randn(2, 3, 64, 96)  # not the position grid's size: the grid is resampled on the fly
    timm_kwargs = {"init_values": 1.0, "reg_tokens": 4, "no_embed_class": True} if extra else {}
    plain = as_plain_vit(model, (64, 96), **timm_kwargs)
    last = [r[1] for r in model.interaction_indexes]
    assert last == [0, 1, 2, 3]
    got, want = adapter_tokens(model, x), plain_tokens(plain, x, last)
    assert all(int(i.gamma.abs().sum()) == 0 for i in (b.injector for b in model.interactions))
    for g, w in zip(got, want):
        assert g.shape == w.shape == (2, (1 + extra.get("reg_tokens", 0)) + 4 * 6, 32)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a trained injector changes the ViT's tokens: the comparison can fail
        model.interactions[1].injector.gamma.fill_(0.5)
    changed = adapter_tokens(model, x)
    torch.testing.assert_close(changed[0], want[0], rtol=1e-5, atol=1e-5)
    assert (changed[1] - want[1]).abs().max() > 1e-3


def test_pyramid_contract_and_every_parameter_trains():
    torch.manual_seed(0)
    model = create_adapter("adapter_small", **TINY, drop_path_rate=0.1)
    out = model(torch.randn(2, 3, 64, 96))
    assert list(out) == ["0", "1", "2", "3"] and model.out_channels == 32 and model.strides == (4, 8, 16, 32)
    assert [tuple(v.shape) for v in out.values()] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]
    sum(v.square().mean() for v in out.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad
    assert len(model.interactions[-1].extra_extractors) == 2 and not model.interactions[0].extra_extractors
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.randn(1, 3, 48, 64))


def test_fpn_neck_gives_the_detector_five_levels():
    torch.manual_seed(0)
    model = create_adapter("adapter_small", **TINY, fpn_channels=16).eval()
    assert isinstance(model, PyramidFPN) and model.out_channels == 16 and model.strides == (4, 8, 16, 32, 64)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
        inner = model.body(torch.randn(1, 3, 64, 64))
    assert list(out) == ["0", "1", "2", "3", "pool"] and len(inner) == 4
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    torch.testing.assert_close(out["pool"], out["3"][..., ::2, ::2])  # max-pool kernel 1, stride 2
    assert model.layer_id("body.vit.blocks.2.mlp.fc1.weight") == 3
    assert model.layer_id("fpn.inner_blocks.0.0.weight") == 5
    assert model.num_layers == 5 and "body.vit.pos_embed" in model.no_weight_decay()


def test_windowed_blocks_equal_attention_within_each_window():
    torch.manual_seed(0)
    model = ViTAdapter(**TINY, window_size=3, global_blocks=[1, -1]).eval()
    assert model.window_blocks == {0, 2}
    h, w, prefix = 4, 6, 1
    x = torch.randn(2, prefix + h * w, 32)
    with torch.no_grad():
        got = model._block(0, x, (h, w))
        block = model.vit.blocks[0]
        grid = x[:, prefix:].reshape(2, h, w, 32)
        want = torch.empty_like(grid)
        for r in range(0, h, 3):  # windows 3x3; the bottom row of windows holds one valid row only
            for c in range(0, w, 3):
                win = grid[:, r:r + 3, c:c + 3]
                want[:, r:r + 3, c:c + 3] = block(win.reshape(2, -1, 32)).reshape(win.shape)
        torch.testing.assert_close(got[:, prefix:], want.reshape(2, h * w, 32), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[:, :prefix], block(x[:, :prefix]), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model._block(1, x, (h, w)), got)  # block 1 is global
    with pytest.raises(ValueError, match="global_blocks"):
        ViTAdapter(**TINY, window_size=3, global_blocks=[4])
    assert ViTAdapter(**TINY, global_blocks=[1]).window_blocks == frozenset()  # no window_size: all global


def test_layer_decay_groups_follow_the_reference_constructor():
    model = ViTAdapter(**TINY)
    assert [model.layer_id(n) for n in ("vit.cls_token", "vit.pos_embed", "vit.patch_embed.proj.weight",
                                        "vit.blocks.0.attn.qkv.weight", "vit.blocks.3.mlp.fc2.bias",
                                        "spm.stem.0.weight", "interactions.0.injector.gamma", "level_embed",
                                        "norms.0.weight")] == [0, 0, 0, 1, 4, 5, 5, 5, 5]
    groups = param_groups(model, weight_decay=0.05, unit_of=model.layer_id, layer_decay=0.7,
                          num_layers=model.num_layers, no_weight_decay=model.no_weight_decay())
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert scale["vit.patch_embed.proj.weight"] == pytest.approx(0.7 ** 5)
    assert scale["vit.blocks.1.attn.qkv.weight"] == pytest.approx(0.7 ** 3)
    assert scale["spm.fc1.weight"] == scale["interactions.3.extractor.attn.value_proj.weight"] == 1.0
    assert decay["vit.pos_embed"] == decay["vit.cls_token"] == decay["interactions.0.injector.gamma"] == 0.0
    assert decay["level_embed"] == 0.0  # the DeiT-adapter configs' custom_keys: level_embed decay_mult 0
    assert decay["vit.blocks.0.attn.qkv.weight"] == 0.05


def test_factories_have_the_reference_sizes():
    assert default_interaction_indexes(12) == [(0, 2), (3, 5), (6, 8), (9, 11)]
    assert default_interaction_indexes(24) == [(0, 5), (6, 11), (12, 17), (18, 23)]
    assert {"adapter_small", "adapter_base", "adapter_large", "adapter_dinov2_small", "adapter_dinov2_base",
            "adapter_dinov2_large", "adapter_dinov2_giant", "adapter_dinov2_small_reg4"} <= set(ADAPTER_MODELS)
    model = create_adapter("adapter_dinov2_base", depth=4)  # narrow depth only: cheap to build
    assert (model.embed_dim, model.vit.blocks[0].attn.num_heads, model.layer_scale) == (768, 12, True)
    attn = model.interactions[0].injector.attn
    assert (attn.n_heads, attn.value_dim, attn.n_levels, attn.n_points) == (12, 384, 3, 4)  # deform_ratio 0.5
    assert model.vit.patch_embed.grid_size == (37, 37)  # pretrain_size 592: a DINOv2 37x37 grid loads as is
    with pytest.raises(ValueError, match="unknown ViT-Adapter"):
        create_adapter("adapter_smal")


# ---- DINOv2 checkpoints ----------------------------------------------------------------------------------------

def dinov2_original(timm_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The keys and shapes of DINOv2's released files, from a timm DINOv2 model: ``mask_token``, registers as
    ``register_tokens`` with the cls position inside ``pos_embed``, SwiGLU as ``mlp.w12`` / ``mlp.w3``."""
    sd = {k: v.clone() for k, v in timm_model.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    sd["mask_token"] = torch.zeros(1, dim)
    if "reg_token" in sd:
        cls_pos = torch.randn(1, 1, dim) * 0.02  # undo timm's fold of the cls position into cls_token
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = sd["cls_token"] - cls_pos
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    if not isinstance(timm_model.blocks[0].mlp, GluMlp):
        return sd
    return {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v for k, v in sd.items()}


def timm_dinov2(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gamma"):
                p.uniform_(0.1, 2.0)  # trained-looking LayerScale (1e-5 at init would hide errors)
    return model


def convert_tool():
    spec = importlib.util.spec_from_file_location("convert_14to16", ROOT / "tools" / "convert_14to16.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def patch16_reference(timm_model: torch.nn.Module, name: str, size: int, **kwargs) -> torch.nn.Module:
    """timm's model at patch 16 and input ``size`` with the DINOv2 weights, kernel and grid resized here."""
    plain = timm.create_model(name, pretrained=False, num_classes=0, patch_size=16, img_size=size, **kwargs).eval()
    state = dict(timm_model.state_dict())
    state["patch_embed.proj.weight"] = F.interpolate(state["patch_embed.proj.weight"], size=(16, 16),
                                                     mode="bilinear", align_corners=False)
    prefix = 0 if plain.no_embed_class else plain.num_prefix_tokens
    state["pos_embed"] = resample_grid(state["pos_embed"], plain.patch_embed.grid_size, prefix)
    plain.load_state_dict(state, strict=True)
    return plain


@pytest.mark.parametrize("name, adapter", [("vit_small_patch14_dinov2", "adapter_dinov2_small"),
                                           ("vit_small_patch14_reg4_dinov2", "adapter_dinov2_small_reg4")])
def test_dinov2_checkpoint_converts_14to16_and_loads_with_every_key_used(tmp_path, name, adapter):
    dinov2 = timm_dinov2(name, img_size=518)  # DINOv2's released grid: 37 x 37
    ckpt = dinov2_original(dinov2)
    assert ckpt["pos_embed"].shape == (1, 1 + 37 * 37, 384) and ckpt["patch_embed.proj.weight"].shape[-1] == 14
    torch.save(ckpt, tmp_path / "dinov2_vits14_pretrain.pth")
    assert convert_tool().main([str(tmp_path / "dinov2_vits14_pretrain.pth")]) == 0
    converted = torch.load(tmp_path / "dinov2_vits14_pretrain_14to16.pth", weights_only=True)
    assert "blocks.0.gamma1" in converted and detect_source(converted) == "dinov2"

    model = create_adapter(adapter, img_size=64).eval()
    missing, unexpected = model.load_backbone(converted, what="14to16 file")
    assert missing == [] and unexpected == ["norm.bias", "norm.weight"]  # the adapter does not use the final norm
    used = {k for k in ckpt if k not in ("mask_token", "norm.weight", "norm.bias")}
    assert len(used) == len(model.vit.state_dict())  # every other checkpoint tensor has a place in the ViT
    torch.testing.assert_close(model.vit.blocks[5].ls2.gamma, ckpt["blocks.5.ls2.gamma"], rtol=0, atol=0)

    # the adapter's ViT tokens (gammas 0) equal timm's DINOv2 run at patch 16 on the same resized weights
    x = torch.randn(1, 3, 64, 64)
    kwargs = {"reg_tokens": 4, "no_embed_class": True} if "reg4" in name else {}
    reference = patch16_reference(dinov2, name, 64)
    last = [r[1] for r in model.interaction_indexes]
    for g, w in zip(adapter_tokens(model, x), plain_tokens(reference, x, last)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert kwargs.get("reg_tokens", 0) == model.vit.num_reg_tokens


def test_register_tokens_and_layer_scale_refused_by_a_model_without_them():
    dinov2 = dinov2_original(timm_dinov2("vit_small_patch14_reg4_dinov2", img_size=56, depth=4))
    with pytest.raises(ValueError, match="4 register tokens and the model 0"):
        create_adapter("adapter_dinov2_small", depth=4, img_size=64).load_backbone(dinov2)
    # a model without LayerScale gets it folded (exact), and raw DINOv2 loads into it with every ViT key
    plain = dinov2_original(timm_dinov2("vit_small_patch14_dinov2", img_size=56, depth=4))
    missing, unexpected = create_adapter("adapter_small", depth=4, img_size=64).load_backbone(plain)
    assert missing == [] and unexpected == ["norm.bias", "norm.weight"]


def test_swiglu_giant_loads_into_the_giant_adapter_and_is_refused_elsewhere():
    small = dict(embed_dim=48, depth=4, num_heads=2)
    dinov2 = timm_dinov2("vit_giant_patch14_dinov2", img_size=56, **small)
    ckpt = dinov2_original(dinov2)
    assert "blocks.0.mlp.w12.weight" in ckpt and ckpt["blocks.0.mlp.w3.weight"].shape == (48, 128)
    model = create_adapter("adapter_dinov2_giant", **small, deform_num_heads=2, img_size=64).eval()
    model.load_backbone(ckpt)
    x = torch.randn(1, 3, 64, 64)
    reference = patch16_reference(dinov2, "vit_giant_patch14_dinov2", 64, **small)
    for g, w in zip(adapter_tokens(model, x), plain_tokens(reference, x, [0, 1, 2, 3])):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="SwiGLU"):
        create_adapter("adapter_dinov2_small", **small, deform_num_heads=2, img_size=64).load_backbone(ckpt)


def test_vit_adapter_14to16_file_loads_into_the_classifier_with_layer_scale_folded():
    """The 24 gamma1/gamma2 keys of a converted file were ignored at INFO level; now they are folded."""
    dinov2 = timm_dinov2("vit_small_patch14_dinov2", img_size=56, depth=4)
    converted = convert_tool().dinov2_14to16(dinov2_original(dinov2))
    classifier = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=384, depth=4, num_heads=6, num_classes=0, qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    state, source = backbone_state(converted, classifier)
    assert source == "dinov2" and not [k for k in state if "gamma" in k]
    classifier.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(classifier(x), patch16_reference(dinov2, "vit_small_patch14_dinov2", 64,
                                                                    depth=4)(x), rtol=1e-4, atol=1e-4)
    # a block parameter the classifier lacks is refused at load (models.backbone.load_pretrained), never ignored
    stray = dict(converted, **{"blocks.0.attn.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 encoder parameters the model lacks \(blocks\.0\.attn\.extra\.weight\)"):
        load_pretrained(classifier, backbone_state(stray, classifier)[0])


def test_a_state_already_folded_by_to_timm_vit_loads_with_gammas_at_one():
    """main_detect's path (to_timm_vit, then load_backbone): LayerScale was folded, so the gammas start at 1 and
    the ViT computes the same function as with the checkpoint's LayerScale kept as parameters."""
    from models.convert import to_timm_vit
    raw = dinov2_original(timm_dinov2("vit_small_patch14_dinov2", img_size=56, depth=4))
    kept = create_adapter("adapter_dinov2_small", depth=4, img_size=64).eval()
    kept.load_backbone(raw)
    folded = create_adapter("adapter_dinov2_small", depth=4, img_size=64).eval()
    folded.load_backbone(to_timm_vit(raw)[0])
    assert torch.equal(folded.vit.blocks[2].ls1.gamma, torch.ones(384))
    assert not torch.equal(kept.vit.blocks[2].ls1.gamma, torch.ones(384))
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(adapter_tokens(kept, x), adapter_tokens(folded, x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = ViTAdapter(**TINY, window_size=3, global_blocks=[0, 2, 3], grad_checkpointing=ckpt).train()
        with torch.no_grad():
            for block in model.interactions:
                block.injector.gamma.fill_(0.3)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        sum(v.square().mean() for v in model(x).values()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name, adapter", [("vit_base_patch14_dinov2", "adapter_dinov2_base"),
                                           ("vit_large_patch14_reg4_dinov2", "adapter_dinov2_large_reg4")])
def test_dinov2_base_and_large_widths_load_through_the_tool(tmp_path, name, adapter):
    """B and L at their real widths, heads and 37x37 grid (4 blocks instead of 12 / 24 to stay small)."""
    ckpt = dinov2_original(timm_dinov2(name, img_size=518, depth=4))
    torch.save(ckpt, tmp_path / "ckpt.pth")
    assert convert_tool().main([str(tmp_path / "ckpt.pth")]) == 0
    model = create_adapter(adapter, depth=4)
    missing, unexpected = model.load_backbone(torch.load(tmp_path / "ckpt_14to16.pth", weights_only=True))
    assert missing == [] and unexpected == ["norm.bias", "norm.weight"]
    assert model.vit.pos_embed.shape[1] == ckpt["pos_embed"].shape[1] - ("reg4" in name)  # 37x37 as is


def test_torchvision_mask_rcnn_trains_on_the_adapter_with_fpn():
    """The neck's output is what torchvision's MaskRCNN takes (its transform pads images to multiples of 32)."""
    from torchvision.models.detection import MaskRCNN
    torch.manual_seed(0)
    detector = MaskRCNN(create_adapter("adapter_small", **TINY, fpn_channels=16), num_classes=3, min_size=64,
                        max_size=96, rpn_batch_size_per_image=32, box_batch_size_per_image=16)
    masks = torch.zeros(2, 70, 90, dtype=torch.uint8)
    masks[0, 10:30, 20:50], masks[1, 40:60, 5:25] = 1, 1
    target = {"boxes": torch.tensor([[20.0, 10, 50, 30], [5, 40, 25, 60]]), "labels": torch.tensor([1, 2]),
              "masks": masks}
    losses = detector([torch.rand(3, 70, 90)], [target])
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} == set(losses)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert detector.backbone.body.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    detector.eval()
    with torch.no_grad():
        out = detector([torch.rand(3, 70, 90)])
    assert out[0]["masks"].shape[-2:] == (70, 90)


def test_finetune_loads_the_14to16_file_with_layer_scale_folded(tmp_path):
    """Through main_finetune's --finetune loader: gamma1/gamma2 end up inside attn.proj / mlp.fc2."""
    import models
    from models.backbone import load_finetune_weights
    from util.checkpoint import load_checkpoint
    dinov2 = timm_dinov2("vit_small_patch14_dinov2", img_size=56, depth=4)
    converted = convert_tool().dinov2_14to16(dinov2_original(dinov2))
    torch.save(converted, tmp_path / "dinov2_14to16.pth")
    model = models.create_model("vit_small_patch16", img_size=64, num_classes=5, depth=4, global_pool="avg")
    load_finetune_weights(model, load_checkpoint(tmp_path / "dinov2_14to16.pth"), global_pool=True)
    gamma = converted["blocks.3.gamma2"]
    torch.testing.assert_close(model.blocks[3].mlp.fc2.weight, converted["blocks.3.mlp.fc2.weight"] * gamma[:, None])
    torch.testing.assert_close(model.blocks[3].mlp.fc2.bias, converted["blocks.3.mlp.fc2.bias"] * gamma)


@pytest.mark.parametrize("name, millions", [("adapter_small", 48), ("adapter_base", 120)])
def test_parameter_counts_match_the_seed_table(name, millions):
    """Seed 002's #Param column (Mask R-CNN + FPN on ViT-Adapter-S / B, 80 COCO classes): 48M and 120M."""
    from torchvision.models.detection import MaskRCNN
    with torch.device("meta"):  # shapes only: no memory, no init cost
        detector = MaskRCNN(create_adapter(name, fpn_channels=256), num_classes=81)
    assert round(sum(p.numel() for p in detector.parameters()) / 1e6) == millions


def test_run_sh_runs_the_adapter_recipes_with_the_seeds_overrides(tmp_path):
    """Seed 002's rows as run.sh tasks: the architecture completes within the recipe's family, mm-style keys map."""
    import subprocess
    job = f"test_adapter_{tmp_path.name}"
    try:
        ckpt = tmp_path / "dinov2_vitb14_pretrain_14to16.pth"
        ckpt.write_bytes(b"")  # --dry_run checks that the checkpoint and the data exist
        res = subprocess.run(["bash", str(ROOT / "run.sh"), job, "mask_rcnn_dinov2_adapter_small_fpn_3x_coco", "base",
                              "0", str(ckpt), f"data_path={tmp_path}",
                              "optimizer.paramwise_cfg.layer_decay_rate=0.75", "--dry_run=config"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        import yaml
        resolved = yaml.safe_load(res.stdout[res.stdout.index("\n") + 1:])
        assert (resolved["model"], resolved["layer_decay"], resolved["epochs"], resolved["lr_steps"]) == \
            ("adapter_dinov2_base", 0.75, 36, [27, 33])
        assert resolved["finetune"] == str(ckpt)
        help_text = subprocess.run(["bash", str(ROOT / "run.sh"), "--help"], capture_output=True, text=True).stdout
        for size in ("small", "base", "large"):
            assert f"mask_rcnn_dinov2_adapter_{size}_fpn_3x_coco" in help_text
    finally:
        import shutil
        shutil.rmtree(ROOT / "output" / job, ignore_errors=True)


def _detect_argv(out, *extra):
    return ["--config", "configs/detect/demo_adapter.yaml", "--output_dir", str(out), "--input_size", "64",
            "--scene_images", "4", "2", "--epochs", "1", "--batch_size", "2", "--rois_per_image", "32",
            "--proposals_per_image", "100", "--anchor_sizes", "4", "8", "16", "32", "64", "--out_channels", "32",
            *extra]


def test_main_detect_builds_the_adapter_with_a_raw_dinov2_file_and_trains(tmp_path, monkeypatch):
    import main_detect
    from models.detectors import detector_layer_id
    from util.args import parse_args
    from util.param_groups import param_groups
    raw = dinov2_original(timm_dinov2("vit_small_patch14_reg4_dinov2", img_size=518))
    torch.save(raw, tmp_path / "dinov2_vits14_reg4_pretrain.pth")  # not converted: loads as is too
    args = parse_args(main_detect.build_parser(), _detect_argv(tmp_path, "--model", "adapter_dinov2_small_reg4",
                                                               "--window_size", "14"))
    model = main_detect.build_model(args, 3, finetune=str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"))
    body = model.backbone.body
    assert torch.equal(body.vit.blocks[7].ls1.gamma, raw["blocks.7.ls1.gamma"])  # LayerScale kept, not folded
    assert torch.equal(body.vit.reg_token, raw["register_tokens"]) and body.window_blocks == set(range(12)) - {
        2, 5, 8, 11}
    groups = param_groups(model, weight_decay=0.05, unit_of=partial(detector_layer_id, backbone=model.backbone),
                          layer_decay=0.7, num_layers=model.backbone.depth + 1)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale["backbone.body.vit.blocks.0.attn.qkv.weight"] == pytest.approx(0.7 ** 12)
    assert scale["backbone.body.spm.fc1.weight"] == scale["backbone.fpn.layer_blocks.0.0.weight"] == 1.0
    # one epoch of the demo recipe (tiny adapter) through the shared loop: log.txt gets the AP keys
    monkeypatch.chdir(ROOT)
    main_detect.main(_detect_argv(tmp_path / "run"))
    line = json.loads((tmp_path / "run" / "log.txt").read_text().splitlines()[0])
    assert {"val_bbox_AP", "val_segm_AP", "train_loss_mask"} <= set(line) and np.isfinite(line["train_loss"])


def test_upernet_takes_the_adapter_as_it_takes_the_pyramid():
    """The paper's ADE20K setting (UperNet on the adapter's four levels) through models/seg_heads.py as is."""
    from models.seg_heads import UperNetSegmentor
    torch.manual_seed(0)
    model = UperNetSegmentor(ViTAdapter(**TINY), 5, channels=16, aux_channels=8).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["seg"].shape == (2, 5, 16, 16) and out["aux"].shape == (2, 5, 4, 4)
    (out["seg"].mean() + out["aux"].mean()).backward()
    assert model.backbone.vit.blocks[0].attn.qkv.weight.grad is not None
    assert model.layer_id("backbone.vit.blocks.1.norm1.weight") == 2 and model.layer_id("decode_head.x") == 5


def test_main_segment_builds_upernet_on_the_adapter(tmp_path):
    import main_segment
    from util.args import parse_args
    raw = dinov2_original(timm_dinov2("vit_small_patch14_dinov2", img_size=518))
    torch.save(raw, tmp_path / "dinov2_vits14_pretrain.pth")
    args = parse_args(main_segment.build_parser(), ["--config", "configs/segment/demo.yaml", "--model",
                                                     "adapter_dinov2_small", "--output_dir", str(tmp_path)])
    model = main_segment.build_model(args, finetune=str(tmp_path / "dinov2_vits14_pretrain.pth"))
    assert torch.equal(model.backbone.vit.blocks[4].ls2.gamma, raw["blocks.4.ls2.gamma"])
    assert model.depth == 12 and model.layer_id("backbone.spm.fc1.weight") == 13
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64))["seg"].shape[-2:] == (16, 16)


@pytest.mark.slow
def test_short_training_beats_the_untrained_adapter(tmp_path, monkeypatch):
    """The tiny ViT-Adapter Mask R-CNN (demo_adapter.yaml, from scratch), 80 updates on 40 synthetic
    128-px scenes (one class, one object), ends clearly above the untrained model's box and mask AP (0). About 30 s
    on a shared 2-core CPU; deterministic (box AP 17.4, mask AP 21.0 here), thresholds leave room for rounding."""
    from detect_runs import untrained_and_trained
    monkeypatch.chdir(ROOT)
    untrained, trained = untrained_and_trained(tmp_path, [
        "--config", "configs/detect/demo_adapter.yaml", "--epochs", "4", "--lr", "1e-3", "--lr_steps", "3",
        "--warmup_iters", "10", "--batch_size", "2", "--rois_per_image", "64", "--eval_every", "4", "--vis_every", "0"])
    assert untrained["bbox_AP"] < 1 and untrained["segm_AP"] < 1
    assert trained["bbox_AP"] > untrained["bbox_AP"] + 5 and trained["segm_AP"] > untrained["segm_AP"] + 5
    assert trained["bbox_AP50"] > 15
