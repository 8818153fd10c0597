"""models/vit.py + models/heads.py + models/backbone.load_pretrained: sizes, pooling, head init, loading."""
import pytest
import torch
import torch.nn.functional as F

import models
from models.convert import to_timm_vit
from models.heads import LinearProbe, LinearProbeHead
from models.vit import init_head, unit_of
from models.backbone import load_pretrained

SIZES = {"vit_tiny_patch16": (16, 192, 12, 3), "vit_small_patch16": (16, 384, 12, 6),
         "vit_base_patch16": (16, 768, 12, 12), "vit_large_patch16": (16, 1024, 24, 16),
         "vit_huge_patch14": (14, 1280, 32, 16)}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_factory_sizes(name):
    patch, dim, depth, heads = SIZES[name]
    model = models.create_model(name, num_classes=5, device="meta")  # shapes only, no memory or init cost
    assert model.patch_embed.patch_size == (patch, patch) and model.embed_dim == dim and len(model.blocks) == depth
    assert model.blocks[0].attn.num_heads == heads and model.blocks[0].mlp.fc1.out_features == 4 * dim
    assert model.norm.eps == 1e-6 and model.blocks[0].attn.qkv.bias is not None
    assert model.pos_embed.shape == (1, 1 + (224 // patch) ** 2, dim) and model.head.out_features == 5
    small = models.create_model(name, img_size=2 * patch, depth=1, num_classes=5)
    assert small(torch.randn(1, 3, 2 * patch, 2 * patch)).shape == (1, 5)


def test_global_pool_modes_are_mae_features():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    avg = models.create_model("vit_tiny_patch16", img_size=32, depth=2, num_classes=0, global_pool="avg").eval()
    tokens = avg.forward_features(x)  # final norm is identity under global pooling
    assert isinstance(avg.norm, torch.nn.Identity)
    expected = F.layer_norm(tokens[:, 1:].mean(1), (192,), avg.fc_norm.weight, avg.fc_norm.bias, eps=1e-6)
    assert torch.allclose(avg(x), expected, atol=1e-6)
    cls = models.create_model("vit_tiny_patch16", img_size=32, depth=2, num_classes=0, global_pool="token").eval()
    assert isinstance(cls.fc_norm, torch.nn.Identity)
    assert torch.allclose(cls(x), cls.forward_features(x)[:, 0])
    with pytest.raises(ValueError, match="global_pool"):
        models.create_model("vit_tiny_patch16", global_pool="max")


def test_drop_path_is_linear_over_depth():
    model = models.create_model("vit_tiny_patch16", img_size=32, depth=4, drop_path_rate=0.3, device="meta")
    rates = [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_unit_of_and_head_init():
    assert [unit_of(n, depth=12) for n in ("cls_token", "patch_embed.proj.weight", "blocks.0.norm1.weight",
                                           "blocks.11.mlp.fc2.bias", "fc_norm.weight", "head.bias")] == [0, 0, 1, 12,
                                                                                                       13, 13]
    head = torch.nn.Linear(500, 1000)
    init_head(head, std=0.01)
    assert head.bias.abs().max() == 0 and head.weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_linear_probe_head_and_frozen_backbone():
    head = LinearProbeHead(192, 7)
    bn, linear = head[0], head[1]
    assert not bn.affine and bn.eps == 1e-6 and linear.bias.abs().max() == 0
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.1)
    backbone = models.create_model("vit_tiny_patch16", img_size=32, num_classes=0, depth=2)
    probe = LinearProbe(backbone, 192, 7, num_heads=3).train()
    assert not backbone.training and probe.heads[0].training
    assert not any(p.requires_grad for p in backbone.parameters())
    logits = probe(torch.randn(4, 3, 32, 32))
    assert logits.shape == (3, 4, 7)
    logits.sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is not None for p in probe.heads.parameters())


def pretrained_state(name):
    torch.manual_seed(1)
    extra = {"scales": (2.0, 1.0)} if name.startswith("MIM") else {}  # two stages: norm.0, norm.1
    return models.create_model(name, img_size=32, depth=2, **extra).state_dict()


@pytest.mark.parametrize("pretrain", ["mae_vit_tiny_patch16", "MIM_vit_tiny_patch16"])
@pytest.mark.parametrize("pool", ["avg", "token"])
def test_pretraining_checkpoints_load(pretrain, pool):
    ours = pretrained_state(pretrain)
    state, source = to_timm_vit({"model": ours})
    vit = models.create_model("vit_tiny_patch16", img_size=32, depth=2, num_classes=0, global_pool=pool)
    missing, unexpected = load_pretrained(vit, state, expected_missing=("fc_norm.*",) if pool == "avg" else ())
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, ours["blocks.1.mlp.fc2.weight"])
    if pool == "token":  # the final norm is MAE's norm, or LocalMIM's last stage norm (``models.convert``)
        norm = "norm.weight" if pretrain.startswith("mae") else "norm.1.weight"
        assert torch.equal(vit.norm.weight, ours[norm]) and missing == []
    else:
        assert missing == ["fc_norm.bias", "fc_norm.weight"] and "norm.weight" in unexpected


def test_a_backbone_that_did_not_load_raises():
    vit = models.create_model("vit_tiny_patch16", img_size=32, depth=2, num_classes=0)
    state, _ = to_timm_vit({"model": pretrained_state("mae_vit_tiny_patch16")})
    del state["blocks.1.attn.qkv.weight"]
    with pytest.raises(ValueError, match="blocks.1.attn.qkv.weight"):
        load_pretrained(vit, state, expected_missing=("fc_norm.*",))
    with pytest.raises(ValueError, match="did not load"):
        load_pretrained(vit, {"something.else": torch.zeros(1)})
    state, _ = to_timm_vit({"model": pretrained_state("mae_vit_tiny_patch16")})
    deeper = models.create_model("vit_tiny_patch16", img_size=32, depth=3, num_classes=0)
    with pytest.raises(ValueError, match="blocks.2"):
        load_pretrained(deeper, state)
    wider = models.create_model("vit_small_patch16", img_size=32, depth=2, num_classes=0)
    with pytest.raises(ValueError, match="shapes differ"):
        load_pretrained(wider, state)
