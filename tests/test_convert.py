"""models/convert.py and the tools/ CLIs: fake checkpoints of every source, built from tiny timm ViTs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer

import models
from models.convert import (SOURCES, adapt_to_model, backbone_state, detect_source, dinov2_14to16, fold_layer_scale,
                            moco_to_deit, resize_patch_embed, to_timm_vit, unwrap_checkpoint)

ROOT = Path(__file__).resolve().parent.parent
DIM = 32


def tiny_vit(patch: int = 8, img: int = 32, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=img, patch_size=patch, embed_dim=DIM, depth=2, num_heads=2, **kwargs)


def encoder_sd(model: VisionTransformer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("head", "fc_norm"))}


def randomize(sd: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in sd.items()}


def assert_loads(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Only head / fc_norm may be missing; nothing unexpected; every given tensor lands unchanged."""
    result = model.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith(("head.", "fc_norm.")) for k in result.missing_keys), result.missing_keys
    own = model.state_dict()
    for key, value in sd.items():
        assert torch.equal(own[key], value), key


def fake_mae_official() -> tuple[dict, dict]:
    enc = randomize(encoder_sd(tiny_vit()))
    full = dict(enc, mask_token=torch.zeros(1, 1, 16), decoder_pos_embed=torch.zeros(1, 17, 16),
                **{"decoder_embed.weight": torch.zeros(16, DIM), "decoder_embed.bias": torch.zeros(16),
                   "decoder_blocks.0.norm1.weight": torch.ones(16), "decoder_norm.weight": torch.ones(16),
                   "decoder_pred.weight": torch.zeros(192, 16), "decoder_pred.bias": torch.zeros(192)})
    return {"model": full, "epoch": 799}, enc


def fake_localmim(stages: int = 4) -> tuple[dict, dict]:
    enc = randomize(encoder_sd(tiny_vit()))
    full = {k: v for k, v in enc.items() if not k.startswith("norm.")}
    for k in range(stages):
        full[f"norm.{k}.weight"] = torch.full((DIM,), float(k + 1))
        full[f"norm.{k}.bias"] = torch.full((DIM,), -float(k + 1))
        full[f"decoder.{k}.embed.weight"] = torch.zeros(8, DIM)
        full[f"hog_enc.{k}.weight"] = torch.zeros(2, 1, 3, 3)
    return {"model": full}, enc


def fake_moco() -> tuple[dict, dict]:
    base = randomize(encoder_sd(tiny_vit()), seed=1)
    momentum = randomize(encoder_sd(tiny_vit()), seed=2)
    sd = {f"module.base_encoder.{k}": v for k, v in base.items()}
    sd.update({f"module.momentum_encoder.{k}": v for k, v in momentum.items()})
    for enc in ("base_encoder", "momentum_encoder"):
        sd[f"module.{enc}.head.0.weight"] = torch.zeros(64, DIM)
        sd[f"module.{enc}.head.1.weight"] = torch.ones(64)
    sd["module.predictor.0.weight"] = torch.zeros(64, 64)
    return {"epoch": 300, "arch": "vit_small", "state_dict": sd}, base


def dinov2_model() -> VisionTransformer:
    model = tiny_vit(patch=14, img=28, init_values=1.0, num_classes=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.1, 2.0)  # distinct per channel, so a wrong fold axis shows
    return model.eval()


def fake_dinov2() -> dict:
    sd = {k: v.clone() for k, v in dinov2_model().state_dict().items()}
    sd["mask_token"] = torch.zeros(1, DIM)
    return sd


# ---- unwrap / detect ---------------------------------------------------------------------------------------------

def test_unwrap_strips_wrappers_and_prefixes():
    t = torch.ones(1)
    assert unwrap_checkpoint({"model": {"module._orig_mod.blocks.0.x": t}}) == {"blocks.0.x": t}
    assert unwrap_checkpoint({"state_dict": {"module.base_encoder.cls_token": t}}) == {"base_encoder.cls_token": t}
    teacher = {"teacher": {"backbone.blocks.0.x": t, "dino_head.mlp.0.weight": t}}
    assert unwrap_checkpoint(teacher) == {"blocks.0.x": t}
    assert unwrap_checkpoint({"cls_token": t}) == {"cls_token": t}


@pytest.mark.parametrize("bad", [{"epoch": 3, "args": {}}, {}, {"model": {}}])
def test_unwrap_rejects_non_state_dicts(bad):
    with pytest.raises(ValueError, match="state dict"):
        unwrap_checkpoint(bad)


