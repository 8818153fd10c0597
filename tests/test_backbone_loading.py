"""The one backbone-loading policy (``models.backbone.load_pretrained``) through every loader an entry script uses:
classification (``load_finetune_weights``: main_finetune; ``build_backbone``: main_knn / main_linprobe), the
feature pyramid of main_segment / main_detect (``load_pyramid_backbone``) and the ViT-Adapter
(``ViTAdapter.load_backbone``).

The policy, after MAE's ``main_finetune.py`` (``strict=False``, print the result, assert only that the new head is
missing) and mmcv's / detectron2's ``load_checkpoint`` (checkpoint keys the model does not use are a warning):
a shape mismatch, a missing backbone key and encoder parameters the model lacks are refused in one line; any other
key the model does not use is ignored with a warning naming it, unless the loader expects it unused (the final
``norm`` of a dense model or of a globally pooled classifier).
"""
from __future__ import annotations

import logging

import pytest
import torch

import models
from models import backbone
from models.adapter import create_adapter
from models.backbone import build_backbone, load_finetune_weights, load_pretrained, load_pyramid_backbone
from models.pyramid import ViTFeaturePyramid

DEPTH = 4


def checkpoint(name: str = "vit_tiny_patch16", depth: int = DEPTH) -> dict[str, torch.Tensor]:
    """A pretrained ViT's weights under timm keys (random, seeded), with its final ``norm``."""
    torch.manual_seed(3)
    vit = models.create_model(name, img_size=64, depth=depth, num_classes=0, global_pool="token")
    return {k: torch.randn_like(v) for k, v in vit.state_dict().items()}


def finetune(state):
    model = models.create_model("vit_tiny_patch16", img_size=64, depth=DEPTH, num_classes=5, global_pool="avg")
    load_finetune_weights(model, {"model": state}, source="timm", name="ckpt.pth")
    return model


def features(state):
    with pytest.MonkeyPatch.context() as patch:  # build_backbone's ViT at the test's depth
        patch.setattr(backbone, "create_model", lambda name, **kwargs: models.create_model(name, depth=DEPTH, **kwargs))
        return build_backbone("vit_tiny_patch16", img_size=64, global_pool=True, checkpoint={"model": state},
                              checkpoint_source="timm", name="ckpt.pth")


def pyramid(state):
    model = ViTFeaturePyramid("vit_tiny_patch16", img_size=64, out_channels=16, depth=DEPTH, tap_blocks=(0, 1, 2, 3))
    load_pyramid_backbone(model, {"model": state}, source="timm", name="ckpt.pth")
    return model.vit


def adapter(state):
    model = create_adapter("adapter_tiny", depth=DEPTH, img_size=64)
    model.load_backbone({"model": state}, source="timm", what="ckpt.pth")
    return model.vit


LOADERS = [finetune, features, pyramid, adapter]


def unused_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "not used by the model" in r.getMessage()]


@pytest.mark.parametrize("load", LOADERS)
def test_a_key_the_model_does_not_use_is_ignored_with_a_warning(load, caplog):
    """MAE prints, mmcv and detectron2 warn: the load goes on, one warning names the key; the final norm, which
    none of these models uses after the blocks' outputs or a mean token, is expected and stays out of it."""
    state = dict(checkpoint(), **{"attn_pool.latent": torch.zeros(1, 1, 192)})
    with caplog.at_level(logging.INFO, logger="vitfreeze"):
        vit = load(state)
    warned = unused_warnings(caplog)
    assert len(warned) == 1 and "1 checkpoint keys" in warned[0] and "attn_pool.latent" in warned[0], warned
    assert "norm.weight" not in warned[0]
    torch.testing.assert_close(vit.state_dict()["blocks.3.mlp.fc2.weight"], state["blocks.3.mlp.fc2.weight"],
                               rtol=0, atol=0)


@pytest.mark.parametrize("load", LOADERS)
def test_a_checkpoint_that_fits_loads_without_a_warning(load, caplog):
    with caplog.at_level(logging.INFO, logger="vitfreeze"):
        load(checkpoint())
    assert unused_warnings(caplog) == []


@pytest.mark.parametrize("load", LOADERS)
def test_a_missing_backbone_key_is_refused_in_one_line(load):
    state = checkpoint()
    del state["blocks.1.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"ckpt\.pth .*did not load the backbone: 1 of \d+ model keys are missing "
                                         r"\(blocks\.1\.attn\.qkv\.weight\)") as err:
        load(state)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("load", LOADERS)
def test_a_shape_mismatch_is_refused_in_one_line(load):
    """ViT-S weights (D 384) for a ViT-Ti (D 192): the message names both architectures."""
    with pytest.raises(ValueError, match=r"shapes differ from the model: the checkpoint holds a ViT of depth 4, "
                                         r"width 384.*the model is a ViT of depth 4, width 192") as err:
        load(checkpoint("vit_small_patch16"))
    assert "\n" not in str(err.value) and "(+" in str(err.value)


@pytest.mark.parametrize("load", LOADERS)
def test_encoder_parameters_the_model_lacks_are_refused(load):
    """A deeper ViT of the same width: its blocks 4 and 5 would be dropped and the features would change (another
    architecture, as a shape mismatch is), so it is refused rather than warned about."""
    with pytest.raises(ValueError, match=r"has 24 encoder parameters the model lacks \(blocks\.4\.attn") as err:
        load(checkpoint(depth=DEPTH + 2))
    assert "\n" not in str(err.value)


def test_the_policy_by_hand():
    """``load_pretrained`` itself: expected missing keys and expected unused keys, as fnmatch patterns."""
    model = models.create_model("vit_tiny_patch16", img_size=64, depth=2, num_classes=3, global_pool="avg")
    state = {k: v for k, v in checkpoint(depth=2).items()}
    missing, unexpected = load_pretrained(model, state, expected_missing=("head.*", "fc_norm.*"),
                                          expected_unused=("norm.*",))
    assert missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert unexpected == ["norm.bias", "norm.weight"]
    with pytest.raises(ValueError, match=r"4 of \d+ model keys are missing \(fc_norm.bias, fc_norm.weight, head.bias, "
                                         r"head.weight\); no key may be missing"):
        load_pretrained(model, state)
    with pytest.raises(ValueError, match=r"has 1 encoder parameters the model lacks \(reg_token\)"):
        load_pretrained(model, dict(state, reg_token=torch.zeros(1, 4, 192)), expected_missing=("head.*", "fc_norm.*"))
