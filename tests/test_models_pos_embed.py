"""Tests of models/pos_embed.py against the formula of MAE ``util/pos_embed.py`` and a direct bicubic resize."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.pos_embed import get_2d_sincos_pos_embed, resample_pos_embed


def test_sincos_table_matches_per_element_formula():
    dim, grid = 8, 3
    table = get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    assert table.shape == (1 + grid * grid, dim) and table.dtype == torch.float32
    assert torch.equal(table[0], torch.zeros(dim))
    quarter = dim // 4
    for row in range(grid):
        for col in range(grid):
            token = 1 + row * grid + col
            for k in range(quarter):
                omega = 10000.0 ** (-k / quarter)
                expected = [math.sin(col * omega), math.cos(col * omega), math.sin(row * omega),
                            math.cos(row * omega)]
                got = [table[token, q * quarter + k].item() for q in range(4)]
                assert got == pytest.approx(expected, abs=1e-7)


def test_sincos_without_cls_and_bad_dim():
    assert get_2d_sincos_pos_embed(16, 4, cls_token=False).shape == (16, 16)
    with pytest.raises(ValueError):
        get_2d_sincos_pos_embed(6, 4)


def test_resample_matches_direct_bicubic_and_keeps_cls():
    old, new, dim = 4, 6, 8
    pos = torch.randn(1, 1 + old * old, dim)
    out = resample_pos_embed(pos, new)
    grid = pos[:, 1:].reshape(1, old, old, dim).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    assert out.shape == (1, 1 + new * new, dim)
    assert torch.equal(out[:, :1], pos[:, :1])
    torch.testing.assert_close(out[:, 1:], direct.permute(0, 2, 3, 1).reshape(1, -1, dim))
    assert resample_pos_embed(pos, old) is pos
