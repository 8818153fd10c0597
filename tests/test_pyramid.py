"""ViTFeaturePyramid (models/pyramid.py) and the synthetic scenes (util/data/scenes.py)."""
from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from models.convert import resize_patch_embed, to_timm_vit
from models.pyramid import ViTFeaturePyramid, window_partition, window_unpartition
from util.data.scenes import SCENE_CLASSES, mask_to_rle, render_scene, rle_to_mask, write_ade20k, write_coco
from util.param_groups import param_groups


@pytest.mark.parametrize("size, kwargs", [(512, {}), (1024, dict(extra_pool=True, window_size=14,
                                                                  global_blocks=(2, 5, 8, 11)))])
def test_vit_base_pyramid_shapes(size, kwargs):
    with torch.device("meta"):  # shapes only: no memory, no compute
        model = ViTFeaturePyramid("vit_base_patch16", img_size=size, **kwargs)
        out = model(torch.empty(1, 3, size, size))
    expected = {"0": 4, "1": 8, "2": 16, "3": 32, **({"pool": 64} if kwargs else {})}
    assert list(out) == list(expected)
    for key, stride in expected.items():
        assert tuple(out[key].shape) == (1, 256, size // stride, size // stride), key
    assert model.out_channels == 256 and model.strides == tuple(expected.values())
    assert model.vit.pos_embed.shape[1] == (size // 16) ** 2 + (0 if kwargs else 1)
    # ViT-B encoder (86 M without head) + the pyramid
    encoder = sum(p.numel() for p in model.vit.parameters())
    assert abs(encoder - 85.8e6 - (size // 16) ** 2 * 768 + 196 * 768) < 0.2e6


def test_tiny_pyramid_non_square_and_gradients():
    model = ViTFeaturePyramid("vit_tiny_patch16", img_size=64, out_channels=32, drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 96)  # detection batches are padded, not square: pos embed resampled on the fly
    out = model(x)
    assert [tuple(v.shape) for v in out.values()] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]
    sum(v.square().mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())  # nothing unused (DDP would stall)
    # the stride-16 level sees the last block's tokens: equal to running timm's blocks by hand
    vit = model.vit
    with torch.no_grad():
        tokens = vit.blocks(vit._pos_embed(vit.patch_embed(x)))[:, 1:]
        ref = tokens.transpose(1, 2).reshape(2, -1, 4, 6)
        torch.testing.assert_close(model.forward_tokens(x)[2], ref)


def test_window_partition_round_trip_and_window_attention_is_local():
    x = torch.randn(2, 5, 7, 8)
    windows, padded = window_partition(x, 3)
    assert windows.shape == (2 * 2 * 3, 9, 8) and padded == (6, 9)
    torch.testing.assert_close(window_unpartition(windows, 3, padded, (5, 7)), x)
    model = ViTFeaturePyramid("vit_tiny_patch16", img_size=64, out_channels=16, drop_path_rate=0.0, window_size=2,
                              depth=2).eval()
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[..., :32, :32] += torch.randn(1, 3, 32, 32)  # changes the top-left 2x2 patch windows only
    with torch.no_grad():
        a, b = model.forward_tokens(x)[2], model.forward_tokens(y)[2]
    changed = (a - b).abs().amax(dim=1)[0] > 1e-6
    assert changed[:2, :2].all() and not changed[2:].any() and not changed[:, 2:].any()
    glob = ViTFeaturePyramid("vit_tiny_patch16", img_size=64, out_channels=16, drop_path_rate=0.0, window_size=2,
                             global_blocks=(1,), depth=2).eval()
    with torch.no_grad():
        changed = (glob.forward_tokens(x)[2] - glob.forward_tokens(y)[2]).abs().amax(dim=1)[0] > 1e-6
    assert changed.all()


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = ViTFeaturePyramid("vit_tiny_patch16", img_size=32, out_channels=16, drop_path_rate=0.0, depth=2)
    b = ViTFeaturePyramid("vit_tiny_patch16", img_size=32, out_channels=16, drop_path_rate=0.0, depth=2,
                          grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for m in (a, b):
        sum(v.sum() for v in m(x).values()).backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_bad_strides_and_sizes_raise():
    with pytest.raises(ValueError, match="strides"):
        ViTFeaturePyramid("vit_tiny_patch16", img_size=32, strides=(4, 64), depth=1)
    model = ViTFeaturePyramid("vit_tiny_patch16", img_size=32, out_channels=8, depth=1)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.zeros(1, 3, 40, 36))


def fake_dinov2_small(grid: int = 37) -> tuple[dict, VisionTransformer]:
    """A DINOv2-style ViT-S/14 state dict at 518 px (37 x 37 grid): LayerScale, mask token."""
    torch.manual_seed(0)
    dino = VisionTransformer(img_size=14 * grid, patch_size=14, embed_dim=384, depth=2, num_heads=6, init_values=1.0,
                             num_classes=0)
    with torch.no_grad():
        for name, p in dino.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.1, 2.0)
    sd = {k: v.clone() for k, v in dino.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, 384)
    return {"teacher": sd}, dino


@pytest.mark.parametrize("window", [0, 4])
def test_dinov2_14_to_16_checkpoint_loads_into_pyramid(window):
    ckpt, dino = fake_dinov2_small()
    state, source = to_timm_vit(ckpt)
    assert source == "dinov2"
    model = ViTFeaturePyramid("vit_small_patch16", img_size=128, depth=2, window_size=window)
    missing, unexpected = model.load_backbone(state)
    assert missing == [] and set(unexpected) <= {"norm.weight", "norm.bias", "cls_token"}
    vit = model.vit
    torch.testing.assert_close(vit.patch_embed.proj.weight, resize_patch_embed(dino.patch_embed.proj.weight, 16))
    prefix = 1 if window == 0 else 0
    ref = resample_abs_pos_embed(dino.pos_embed[:, 1 - prefix:], [8, 8], [37, 37], num_prefix_tokens=prefix,
                                 interpolation="bicubic", antialias=False)
    torch.testing.assert_close(vit.pos_embed, ref)
    # LayerScale folded into the projection: attn.proj.weight = gamma1[:, None] * W
    torch.testing.assert_close(vit.blocks[1].attn.proj.weight,
                               dino.blocks[1].ls1.gamma[:, None] * dino.blocks[1].attn.proj.weight)


def test_layer_decay_groups_cover_every_parameter_once():
    model = ViTFeaturePyramid("vit_tiny_patch16", img_size=32, out_channels=16, depth=3)
    depth = model.depth
    unit_of = lambda n: (lambda i: None if i > depth else i)(model.layer_id(n))  # noqa: E731
    groups = param_groups(model, weight_decay=0.05, unit_of=unit_of, layer_decay=0.65, num_layers=depth + 1,
                          no_weight_decay=model.no_weight_decay())
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()) and len(names) == len(set(names))
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale["vit.pos_embed"] == pytest.approx(0.65 ** 4) and scale["vit.cls_token"] == pytest.approx(0.65 ** 4)
    assert scale["vit.blocks.0.attn.qkv.weight"] == pytest.approx(0.65 ** 3)
    assert scale["vit.blocks.2.mlp.fc2.weight"] == pytest.approx(0.65)
    assert scale["outputs.0.1.0.weight"] == 1.0 and scale["samplers.0.0.weight"] == 1.0
    decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert decay["vit.pos_embed"] == 0 and decay["vit.blocks.0.norm1.weight"] == 0
    assert decay["vit.blocks.0.attn.qkv.weight"] == 0.05


# ---- synthetic scenes ------------------------------------------------------------------------------------------

def test_scene_masks_are_exact_and_consistent():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = render_scene(48, rng, max_objects=4)
        sem = scene["semantic"]
        union = np.zeros_like(sem, dtype=bool)
        for inst in scene["instances"]:
            mask = inst["mask"]
            assert not (union & mask).any()  # visible instance masks are disjoint
            union |= mask
            assert (sem[mask] == inst["label"] + 1).all()
            rows, cols = np.nonzero(mask)
            assert inst["box"] == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        assert ((sem > 0) == union).all()
    again = render_scene(48, np.random.default_rng(0))
    first = render_scene(48, np.random.default_rng(0))
    assert (again["image"] == first["image"]).all()


def test_rle_round_trip_and_pycocotools_agree():
    mask = np.zeros((5, 4), dtype=bool)
    mask[0, 0] = mask[1:4, 2] = True
    rle = mask_to_rle(mask)
    assert rle == {"counts": [0, 1, 10, 3, 6], "size": [5, 4]}  # column-major, starts with a background run
    assert (rle_to_mask(rle) == mask).all()
    coco_mask = pytest.importorskip("pycocotools.mask")
    decoded = coco_mask.decode(coco_mask.frPyObjects(rle, 5, 4))
    assert (decoded.astype(bool) == mask).all()


def test_writers_layouts(tmp_path):
    names = write_ade20k(tmp_path / "ade", 3, 2, 32, seed=1)
    assert names == list(SCENE_CLASSES)
    for split, n in (("training", 3), ("validation", 2)):
        images = sorted((tmp_path / "ade" / "images" / split).glob("*.jpg"))
        labels = sorted((tmp_path / "ade" / "annotations" / split).glob("*.png"))
        assert len(images) == len(labels) == n
        assert [p.stem for p in images] == [p.stem for p in labels]
        label = np.array(Image.open(labels[0]))
        assert label.dtype == np.uint8 and label.shape == (32, 32) and label.max() <= len(SCENE_CLASSES)
    write_coco(tmp_path / "coco", 2, 3, 32, seed=1, num_classes=3)
    data = json.loads((tmp_path / "coco" / "annotations" / "instances_val2017.json").read_text())
    assert [c["id"] for c in data["categories"]] == [1, 2, 3] and len(data["images"]) == 3
    for ann in data["annotations"]:
        mask = rle_to_mask(ann["segmentation"])
        assert ann["area"] == mask.sum() and 1 <= ann["category_id"] <= 3
        x, y, w, h = ann["bbox"]
        rows, cols = np.nonzero(mask)
        assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    assert all((tmp_path / "coco" / "val2017" / im["file_name"]).is_file() for im in data["images"])


def test_beit_neck_matches_beit_layout():
    """BEiT / MAE segmentation neck: fpn1 = ConvT + BN + GELU + ConvT, fpn2 = ConvT, fpn3 = identity, fpn4 = max-pool,
    all at the ViT width, no output convs; levels read blocks 3, 5, 7, 11."""
    with torch.device("meta"):
        model = ViTFeaturePyramid("vit_base_patch16", img_size=512, out_channels=None, tap_blocks=(3, 5, 7, 11),
                                  neck="beit")
        out = model(torch.empty(2, 3, 512, 512))
    assert [tuple(v.shape) for v in out.values()] == [(2, 768, 128, 128), (2, 768, 64, 64), (2, 768, 32, 32),
                                                      (2, 768, 16, 16)]
    neck = sum(p.numel() for p in model.samplers.parameters()) + sum(p.numel() for p in model.outputs.parameters())
    assert neck == 3 * (768 * 768 * 4 + 768) + 2 * 768  # three 2x2 ConvT(768, 768) with bias + one BatchNorm
    with pytest.raises(ValueError, match="keeps the ViT width"):
        ViTFeaturePyramid("vit_tiny_patch16", img_size=32, out_channels=64, neck="beit", depth=1)
    small = ViTFeaturePyramid("vit_tiny_patch16", img_size=32, tap_blocks=(0, 1, 2, 3), neck="beit", depth=4).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        vit = small.vit
        tokens = vit._pos_embed(vit.patch_embed(x))
        taps = []
        for block in vit.blocks:
            tokens = block(tokens)
            taps.append(tokens[:, 1:].transpose(1, 2).reshape(1, 192, 2, 2))
        out = small(x)
        torch.testing.assert_close(out["2"], taps[2])
        torch.testing.assert_close(out["3"], torch.nn.functional.max_pool2d(taps[3], 2))
        torch.testing.assert_close(out["1"], small.samplers[1](taps[1]))