def test_detect_source_on_each_layout():
    ours_mae = models.create_model("mae_vit_tiny_patch16", img_size=32, depth=2).state_dict()
    ours_mim = models.create_model("MIM_vit_tiny_patch16", img_size=32, depth=4).state_dict()
    cases = {"mae": [fake_mae_official()[0], {"model": ours_mae}],
             "localmim": [fake_localmim()[0], {"model": ours_mim}],
             "moco_v3": [fake_moco()[0]],
             "dinov2": [fake_dinov2()],
             "timm": [tiny_vit().state_dict(), moco_to_deit(fake_moco()[0])]}
    for source, checkpoints in cases.items():
        for ckpt in checkpoints:
            assert detect_source(unwrap_checkpoint(ckpt)) == source
    assert detect_source(fake_moco()[0]["state_dict"]) == "moco_v3"  # before unwrapping too


def test_unknown_layouts_raise_clearly():
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        to_timm_vit({"model": {"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}})
    with pytest.raises(ValueError, match="unknown checkpoint source"):
        to_timm_vit(tiny_vit().state_dict(), source="beit")
    sd = dict(tiny_vit().state_dict(), **{"relative_position_bias_table": torch.zeros(3)})
    with pytest.raises(ValueError, match="relative_position_bias_table"):
        to_timm_vit(sd, source="timm")


# ---- per source ------------------------------------------------------------------------------------------------

def test_mae_official_pretrain_and_encoder_only():
    ckpt, enc = fake_mae_official()
    sd, source = to_timm_vit(ckpt)
    assert source == "mae" and sd.keys() == enc.keys()
    assert_loads(tiny_vit(num_classes=10), sd)
    sd2, source2 = to_timm_vit({"model": enc})  # mae_pretrain_vit_base.pth: encoder only, timm keys
    assert source2 == "timm" and sd2.keys() == enc.keys()


@pytest.mark.parametrize("name,depth,detected", [("mae_vit_tiny_patch16", 2, "mae"),
                                                  ("MIM_vit_tiny_patch16", 4, "localmim")])
def test_our_pretrain_checkpoints(name, depth, detected):
    model = models.create_model(name, img_size=32, depth=depth)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=depth, num_heads=3, num_classes=0)
    for source in ("auto", "vitfreeze"):
        sd, used = to_timm_vit({"model": model.state_dict(), "epoch": 3, "args": {}}, source=source)
        vit.load_state_dict(sd, strict=True)
        expected = model.encoder_state_dict()
        assert sd.keys() == expected.keys() and all(torch.equal(sd[k], expected[k]) for k in sd)
        assert used == (detected if source == "auto" else "vitfreeze")


def test_localmim_last_stage_norm_becomes_norm():
    ckpt, enc = fake_localmim()
    sd, source = to_timm_vit({"model": {f"module.{k}": v for k, v in ckpt["model"].items()}})
    assert source == "localmim"
    assert torch.equal(sd["norm.weight"], torch.full((DIM,), 4.0)) and torch.equal(sd["norm.bias"], -sd["norm.weight"])
    assert not any(k.startswith(("decoder", "hog_enc", "norm.0", "norm.3")) for k in sd)
    assert_loads(tiny_vit(num_classes=10), sd)
    # ViTFreeze after dropping early decoders renumbers its stage lists: a single 'norm.0' is the last stage.
    ckpt1, _ = fake_localmim(stages=1)
    assert torch.equal(to_timm_vit(ckpt1)[0]["norm.weight"], torch.ones(DIM))


def test_moco_keeps_exactly_the_base_encoder_minus_head():
    ckpt, base = fake_moco()
    sd, source = to_timm_vit(ckpt)
    assert source == "moco_v3"
    assert sd.keys() == base.keys() and all(torch.equal(sd[k], base[k]) for k in sd)
    deit = moco_to_deit(ckpt)
    assert deit.keys() == {"model"} and deit["model"].keys() == base.keys()
    assert all(torch.equal(deit["model"][k], base[k]) for k in base)
    # the already-converted DeiT form is accepted with an explicit source too
    again, _ = to_timm_vit(deit, source="moco_v3")
    assert again.keys() == base.keys()
    assert_loads(tiny_vit(num_classes=10), sd)
    with pytest.raises(ValueError, match="base_encoder"):
        moco_to_deit({"state_dict": base})


def test_layer_scale_fold_matches_explicit_gamma_block():
    torch.manual_seed(0)
    scaled = Block(DIM, 2, init_values=1.0).eval()
    with torch.no_grad():
        scaled.ls1.gamma.uniform_(-2, 2)
        scaled.ls2.gamma.uniform_(-2, 2)
    plain = Block(DIM, 2).eval()
    folded = fold_layer_scale({f"blocks.0.{k}": v for k, v in scaled.state_dict().items()})
    plain.load_state_dict({k[len("blocks.0."):]: v for k, v in folded.items()}, strict=True)
    x = torch.randn(3, 5, DIM)
    torch.testing.assert_close(plain(x), scaled(x), atol=1e-5, rtol=1e-5)


def test_dinov2_folds_layer_scale_and_drops_mask_token():
    ckpt = fake_dinov2()
    sd, source = to_timm_vit(ckpt)
    assert source == "dinov2"
    assert "mask_token" not in sd and not any("ls" in k.split(".")[-2] for k in sd if k.startswith("blocks"))
    plain = tiny_vit(patch=14, img=28, num_classes=0).eval()
    plain.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), dinov2_model()(x), atol=1e-5, rtol=1e-5)
    # DINOv2 training checkpoints chunk the blocks (blocks.<chunk>.<global index>.*)
    chunked = {(k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k): v for k, v in ckpt.items()}
    assert to_timm_vit(chunked, source="dinov2")[0].keys() == sd.keys()
    # ... and then the patch-16 model: kernel resized, 2x2 grid -> 2x2 (already), loads strict
    adapted = adapt_to_model(sd, patch_size=16, grid_size=2)
    tiny_vit(patch=16, img=32, num_classes=0).load_state_dict(adapted, strict=True)


