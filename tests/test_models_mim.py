"""Tests of models/mim.py: MAE and LocalMIM losses against independent numpy computations, shapes, init,
checkpoint key names, freezable units and the frozen-prefix forward."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from models import create_model
from models.mim import default_stage_blocks
from models.pos_embed import get_2d_sincos_pos_embed
from models.targets import HOGTarget, normalize_patches, patchify


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_mim(**kwargs) -> nn.Module:
    arch = dict(img_size=32, depth=4, embed_dim=32, num_heads=2, decoder_embed_dim=32, decoder_num_heads=2)
    return create_model("MIM_vit_tiny_patch16", **{**arch, **kwargs})


def tiny_mae(**kwargs) -> nn.Module:
    arch = dict(img_size=32, depth=4, embed_dim=32, num_heads=2, decoder_embed_dim=32, decoder_depth=2,
                decoder_num_heads=2)
    return create_model("mae_vit_tiny_patch16", **{**arch, **kwargs})


# ---- losses and shapes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_matches_independent_masked_mse(norm_pix):
    torch.manual_seed(0)
    model = tiny_mae(norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 32, 32)
    out = model(imgs, mask_ratio=0.5, generator=gen(0))
    p, grid = 16, 2
    assert out["preds"][0].shape == (2, 4, p * p * 3) and out["scales"] == [1.0]
    pred, mask, img = out["preds"][0].detach().double().numpy(), out["mask"].numpy(), imgs.double().numpy()
    assert mask.sum(axis=1).tolist() == [2.0, 2.0]
    total = count = 0.0
    for b in range(2):
        for i in range(grid):
            for j in range(grid):
                patch = np.array([img[b, c, i * p + y, j * p + x]
                                  for y in range(p) for x in range(p) for c in range(3)])
                if norm_pix:
                    patch = (patch - patch.mean()) / math.sqrt(patch.var(ddof=1) + 1e-6)
                np.testing.assert_allclose(out["targets"][0][b, i * grid + j].numpy(), patch, rtol=1e-5, atol=1e-5)
                total += ((pred[b, i * grid + j] - patch) ** 2).mean() * mask[b, i * grid + j]
                count += mask[b, i * grid + j]
    assert out["loss"].item() == pytest.approx(total / count, rel=1e-5)
    assert len(out["stage_losses"]) == 1 and torch.equal(out["loss"], out["stage_losses"][0])


def _rescale_reference(mask: np.ndarray, scale: float, grid: int) -> np.ndarray:
    cells = mask.reshape(grid, grid)
    if scale >= 1:
        return np.kron(cells, np.ones((int(scale), int(scale)))).reshape(-1)
    n = round(1 / scale)
    return np.array([[cells[i * n:(i + 1) * n, j * n:(j + 1) * n].mean() for j in range(grid // n)]
                     for i in range(grid // n)]).reshape(-1)


def test_localmim_shapes_and_loss_match_independent_computation():
    torch.manual_seed(0)
    model = tiny_mim(img_size=64)  # grid 4: LocalMIM's ViT-B/16 shapes scaled down from 14 to 4
    imgs = torch.randn(2, 3, 64, 64)
    out = model(imgs, generator=gen(1))
    assert out["scales"] == [4.0, 2.0, 1.0, 0.5] and out["stages"] == [0, 1, 2, 3]
    assert [tuple(t.shape) for t in out["preds"]] == [(2, 256, 27), (2, 64, 27), (2, 16, 27), (2, 4, 27)]
    assert [tuple(t.shape) for t in out["targets"]] == [(2, 256, 27), (2, 64, 27), (2, 16, 27), (2, 4, 27)]
    latents, _, _ = model.forward_encoder(imgs, generator=gen(1), taps=model.stage_blocks)
    assert [tuple(x.shape) for x in latents] == [(2, 1 + 4, 32)] * 4
    mask = out["mask"].numpy()
    total = 0.0
    for k, (scale, pool) in enumerate(zip(out["scales"], (4, 8, 16, 32))):
        torch.testing.assert_close(out["targets"][k], HOGTarget(9, pools=(pool,))(imgs)[0])
        pred, target = out["preds"][k].detach().double().numpy(), out["targets"][k].double().numpy()
        stage = 0.0
        for b in range(2):
            m = _rescale_reference(mask[b], scale, 4)
            np.testing.assert_array_equal(out["masks"][k][b].numpy(), m)
            stage_num = (((pred[b] - target[b]) ** 2).mean(axis=-1) * m).sum()
            stage += stage_num
        stage /= sum(_rescale_reference(mask[b], scale, 4).sum() for b in range(2))
        assert out["stage_losses"][k].item() == pytest.approx(stage, rel=1e-5)
        total += stage
    assert out["loss"].item() == pytest.approx(total, rel=1e-5)


def test_localmim_pixel_variant_widths_and_targets():
    model = tiny_mim(img_size=64, target="pixel", norm_pix_loss=True)
    imgs = torch.randn(2, 3, 64, 64)
    out = model(imgs, generator=gen(0))
    assert [tuple(t.shape) for t in out["preds"]] == [(2, 256, 48), (2, 64, 192), (2, 16, 768), (2, 4, 3072)]
    for target, region in zip(out["targets"], (4, 8, 16, 32)):
        torch.testing.assert_close(target, normalize_patches(patchify(imgs, region)))


def test_forward_under_cpu_autocast_keeps_fp32_targets():
    model = tiny_mim()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32), generator=gen(0))
    assert torch.isfinite(out["loss"]) and all(t.dtype == torch.float32 for t in out["targets"])


# ---- init and key names --------------------------------------------------------------------------------------

def test_init_follows_spec():
    torch.manual_seed(0)
    model = create_model("MIM_vit_tiny_patch16", img_size=64, depth=4)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            bound = math.sqrt(6.0 / (module.in_features + module.out_features))
            assert module.weight.abs().max() <= bound and module.weight.abs().max() > 0.8 * bound, name
            assert module.bias.eq(0).all(), name
        elif isinstance(module, nn.LayerNorm):
            assert module.weight.eq(1).all() and module.bias.eq(0).all(), name
    weight = model.patch_embed.proj.weight  # Xavier on the [D, 3*p*p] view
    bound = math.sqrt(6.0 / (3 * 16 * 16 + 192))
    assert weight.abs().max() <= bound and weight.abs().max() > 0.8 * bound
    tokens = torch.cat([model.cls_token.flatten()] + [d.mask_token.flatten() for d in model.decoder])
    assert 0.015 < tokens.std().item() < 0.025
    assert "pos_embed" not in dict(model.named_parameters()) and "pos_embed" in model.state_dict()
    assert torch.equal(model.pos_embed[0], get_2d_sincos_pos_embed(192, 4))
    assert torch.equal(model.decoder[0].pos_embed[0], get_2d_sincos_pos_embed(128, 4))


def test_checkpoint_key_names_follow_mae_and_localmim():
    mae_keys = set(tiny_mae().state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "mask_token", "decoder_pos_embed",
            "decoder_embed.weight", "decoder_blocks.1.attn.qkv.weight", "decoder_norm.bias",
            "decoder_pred.weight"} <= mae_keys
    mim_keys = set(tiny_mim().state_dict())
    assert {"norm.0.weight", "norm.3.bias", "decoder.0.embed.weight", "decoder.0.mask_token", "decoder.0.pos_embed",
            "decoder.0.blocks.0.mlp.fc2.weight", "decoder.0.norm.weight", "decoder.0.pred.0.weight",
            "decoder.0.pred.1.weight", "decoder.0.pred.3.weight", "decoder.0.pred.4.weight", "decoder.1.pred.0.weight",
            "decoder.1.pred.1.weight", "decoder.2.pred.0.weight", "decoder.3.pred.1.weight"} <= mim_keys
    assert "norm.weight" not in mim_keys and not any(k.startswith(("hog", "target")) for k in mim_keys)


# ---- freezable units -----------------------------------------------------------------------------------------

def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()] + list(model.state_dict())


def _encoder_unit_by_hand(name: str, pe_unit: int | None, offset: int) -> int | None:
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + offset
    return pe_unit


def test_units_of_localmim_depth12():
    model = tiny_mim(depth=12)
    assert model.num_units == 13 and model.stage_blocks == [1, 3, 9, 11]
    stage_units = [2, 4, 10, 12]  # ViTFreeze ViT-B: stages fed by blocks 1, 3, 9, 11
    for name in _names(model):
        head = name.split(".")[0]
        expected = stage_units[int(name.split(".")[1])] if head in ("norm", "decoder") else \
            _encoder_unit_by_hand(name, 0, 1)
        assert model.unit_of(name) == expected, name
    with pytest.raises(KeyError):
        model.unit_of("blocks.12.norm1.weight")


def test_units_without_freezing_patch_embed():
    model = tiny_mim(depth=12, freeze_patch_embed=False)
    assert model.num_units == 12
    for name in _names(model):
        head = name.split(".")[0]
        expected = [1, 3, 9, 11][int(name.split(".")[1])] if head in ("norm", "decoder") else \
            _encoder_unit_by_hand(name, None, 0)
        assert model.unit_of(name) == expected, name


def test_units_of_mae_decoder_are_none():
    model = tiny_mae()
    assert model.num_units == 5
    for name in _names(model):
        expected = _encoder_unit_by_hand(name, 0, 1) if name.split(".")[0] in (
            "patch_embed", "cls_token", "pos_embed", "blocks") else None
        assert model.unit_of(name) == expected, name


def test_units_are_in_forward_order():
    model = tiny_mim()
    calls: list[int] = []
    modules = [("patch_embed.proj.weight", model.patch_embed)] + [
        (f"blocks.{i}.norm1.weight", block) for i, block in enumerate(model.blocks)]
    for name, module in modules:
        module.register_forward_hook(lambda *_, unit=model.unit_of(name): calls.append(unit))
    model(torch.randn(1, 3, 32, 32))
    assert calls == list(range(model.num_units))


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_num_frozen_keeps_the_loss_and_cuts_gradients_of_frozen_units(k):
    torch.manual_seed(0)
    model = tiny_mim(scales=(1.0, 0.5), stage_blocks=(2, 3))  # stage units 3 and 4: both train for k <= 3
    imgs = torch.randn(2, 3, 32, 32)
    reference = model(imgs, generator=gen(5))
    out = model(imgs, num_frozen=k, generator=gen(5))
    assert torch.equal(out["mask"], reference["mask"])
    assert torch.equal(out["loss"].detach(), reference["loss"].detach())
    out["loss"].backward()
    for name, param in model.named_parameters():
        unit = model.unit_of(name)
        assert (param.grad is None) == (unit is not None and unit < k), name


def test_mae_num_frozen_all_units_still_trains_decoder():
    torch.manual_seed(0)
    model = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    reference = model(imgs, generator=gen(2))["loss"].detach()
    for k in range(model.num_units + 1):
        model.zero_grad(set_to_none=True)
        out = model(imgs, num_frozen=k, generator=gen(2))
        assert torch.equal(out["loss"].detach(), reference)
        out["loss"].backward()
        assert all((p.grad is None) == (model.unit_of(n) is not None and model.unit_of(n) < k)
                   for n, p in model.named_parameters())
    with pytest.raises(ValueError):
        model(imgs, num_frozen=model.num_units + 1)


def test_localmim_skips_stages_fed_by_frozen_blocks(monkeypatch):
    torch.manual_seed(0)
    model = tiny_mim()  # depth 4: stages fed by blocks 0..3 = units 1..4
    imgs = torch.randn(2, 3, 32, 32)
    full = model(imgs, generator=gen(3))
    pools: list[int] = []
    original_pool = HOGTarget.pool
    monkeypatch.setattr(HOGTarget, "pool",
                        staticmethod(lambda hist, pool: pools.append(pool) or original_pool(hist, pool)))
    out = model(imgs, num_frozen=2, generator=gen(3))
    assert out["stages"] == [1, 2, 3] and out["scales"] == [2.0, 1.0, 0.5] and pools == [8, 16, 32]
    assert torch.equal(out["mask"], full["mask"])
    for got, expected in zip(out["stage_losses"], full["stage_losses"][1:]):
        assert torch.equal(got.detach(), expected.detach())
    assert out["loss"].item() == pytest.approx(sum(s.item() for s in full["stage_losses"][1:]), rel=1e-6)
    out["loss"].backward()
    for name, param in model.named_parameters():
        if name.startswith(("norm.0.", "decoder.0.", "blocks.0.", "patch_embed", "cls_token")):
            assert param.grad is None, name
        else:
            assert param.grad is not None, name
    assert model(imgs, num_frozen=4)["stages"] == [3]
    with pytest.raises(ValueError):
        model(imgs, num_frozen=5)  # every stage frozen


def test_frozen_blocks_keep_gradient_path_to_unfrozen_patch_embed():
    torch.manual_seed(0)
    model = tiny_mim(freeze_patch_embed=False, scales=(1.0, 0.5), stage_blocks=(2, 3))
    imgs = torch.randn(2, 3, 32, 32)
    reference = model(imgs, generator=gen(4))["loss"].detach()
    for block in model.blocks[:2]:  # what the Freezer does for units 0 and 1
        block.requires_grad_(False)
    out = model(imgs, num_frozen=2, generator=gen(4))
    assert torch.equal(out["loss"].detach(), reference)
    out["loss"].backward()
    assert model.patch_embed.proj.weight.grad is not None and model.cls_token.grad is not None
    assert all(p.grad is None for p in model.blocks[:2].parameters())
    assert all(p.grad is not None for p in model.blocks[2:].parameters())


# ---- stage placement -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth, expected", [(12, [1, 3, 9, 11]), (24, [1, 3, 21, 23]), (32, [1, 3, 29, 31]),
                                             (7, [1, 3, 4, 6]), (6, [0, 2, 3, 5]), (5, [0, 1, 3, 4]),
                                             (4, [0, 1, 2, 3])])
def test_default_stage_blocks(depth, expected):
    assert default_stage_blocks(depth, 4) == expected
    assert default_stage_blocks(depth, 1) == [depth - 1]


def test_bad_stage_blocks_raise():
    with pytest.raises(ValueError):
        default_stage_blocks(3, 4)
    with pytest.raises(ValueError):
        tiny_mim(stage_blocks=(0, 1, 2, 2))
    with pytest.raises(ValueError):
        tiny_mim(stage_blocks=(0, 1, 2), scales=(4, 2, 1))  # last stage must be the last block
