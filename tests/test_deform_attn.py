"""Multi-scale deformable attention (models/deform_attn.py) against a direct loop over the formula."""
from __future__ import annotations

import math

import pytest
import torch

from models.deform_attn import MSDeformAttn, level_start_index, ms_deform_attn, reference_points


def _bilinear_zero_pad(v: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Bilinear read of v [H, W, Dh] at pixel coordinates (x, y) (pixel centres at integers), zero outside."""
    h, w, _ = v.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(v.shape[-1], dtype=torch.float64)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * v[yy, xx].double()
    return out


def loop_reference(value, shapes, locations, weights) -> torch.Tensor:
    """sum_{l,k} A[n,q,m,l,k] * V_l[m](x W_l - 0.5, y H_l - 0.5), one query/head/level/point at a time."""
    n, _, m, dh = value.shape
    _, lq, _, num_levels, k, _ = locations.shape
    starts = level_start_index(shapes)
    out = torch.zeros(n, lq, m, dh, dtype=torch.float64)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for lv, (h, w) in enumerate(shapes):
                    v = value[b, starts[lv]:starts[lv] + h * w, head].reshape(h, w, dh)
                    for p in range(k):
                        x, y = locations[b, q, head, lv, p].tolist()
                        out[b, q, head] += weights[b, q, head, lv, p].double() * _bilinear_zero_pad(
                            v, x * w - 0.5, y * h - 0.5)
    return out.reshape(n, lq, m * dh)


def test_grid_sample_core_equals_loop_with_outside_points_and_several_levels():
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (3, 4), (1, 2)]
    n, m, dh, lq, k = 2, 3, 4, 6, 3
    value = torch.randn(n, sum(h * w for h, w in shapes), m, dh, generator=g, dtype=torch.float64)
    # locations in [-0.4, 1.4]: a good share fall outside the map (partly or entirely)
    locations = torch.rand(n, lq, m, len(shapes), k, 2, generator=g, dtype=torch.float64) * 1.8 - 0.4
    locations[0, 0, 0, 0, 0] = torch.tensor([-0.5, 0.5])  # far left: reads exactly zero
    locations[0, 0, 0, 0, 1] = torch.tensor([1.0, 1.0])  # bottom-right corner: a quarter of the corner pixel
    weights = torch.rand(n, lq, m, len(shapes), k, generator=g, dtype=torch.float64)
    outside = ((locations < 0) | (locations > 1)).any(-1)
    assert outside.float().mean() > 0.2
    got = ms_deform_attn(value, shapes, locations, weights)
    want = loop_reference(value, shapes, locations, weights)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # float32 path agrees to float rounding
    got32 = ms_deform_attn(value.float(), torch.tensor(shapes), locations.float(), weights.float())
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)


def test_pixel_centre_reads_the_pixel_and_far_points_read_zero():
    value = torch.arange(12, dtype=torch.float64).view(1, 12, 1, 1)  # one level 3 x 4
    locs = torch.tensor([[(1.5 / 4, 2.5 / 3), (3.0, 3.0)]], dtype=torch.float64).view(1, 1, 1, 1, 2, 2)
    weights = torch.ones(1, 1, 1, 1, 2, dtype=torch.float64)
    out = ms_deform_attn(value, [(3, 4)], locs, weights)
    assert out.item() == pytest.approx(2 * 4 + 1)  # pixel (row 2, col 1) plus nothing from outside


def test_module_matches_loop_and_reference_initialisation():
    torch.manual_seed(0)
    d, shapes = 16, [(4, 4), (2, 3)]
    attn = MSDeformAttn(d_model=d, n_levels=2, n_heads=4, n_points=2, ratio=0.5)
    # Deformable DETR's init: zero offset weights, ring bias (head m points along angle 2 pi m / M, point k at k+1)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    bias = attn.sampling_offsets.bias.view(4, 2, 2, 2)
    torch.testing.assert_close(bias[1, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)  # 90 degrees, point 1
    torch.testing.assert_close(bias[2, 1, 1], torch.tensor([-2.0, 0.0]), atol=1e-6, rtol=0)  # 180 degrees, point 2
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.value_proj.weight.shape == (8, d)
    with torch.no_grad():  # non-uniform attention and query-dependent offsets for the test
        attn.attention_weights.weight.normal_(0, 0.1)
        attn.sampling_offsets.weight.normal_(0, 0.5)
    s = sum(h * w for h, w in shapes)
    query, feat = torch.randn(2, 5, d), torch.randn(2, s, d)
    ref = torch.rand(1, 5, 1, 2)
    got = attn(query, ref, feat, shapes)
    locations, weights = attn.sampling(query, ref, shapes)
    assert ((locations < 0) | (locations > 1)).any()
    value = attn.value_proj(feat).view(2, s, 4, 2)
    want = attn.output_proj(loop_reference(value.detach(), shapes, locations.detach(), weights.detach()).float())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(2, 5, 4))


def test_reference_points_and_level_starts():
    ref = reference_points([(2, 4), (1, 1)])
    assert ref.shape == (1, 9, 1, 2)
    torch.testing.assert_close(ref[0, :4, 0], torch.tensor([[0.125, 0.25], [0.375, 0.25], [0.625, 0.25],
                                                             [0.875, 0.25]]))
    torch.testing.assert_close(ref[0, 8, 0], torch.tensor([0.5, 0.5]))
    assert level_start_index([(2, 4), (3, 3), (1, 1)]) == [0, 8, 17]


def test_gradients_flow_to_offsets_and_values():
    torch.manual_seed(1)
    attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=2)
    with torch.no_grad():  # at init the query reaches the output only through the zero-initialised linear weights
        attn.sampling_offsets.weight.normal_(0, 0.1)
        attn.attention_weights.weight.normal_(0, 0.1)
    query = torch.randn(1, 3, 8, requires_grad=True)
    feat = torch.randn(1, 12, 8, requires_grad=True)
    attn(query, reference_points([(3, 4)])[:, :3], feat, [(3, 4)]).sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert feat.grad.abs().sum() > 0 and query.grad.abs().sum() > 0


def test_sampling_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=2)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.3)
    query, feat, shapes = torch.randn(1, 5, 16), torch.randn(1, 64 * 64, 16), [(64, 64)]
    ref = torch.rand(1, 5, 1, 2) * 0.2 + 0.8  # near 1, where bf16 spacing is 1/128 (two pixels of this map)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        locations, weights = attn.sampling(query, ref, shapes)
        out = attn(query, ref, feat, shapes)
    assert locations.dtype == weights.dtype == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attn(query, ref, feat, shapes), rtol=0.05, atol=0.05)


def test_float64_stays_float64_outside_autocast():
    # ViT-Adapter's op casts to float32 only under autocast (custom_fwd(cast_inputs=torch.float32)); its double
    # kernel keeps float64 inputs in float64
    torch.manual_seed(0)
    d, shapes = 8, [(3, 4)]
    attn = MSDeformAttn(d_model=d, n_levels=1, n_heads=2, n_points=2).double()
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.attention_weights.weight.normal_(0, 0.5)
    query, feat = torch.randn(1, 4, d, dtype=torch.float64), torch.randn(1, 12, d, dtype=torch.float64)
    ref = torch.rand(1, 4, 1, 2, dtype=torch.float64)
    locations, weights = attn.sampling(query, ref, shapes)
    assert locations.dtype == weights.dtype == torch.float64
    # float64 by hand: offsets / (W, H) around the reference point, softmax over the points of each head
    offsets = (query @ attn.sampling_offsets.weight.T + attn.sampling_offsets.bias).view(1, 4, 2, 1, 2, 2)
    want_loc = ref[:, :, None, :, None, :] + offsets / torch.tensor([4.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(locations, want_loc, rtol=1e-13, atol=1e-13)
    value = attn.value_proj(feat).view(1, 12, 2, 4)
    want = attn.output_proj(loop_reference(value.detach(), shapes, locations.detach(), weights.detach()))
    got = attn(query, ref, feat, shapes)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
