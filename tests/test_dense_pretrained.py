"""Pretrained weights reach the dense backbones: after the loading path of main_detect / main_segment
(``--finetune``), the detection and segmentation ViT computes, on an image at the pretraining grid, the very tokens
the pretraining encoder computes (mask ratio 0). The dense backbones drop the encoder's final norm, so raw block
outputs are compared (``MaskedImageModel.forward_encoder`` returns them, before any norm). The options that add
parameters start neutral: ViTDet's zero-initialised relative position tables, the ViT-Adapter's injector gammas
at 0 (Chen et al., ICLR 2023, ``InteractionBlock``: ``gamma`` init 0)."""
import pytest
import torch

import main_detect
import main_segment
import models
from models.adapter import create_adapter
from util.checkpoint import load_checkpoint
from util.args import parse_args

PRETRAIN = 64  # pretraining img_size: a 4 x 4 grid at patch 16
DEPTH = 12  # mae_vit_tiny_patch16 (the adapter_tiny / vit_tiny sizes)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny MAE checkpoint (the layout main_pretrain saves) with random but fixed weights: every parameter,
    LayerNorm and bias included, moved off its initial value so that no term can vanish unnoticed."""
    torch.manual_seed(0)
    mim = models.create_model("mae_vit_tiny_patch16", img_size=PRETRAIN).eval()
    with torch.no_grad():
        for p in mim.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("mae") / "checkpoint-last.pth"
    torch.save({"model": mim.state_dict(), "epoch": 0}, path)
    return mim, path


def _encoder_tokens(mim, x, taps):
    """The encoder's raw block outputs at ``taps``, patch tokens in raster order [B, D, h, w] (mask ratio 0 still
    shuffles the tokens: ``ids_restore`` puts them back)."""
    with torch.no_grad():
        outs, mask, ids_restore = mim.forward_encoder(x, mask_ratio=0.0, taps=taps)
    assert not mask.any()
    b, d, g = x.shape[0], mim.embed_dim, x.shape[-1] // 16
    index = ids_restore[..., None].expand(-1, -1, d)
    return [torch.gather(o[:, 1:], 1, index).transpose(1, 2).reshape(b, d, g, g) for o in outs]


def _images():
    torch.manual_seed(1)
    return torch.randn(2, 3, PRETRAIN, PRETRAIN)


def _detect_args(tmp_path, *extra):
    return parse_args(main_detect.build_parser(), [
        "--config", "configs/detect/demo.yaml", "--output_dir", str(tmp_path), "--input_size", str(PRETRAIN),
        "--anchor_sizes", "4", "8", "16", "32", "64", *extra])


@pytest.mark.parametrize("rel_pos", [False, True])
def test_detection_pyramid_computes_the_pretraining_encoder(pretrained, tmp_path, rel_pos):
    mim, path = pretrained
    args = _detect_args(tmp_path, *(["--use_rel_pos"] if rel_pos else []))
    model = main_detect.build_model(args, 5, finetune=str(path)).eval()
    backbone = model.backbone
    assert backbone.use_rel_pos == rel_pos
    if rel_pos:  # the tables exist, and are zero: the function is the checkpoint's
        assert all(b.attn.rel_pos_h.abs().sum() == 0 for b in backbone.vit.blocks)
    x = _images()
    with torch.no_grad():
        got = backbone.forward_tokens(x)[-1]
    want = _encoder_tokens(mim, x, [DEPTH - 1])[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if rel_pos:  # a trained table changes the tokens: the comparison can fail
        with torch.no_grad():
            backbone.vit.blocks[3].attn.rel_pos_h.normal_()
            assert (backbone.forward_tokens(x)[-1] - want).abs().max() > 1e-2


def test_segmentation_pyramid_computes_the_pretraining_encoder_at_every_tap(pretrained, tmp_path):
    mim, path = pretrained
    args = parse_args(main_segment.build_parser(), [
        "--config", "configs/segment/demo.yaml", "--output_dir", str(tmp_path), "--input_size", str(PRETRAIN),
        "--nb_classes", "5"])
    model = main_segment.build_model(args, finetune=str(path)).eval()
    backbone = model.backbone
    taps = list(backbone.tap_blocks)
    assert taps[-1] == DEPTH - 1 and len(set(taps)) == 4
    x = _images()
    with torch.no_grad():
        got = backbone.forward_tokens(x)
    for g, w in zip(got, _encoder_tokens(mim, x, taps)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def _adapter_matches(adapter, mim):
    assert all(float(b.injector.gamma.abs().sum()) == 0 for b in adapter.interactions)
    x = _images()
    last = [end for _, end in adapter.interaction_indexes]
    with torch.no_grad():
        tokens, *_ = adapter.forward_interactions(x)
    for got, want in zip(tokens, _encoder_tokens(mim, x, last)):
        torch.testing.assert_close(got[:, 1:].transpose(1, 2).reshape(want.shape), want, rtol=1e-4, atol=1e-4)


def test_adapter_at_the_pretraining_grid_computes_the_pretraining_encoder_while_gammas_are_zero(pretrained):
    """``ViTAdapter.load_backbone`` (main_detect's / main_segment's loader) on an adapter whose position grid is the
    checkpoint's (ViT-Adapter's ``pretrain_size`` = the pretraining resolution)."""
    mim, path = pretrained
    adapter = create_adapter("adapter_tiny", img_size=PRETRAIN).eval()
    adapter.load_backbone(load_checkpoint(str(path)), what=str(path))
    _adapter_matches(adapter, mim)


@pytest.mark.xfail(strict=True, reason="main_detect builds the adapter with its factory's pretrain_size 224: a 64-px "
                   "checkpoint's 4 x 4 position grid is resampled to 14 x 14 at load and back to 4 x 4 on the fly, "
                   "and bicubic up-then-down is not the identity (largest token difference about 0.02)")
def test_main_detect_adapter_keeps_a_small_pretraining_grid_exactly(pretrained, tmp_path):
    mim, path = pretrained
    args = _detect_args(tmp_path, "--model", "adapter_tiny")
    model = main_detect.build_model(args, 5, finetune=str(path)).eval()
    _adapter_matches(model.backbone.body, mim)