def test_dinov2_rejects_registers_and_swiglu():
    # register tokens convert (tests/test_adapter.py) but a model without them refuses them by name
    with pytest.raises(ValueError, match="register tokens"):
        backbone_state(dict(fake_dinov2(), register_tokens=torch.zeros(1, 4, DIM)), tiny_vit(patch=14, img=28))
    swiglu = dict(fake_dinov2(), **{"blocks.0.mlp.w12.weight": torch.zeros(8, DIM)})
    with pytest.raises(ValueError, match="SwiGLU"):
        to_timm_vit(swiglu)


def test_timm_source_keeps_head_and_fc_norm():
    model = tiny_vit(num_classes=7, global_pool="avg", fc_norm=True)
    sd, source = to_timm_vit({"model": model.state_dict()})
    assert source == "timm" and sd.keys() == model.state_dict().keys()
    assert "head.weight" in sd and "fc_norm.weight" in sd


# ---- shapes: patch kernel and position embedding -----------------------------------------------------------------

def test_resize_patch_embed_is_plain_bilinear():
    w = torch.randn(4, 3, 14, 14)
    out = resize_patch_embed(w, 16)
    assert out.shape == (4, 3, 16, 16)
    ref = F.interpolate(w.reshape(1, 12, 14, 14), size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref.reshape(4, 3, 16, 16))
    const = resize_patch_embed(torch.full((2, 3, 14, 14), 0.25), 16)
    torch.testing.assert_close(const, torch.full((2, 3, 16, 16), 0.25))  # no rescaling
    assert resize_patch_embed(w, 14) is w
    assert resize_patch_embed(w.bfloat16(), 16).dtype == torch.bfloat16


def test_adapt_to_model_resamples_pos_embed_like_timm():
    pos = torch.randn(1, 1 + 37 * 37, DIM)
    sd = {"pos_embed": pos, "patch_embed.proj.weight": torch.randn(DIM, 3, 14, 14)}
    out = adapt_to_model(sd, patch_size=16, grid_size=14)
    ref = resample_abs_pos_embed(pos, [14, 14], [37, 37], num_prefix_tokens=1, interpolation="bicubic",
                                 antialias=False)
    torch.testing.assert_close(out["pos_embed"], ref)
    torch.testing.assert_close(out["pos_embed"][:, :1], pos[:, :1])  # cls row kept
    assert out["patch_embed.proj.weight"].shape == (DIM, 3, 16, 16)
    assert sd["pos_embed"] is pos  # input untouched
    same = adapt_to_model(sd, patch_size=14, grid_size=37)
    assert torch.equal(same["pos_embed"], pos) and same["patch_embed.proj.weight"] is sd["patch_embed.proj.weight"]


