"""Relative positions and window padding of models/pyramid.py against an explicit per-token computation.

References: detectron2 ``modeling/backbone/vit.py`` (``Block``: norm1, then pad + window partition) and
``modeling/backbone/utils.py`` (``get_rel_pos``, ``add_decomposed_rel_pos``); BEiT
``semantic_segmentation/backbone/beit.py`` / implus/mae_segmentation ``backbone/mae.py`` (``relative_position_index``,
``relative_position_bias_table``, ``init_values``).
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from models.pyramid import ViTFeaturePyramid, relative_position_index


def _resized(table: torch.Tensor, rows: int) -> torch.Tensor:
    """Linear resize of a [L, C] table to ``rows`` (half-pixel centres, edges clamped), by numpy's interp."""
    length = table.shape[0]
    if length == rows:
        return table
    pos = np.clip((np.arange(rows) + 0.5) * length / rows - 0.5, 0, length - 1)
    cols = [np.interp(pos, np.arange(length), table[:, c].numpy()) for c in range(table.shape[1])]
    return torch.tensor(np.stack(cols, 1), dtype=table.dtype)


def explicit_block(block, x, grid, *, window=0, prefix=0, rel=False, beit=False):
    """One ViT block on a single image's tokens x [N, C] (float64), attention logits built pair by pair."""
    attn = block.attn
    heads, hd = attn.num_heads, attn.head_dim
    h, w = grid
    normed = block.norm1(x)
    groups = []  # each: list of (feature, (row, col) or None for a prefix token, output index or None for padding)
    if window:
        for wy in range(-(-h // window)):
            for wx in range(-(-w // window)):
                group = []
                for dy in range(window):
                    for dx in range(window):
                        y, xx = wy * window + dy, wx * window + dx
                        inside = y < h and xx < w
                        feat = normed[prefix + y * w + xx] if inside else torch.zeros_like(normed[0])
                        group.append((feat, (dy, dx), prefix + y * w + xx if inside else None))
                groups.append((group, (window, window)))
    else:
        group = [(normed[i], None, i) for i in range(prefix)]
        group += [(normed[prefix + y * w + xx], (y, xx), prefix + y * w + xx) for y in range(h) for xx in range(w)]
        groups.append((group, (h, w)))
    out = torch.zeros_like(x)
    for group, (sh, sw) in groups:
        feats = torch.stack([g[0] for g in group])
        q, k, v = (feats @ attn.qkv.weight.T + attn.qkv.bias).view(len(group), 3, heads, hd).unbind(1)
        if rel:
            rh, rw = _resized(attn.rel_pos_h.detach(), 2 * sh - 1), _resized(attn.rel_pos_w.detach(), 2 * sw - 1)
        if beit:
            table, rows = attn.relative_position_bias_table.detach(), (2 * sh - 1) * (2 * sw - 1) + 3
        heads_out = torch.zeros(len(group), heads, hd, dtype=x.dtype)
        for m in range(heads):
            for i, (_, ci, _) in enumerate(group):
                logits = torch.zeros(len(group), dtype=x.dtype)
                for j, (_, cj, _) in enumerate(group):
                    logit = (q[i, m] @ k[j, m]) * hd ** -0.5
                    if rel and ci is not None and cj is not None:
                        logit = logit + q[i, m] @ rh[ci[0] - cj[0] + sh - 1] + q[i, m] @ rw[ci[1] - cj[1] + sw - 1]
                    if beit:
                        if ci is not None and cj is not None:
                            row = (ci[0] - cj[0] + sh - 1) * (2 * sw - 1) + (ci[1] - cj[1] + sw - 1)
                        else:
                            row = rows - 1 if ci is None and cj is None else rows - 3 if ci is None else rows - 2
                        logit = logit + table[row, m]
                    logits[j] = logit
                heads_out[i, m] = logits.softmax(0) @ v[:, m]
        proj = attn.proj(heads_out.reshape(len(group), -1))
        for (_, _, index), row in zip(group, proj):
            if index is not None:
                out[index] = row
    x = x + block.ls1(out)
    return x + block.ls2(block.mlp(block.norm2(x)))


def _tiny(**kwargs) -> ViTFeaturePyramid:
    torch.manual_seed(0)
    return ViTFeaturePyramid("vit_tiny_patch16", img_size=48, out_channels=16, drop_path_rate=0.0, depth=1,
                             **kwargs).double().eval()


def _randomize_norm(block) -> None:
    with torch.no_grad():  # a trained norm1 has a non-zero bias: LN(0) = bias, so padding before norm1 differs
        block.norm1.bias.normal_()
        block.norm1.weight.uniform_(0.5, 1.5)


def test_window_attention_pads_after_norm1_as_detectron2():
    model = _tiny(window_size=3)
    block = model.vit.blocks[0]
    _randomize_norm(block)
    x = torch.randn(1, 25, 192, dtype=torch.float64)  # a 5x5 grid: windows of 3 pad to 6x6
    with torch.no_grad():
        ours = model._run_block(0, x, (5, 5))[0]
        ref = explicit_block(block, x[0], (5, 5), window=3)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("window, grid", [(3, (5, 5)), (0, (4, 2))])
def test_decomposed_rel_pos_equals_a_pairwise_computation(window, grid):
    # window: tables [2*3-1, C] used as they are; global: the 3x3 img_size grid's [5, C] tables resized to 7 and 3 rows
    # global attention keeps the cls token: its logits get no decomposed term (ViTDet has no cls token)
    model, prefix = _tiny(window_size=window, use_rel_pos=True), 0 if window else 1
    block = model.vit.blocks[0]
    _randomize_norm(block)
    assert block.attn.rel_pos_h.shape == (5, 64) and not block.attn.rel_pos_h.any()  # zero-initialised (detectron2)
    with torch.no_grad():
        block.attn.rel_pos_h.normal_()
        block.attn.rel_pos_w.normal_()
    x = torch.randn(1, prefix + grid[0] * grid[1], 192, dtype=torch.float64)
    with torch.no_grad():
        ours = model._run_block(0, x, grid)[0]
        ref = explicit_block(block, x[0], grid, window=window, prefix=prefix, rel=True)
        plain = explicit_block(block, x[0], grid, window=window, prefix=prefix)
    torch.testing.assert_close(ours, ref)
    assert (ours - plain).abs().max() > 1e-3  # the tables do change the output


def test_beit_relative_position_index_on_a_2x2_grid():
    # rows: cls, (0,0), (0,1), (1,0), (1,1); L = 3 * 3 + 3 = 12: cls->token 9, token->cls 10, cls->cls 11
    expected = torch.tensor([[11, 9, 9, 9, 9],
                             [10, 4, 3, 1, 0],
                             [10, 5, 4, 2, 1],
                             [10, 7, 6, 4, 3],
                             [10, 8, 7, 5, 4]])
    assert torch.equal(relative_position_index((2, 2)), expected)


def test_beit_rel_pos_bias_with_cls_equals_a_pairwise_computation():
    model = _tiny(rel_pos_bias=True, layer_scale_init_value=1.0)
    block = model.vit.blocks[0]
    assert block.attn.relative_position_bias_table.shape == (5 * 5 + 3, 3)
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
        block.ls1.gamma.uniform_(0.5, 1.5)
    x = torch.randn(1, 1 + 9, 192, dtype=torch.float64)
    with torch.no_grad():
        ours = model._run_block(0, x, (3, 3))[0]
        ref = explicit_block(block, x[0], (3, 3), prefix=1, beit=True)
    torch.testing.assert_close(ours, ref)
    with pytest.raises(ValueError, match="rel_pos_bias was built for a"):
        model.forward_tokens(torch.randn(1, 3, 64, 48, dtype=torch.float64))


@pytest.mark.parametrize("kwargs", [dict(rel_pos_bias=True, layer_scale_init_value=1.0), dict(use_rel_pos=True),
                                    dict(use_rel_pos=True, window_size=2, global_blocks=(1,))])
def test_new_parameters_at_init_give_the_pretrained_function(kwargs, caplog):
    torch.manual_seed(0)
    window = dict(window_size=kwargs["window_size"], global_blocks=(1,)) if "window_size" in kwargs else {}
    plain = ViTFeaturePyramid("vit_tiny_patch16", img_size=64, out_channels=16, drop_path_rate=0.0, depth=2,
                              tap_blocks=(0, 1, 1, 1), **window).eval()
    model = ViTFeaturePyramid("vit_tiny_patch16", img_size=64, out_channels=16, drop_path_rate=0.0, depth=2,
                              tap_blocks=(0, 1, 1, 1), **kwargs).eval()
    heads = {k: v for k, v in plain.state_dict().items() if not k.startswith("vit.")}
    model.load_state_dict(heads, strict=False)
    with caplog.at_level(logging.INFO, logger="models.pyramid"):
        missing, _ = model.load_backbone(plain.vit.state_dict())
    assert missing == []
    new = sorted({n for n, _ in model.vit.named_parameters()} - set(plain.vit.state_dict()))
    assert new and all("rel_pos" in n or "relative_position" in n or ".ls" in n for n in new)
    lines = [r.getMessage() for r in caplog.records if "neutral initialisation" in r.getMessage()]
    assert len(lines) == 1 and f"({len(new)} tensors)" in lines[0]
    assert all(n.split(".", 2)[2] in lines[0] for n in new)  # "blocks.*.<name>" for each new kind
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(plain(x).values(), model(x).values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
