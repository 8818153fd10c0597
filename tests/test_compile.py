"""--compile (util/compute.py) through main_pretrain: a FreezeOut run that crosses freeze events recompiles, keeps
a finite loss, and leaves frozen units bit-identical after their freeze step; every attention takes SDPA."""
import json

import pytest
import torch

import main_pretrain
import models
from util.checkpoint import load_checkpoint
from util.compute import adamw_kwargs, non_sdpa_attention
from conftest import tiny_pretrain

# A 2-block MAE (3 units: patch embedding, blocks.0, blocks.1) keeps the CPU compile short; aot_eager traces
# forward and backward through dynamo + AOTAutograd without generating C++.
ARCH = dict(depth=2, embed_dim=32, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
# demo --debug: 64 images, batch 16 -> 4 steps/epoch, 8 steps; linear t_0 0.25: units freeze at steps 2, 5, 8
ARGV = tiny_pretrain("--epochs", "2", "--warmup_epochs", "0", "--blr", "1e-2", "--seed", "1", "--save_every", "1",
                     "--print_freq", "1", "--freezeout", "--how_scale", "linear", "--t_0", "0.25", "--compile",
                     "--compile_backend", "aot_eager")


@pytest.fixture
def small_models(monkeypatch):
    real = models.create_model
    monkeypatch.setattr(main_pretrain.models, "create_model", lambda name, **kw: real(name, **{**kw, **ARCH}))


def test_compiled_freezeout_run_recompiles_and_keeps_frozen_weights(small_models, tmp_path):
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    main_pretrain.main([*ARGV, "--output_dir", str(tmp_path)])
    logged = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(e["train_loss"])) for e in logged)
    assert [e["num_frozen"] for e in logged] == [1, 2]
    assert counts["stats"]["unique_graphs"] >= 2  # a new graph after the freeze event(s)
    first, last = load_checkpoint(tmp_path / "checkpoint-0.pth")["model"], load_checkpoint(
        tmp_path / "checkpoint-1.pth")["model"]
    assert not any(k.startswith("_orig_mod") for k in last)  # compiled in place: the keys are the model's
    # unit 0 (patch embedding, cls token, pos embed) froze at step 2, in epoch 0: unchanged over epoch 1
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token"):
        assert torch.equal(first[key], last[key]), key
    assert not torch.equal(first["blocks.1.attn.qkv.weight"], last["blocks.1.attn.qkv.weight"])


def test_every_attention_uses_sdpa():
    for name in ("mae_vit_base_patch16", "MIM_vit_base_patch16"):
        model = models.create_model(name, img_size=32, depth=4)
        assert non_sdpa_attention(model) == []
        attn = [m for m in model.modules() if hasattr(m, "fused_attn")]
        assert len(attn) >= 3  # encoder blocks and decoder blocks
        attn[0].fused_attn = False
        assert len(non_sdpa_attention(model)) == 1  # the check can fail


def test_fused_adamw_only_on_cuda():
    assert adamw_kwargs(torch.device("cpu")) == {}
    assert adamw_kwargs(torch.device("cuda")) == {"fused": True}