def test_dinov2_14to16_is_vit_adapter_format():
    sd = fake_dinov2()
    out = dinov2_14to16(sd)
    assert "mask_token" not in out and out["patch_embed.proj.weight"].shape == (DIM, 3, 16, 16)
    assert torch.equal(out["blocks.1.gamma1"], sd["blocks.1.ls1.gamma"])
    assert torch.equal(out["blocks.0.gamma2"], sd["blocks.0.ls2.gamma"])
    assert out["pos_embed"] is sd["pos_embed"]  # untouched (ViT-Adapter resizes it at runtime)
    assert set(out) == {k.replace("ls1.gamma", "gamma1").replace("ls2.gamma", "gamma2") for k in sd} - {"mask_token"}


def test_sources_tuple():
    assert SOURCES == ("vitfreeze", "mae", "localmim", "moco_v3", "dinov2", "timm")


# ---- tools/ ------------------------------------------------------------------------------------------------------

def _tool(name: str):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "tools"))


def test_convert_to_deit_cli(tmp_path, capsys):
    tool = _tool("convert_to_deit")
    ckpt, base = fake_moco()
    torch.save(ckpt, tmp_path / "moco.pth.tar")
    assert tool.main(["--input", str(tmp_path / "moco.pth.tar"), "--output", str(tmp_path / "out" / "deit.pth")]) == 0
    out = torch.load(tmp_path / "out" / "deit.pth", weights_only=True)
    assert out.keys() == {"model"} and out["model"].keys() == base.keys()
    assert tool.main(["--input", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "x.pth")]) == 1
    assert "missing.pth" in capsys.readouterr().err


def test_convert_14to16_cli(tmp_path, capsys):
    tool = _tool("convert_14to16")
    torch.save(fake_dinov2(), tmp_path / "dinov2_vits14.pth")
    assert tool.main([str(tmp_path / "dinov2_vits14.pth")]) == 0
    out = torch.load(tmp_path / "dinov2_vits14_14to16.pth", weights_only=True)
    assert out.keys() == dinov2_14to16(fake_dinov2()).keys()
    assert tool.main([str(tmp_path / "nope.pth")]) == 1
    assert "nope.pth" in capsys.readouterr().err


def test_convert_14to16_refuses_a_kernel_that_is_not_14(tmp_path, capsys):
    """A patch-16 checkpoint (e.g. one converted already) is refused: resizing it again would blur its kernel."""
    tool = _tool("convert_14to16")
    sd = fake_dinov2()
    sd["patch_embed.proj.weight"] = torch.randn(DIM, 3, 16, 16)
    torch.save(sd, tmp_path / "p16.pth")
    assert tool.main([str(tmp_path / "p16.pth")]) == 1
    err = capsys.readouterr().err
    assert "p16.pth" in err and "16x16" in err and "14x14" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p16_14to16.pth").exists()


def test_export_timm_cli_safetensors_and_pth(tmp_path, capsys):
    tool = _tool("export_timm")
    ckpt, enc = fake_localmim()
    torch.save(ckpt, tmp_path / "ckpt.pth")
    assert tool.main(["--input", str(tmp_path / "ckpt.pth"), "--output", str(tmp_path / "vit.safetensors")]) == 0
    model = tiny_vit(num_classes=0)
    timm.models.load_checkpoint(model, str(tmp_path / "vit.safetensors"), strict=True)
    assert torch.equal(model.norm.weight, torch.full((DIM,), 4.0))
    assert tool.main(["--input", str(tmp_path / "ckpt.pth"), "--output", str(tmp_path / "vit.pth")]) == 0
    assert torch.load(tmp_path / "vit.pth", weights_only=True)["model"].keys() == enc.keys()
    assert tool.main(["--input", str(tmp_path / "ckpt.pth"), "--output", str(tmp_path / "vit.bin")]) == 1
    assert tool.main(["--input", str(tmp_path / "absent.pth"), "--output", str(tmp_path / "v.safetensors")]) == 1
    assert "absent.pth" in capsys.readouterr().err


def test_tools_run_as_scripts_from_repo_root(tmp_path):
    result = subprocess.run([sys.executable, "tools/export_timm.py", "--input", str(tmp_path / "gone.pth"),
                             "--output", str(tmp_path / "o.safetensors")], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "gone.pth" in result.stderr, result.stderr
