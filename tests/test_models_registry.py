"""Tests of the model registry and factories: every model builds and trains, argument validation, and the
encoder exports strict-load into timm's VisionTransformer."""
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from models import MODELS, create_model, list_models, register_model

# masked image models (mae_*, MIM_*); the classification backbones (vit_*) are tested in test_vit.py, the
# ViT-Adapter backbones (adapter_*) in test_adapter.py
SMALL_MODELS = [name for name in list_models() if ("tiny" in name or "small" in name)
                and not name.startswith(("vit_", "adapter_"))]
EXPECTED = {"mae_vit_tiny_patch16", "mae_vit_small_patch16", "mae_vit_base_patch16", "mae_vit_large_patch16",
            "mae_vit_huge_patch14", "MIM_vit_tiny_patch16", "MIM_vit_small_patch16", "MIM_vit_base_patch16",
            "MIM_vit_large_patch16", "vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16",
            "vit_large_patch16", "vit_huge_patch14"} | {
            f"adapter_{s}" for s in ("tiny", "small", "base", "large")} | {
            f"adapter_dinov2_{s}{r}" for s in ("small", "base", "large", "giant") for r in ("", "_reg4")}


def test_registry_lists_the_models():
    assert set(list_models()) == EXPECTED == set(MODELS)
    assert list_models() == sorted(list_models())


def test_unknown_name_lists_valid_names_and_closest_match():
    with pytest.raises(ValueError) as err:
        create_model("nope")
    assert all(name in str(err.value) for name in EXPECTED)
    with pytest.raises(ValueError, match="Did you mean 'mae_vit_base_patch16'"):
        create_model("mae_vit_base_patch61")


def test_duplicate_registration_raises():
    def mae_vit_tiny_patch16():
        raise AssertionError("never called")

    with pytest.raises(ValueError):
        register_model(mae_vit_tiny_patch16)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_models_train_every_parameter(name):
    torch.manual_seed(0)
    # One call site for every model, as main_pretrain uses it.
    model = create_model(name, img_size=32, depth=4, norm_pix_loss=False, hog_nbins=9, target=None)
    out = model(torch.randn(2, 3, 32, 32), mask_ratio=0.75)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    for param_name, param in model.named_parameters():
        assert param.requires_grad, param_name
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
    assert (model.patch_size, model.grid_size, model.depth) == (16, 2, 4)


@pytest.mark.parametrize("name, dims", [
    ("mae_vit_base_patch16", (16, 768, 12, 512, 16)), ("mae_vit_large_patch16", (16, 1024, 16, 512, 16)),
    ("mae_vit_huge_patch14", (14, 1280, 16, 512, 16)), ("MIM_vit_base_patch16", (16, 768, 12, 256, 8)),
    ("MIM_vit_large_patch16", (16, 1024, 16, 256, 8)), ("MIM_vit_small_patch16", (16, 384, 6, 256, 8)),
    ("mae_vit_small_patch16", (16, 384, 6, 256, 8)), ("MIM_vit_tiny_patch16", (16, 192, 3, 128, 4)),
    ("mae_vit_tiny_patch16", (16, 192, 3, 128, 4))])
def test_factory_hyper_parameters(name, dims):
    patch, width, heads, dec_width, dec_heads = dims
    small = dict(img_size=2 * patch, depth=1)
    with torch.device("meta"):  # widths and heads only: no weights drawn
        model = create_model(name, **small, **({"scales": (1.0,)} if name.startswith("MIM") else {"decoder_depth": 1}))
    block = model.decoder[0].blocks[0] if name.startswith("MIM") else model.decoder_blocks[0]
    assert (model.patch_size, model.embed_dim, model.blocks[0].attn.num_heads) == (patch, width, heads)
    assert (block.attn.qkv.in_features, block.attn.num_heads) == (dec_width, dec_heads)
    assert model.blocks[0].mlp.fc1.out_features == 4 * width and model.blocks[0].attn.qkv.bias is not None
    assert model.blocks[0].norm1.eps == 1e-6


def test_validation_errors():
    with pytest.raises(ValueError, match="pixels"):
        create_model("mae_vit_tiny_patch16", img_size=32, depth=1, target="hog")
    with pytest.raises(ValueError, match="norm_pix_loss"):
        create_model("MIM_vit_tiny_patch16", img_size=32, depth=4, norm_pix_loss=True)
    with pytest.raises(ValueError, match="divisible"):
        create_model("mae_vit_tiny_patch16", img_size=40, depth=1)
    with pytest.raises(ValueError, match="integer"):  # ViT-H/14 at scale 4: 14 / 4 = 3.5 px pools
        create_model("MIM_vit_tiny_patch16", img_size=56, patch_size=14, depth=4)
    with pytest.raises(ValueError):
        create_model("MIM_vit_tiny_patch16", img_size=32, depth=4, target="sift")
    with pytest.raises(ValueError):
        create_model("MIM_vit_tiny_patch16", img_size=48, depth=4)  # grid 3 cannot be halved for scale 0.5
    with pytest.raises(TypeError):
        create_model("mae_vit_tiny_patch16", img_size=32, depth=1, no_such_argument=1)
    ok = create_model("MIM_vit_tiny_patch16", img_size=56, patch_size=14, depth=4, scales=(2.0, 1.0, 0.5),
                      stage_blocks=(1, 2, 3))
    assert ok.target_sizes == [7, 14, 28]
    nbins18 = create_model("MIM_vit_tiny_patch16", img_size=32, depth=4, hog_nbins=18)
    assert nbins18.decoder[0].pred[-1].out_channels == 54


@pytest.mark.parametrize("name", ["mae_vit_tiny_patch16", "MIM_vit_tiny_patch16"])
def test_encoder_state_dict_is_a_timm_vit(name):
    torch.manual_seed(0)
    model = create_model(name, img_size=32, depth=4).eval()
    for module in model.modules():  # distinct norms, so the export must pick the right one
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight)
            torch.nn.init.normal_(module.bias)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=4, num_heads=3, num_classes=0).eval()
    vit.load_state_dict(model.encoder_state_dict(), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = vit.forward_features(imgs)
        (x,), _, ids_restore = model.forward_encoder(imgs, mask_ratio=0.0, generator=torch.Generator().manual_seed(0))
        x = (model.norm if name.startswith("mae") else model.norm[-1])(x)
        tokens = torch.gather(x[:, 1:], 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # unshuffle
    torch.testing.assert_close(torch.cat([x[:, :1], tokens], dim=1), reference, atol=1e-5, rtol=1e-5)


def test_mae_base_encoder_matches_timm_vit_base_keys():
    with torch.device("meta"):  # names and shapes only: no ViT-B weights are drawn
        ours = create_model("mae_vit_base_patch16").encoder_state_dict()
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    vit.load_state_dict(ours, strict=True, assign=True)  # strict: every key, every shape
