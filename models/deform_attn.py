"""Multi-scale deformable attention in plain PyTorch (``grid_sample``), no compiled extension.

Zhu et al., "Deformable DETR: Deformable Transformers for End-to-End Object Detection", ICLR 2021
(github.com/fundamentalvision/Deformable-DETR ``models/ops/modules/ms_deform_attn.py`` and the "pytorch core"
``ms_deform_attn_core_pytorch`` in ``models/ops/functions/ms_deform_attn_func.py``). The CUDA op of that repository
(used by ViT-Adapter, Chen et al., ICLR 2023) computes the same sum; this version runs on CPU and on any GPU.

For a query q, head m, level l and point k with sampling location ``s = (x, y)`` in [0, 1] coordinates of level l
(H_l x W_l), the output is ``sum_{l,k} A[q,m,l,k] * bilinear(V_l[m], x * W_l - 0.5, y * H_l - 0.5)``, where the
bilinear read is zero outside the map (the CUDA op's border rule = ``grid_sample(align_corners=False,
padding_mode='zeros')``) and the weights A are a softmax over the L*K (level, point) pairs of each head.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ms_deform_attn", "MSDeformAttn", "reference_points", "level_start_index"]


def _shapes(spatial_shapes: Tensor | list[tuple[int, int]]) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor | list[tuple[int, int]], sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """The deformable-attention sum (Deformable DETR's ``ms_deform_attn_core_pytorch``).

    Args:
        value: [N, S, M, Dh], S = sum_l H_l * W_l tokens of all levels flattened row-major, level after level.
        spatial_shapes: [L, 2] rows (H_l, W_l).
        sampling_locations: [N, Lq, M, L, K, 2] as (x, y) in [0, 1] of each level (outside: reads zeros).
        attention_weights: [N, Lq, M, L, K] (already normalised by the caller).

    Returns:
        [N, Lq, M * Dh].
    """
    shapes = _shapes(spatial_shapes)
    n, s, m, dh = value.shape
    _, lq, _, num_levels, k, _ = sampling_locations.shape
    if sum(h * w for h, w in shapes) != s or len(shapes) != num_levels:
        raise ValueError(f"value has {s} tokens and locations {num_levels} levels, spatial shapes {shapes} disagree")
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] with align_corners=False: pixel i spans [i, i+1)
    sampled = []
    for level, ((h, w), v) in enumerate(zip(shapes, value.split([h * w for h, w in shapes], dim=1))):
        v = v.flatten(2).transpose(1, 2).reshape(n * m, dh, h, w)              # [N*M, Dh, H, W]
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)            # [N*M, Lq, K, 2]
        sampled.append(F.grid_sample(v, grid.to(v.dtype), mode="bilinear", padding_mode="zeros",
                                     align_corners=False))                    # [N*M, Dh, Lq, K]
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * k)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights.to(value.dtype)).sum(-1)  # [N*M, Dh, Lq]
    return out.view(n, m * dh, lq).transpose(1, 2).contiguous()


def level_start_index(spatial_shapes: Tensor | list[tuple[int, int]]) -> list[int]:
    """Offsets of each level's first token in the flattened sequence: [0, H_0 W_0, H_0 W_0 + H_1 W_1, ...]."""
    starts, total = [], 0
    for h, w in _shapes(spatial_shapes):
        starts.append(total)
        total += h * w
    return starts


def reference_points(spatial_shapes: list[tuple[int, int]], device: torch.device | None = None) -> Tensor:
    """Pixel centres of every level, normalised to [0, 1] as (x, y): [1, sum_l H_l W_l, 1, 2] (ViT-Adapter's
    ``get_reference_points``; the singleton level dimension broadcasts over the key levels)."""
    refs = []
    for h, w in spatial_shapes:
        ys, xs = torch.meshgrid((torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h,
                                (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w, indexing="ij")
        refs.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), -1))
    return torch.cat(refs, 0)[None, :, None]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 under autocast (ViT-Adapter's op: ``custom_fwd(cast_inputs=torch.float32)``); outside autocast a
    float64 input stays float64 (the op's double kernel), anything else runs in float32."""
    if torch.is_autocast_enabled(x.device.type) or x.dtype != torch.float64:
        return torch.float32
    return torch.float64


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR's ``MSDeformAttn``, with ViT-Adapter's ``ratio``).

    Each query predicts, per head, level and point, a 2-D offset from its reference point (``sampling_offsets``,
    in units of the level's pixels) and an attention weight (``attention_weights``, softmax over levels x points);
    the keys are ``value_proj`` of the input, the result goes through ``output_proj``.

    Args:
        d_model: D of queries and inputs.
        n_levels: L, key levels.
        n_heads: M; ``d_model * ratio`` must divide by it.
        n_points: K, sampling points per head and level.
        ratio: value width ``int(d_model * ratio)`` (ViT-Adapter's ``deform_ratio``; 1 in Deformable DETR).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 ratio: float = 1.0) -> None:
        super().__init__()
        value_dim = int(d_model * ratio)
        if value_dim % n_heads:
            raise ValueError(f"value width d_model * ratio = {value_dim} must be divisible by n_heads = {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.value_dim = value_dim
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: offsets start on a ring of M directions (point k at distance k + 1 in
        the largest coordinate), uniform attention, Xavier value and output projections with zero bias."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def sampling(self, query: Tensor, ref_points: Tensor,
                 spatial_shapes: Tensor | list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """Sampling locations [N, Lq, M, L, K, 2] and softmaxed weights [N, Lq, M, L, K] of ``query`` [N, Lq, D]
        around ``ref_points`` [N or 1, Lq, L or 1, 2] ((x, y) in [0, 1]); offsets are divided by (W_l, H_l)."""
        n, lq, _ = query.shape
        m, lv, k = self.n_heads, self.n_levels, self.n_points
        # fp32 from here on under autocast (as ViT-Adapter's op, custom_fwd(cast_inputs=float32)): a bf16 location
        # near 1.0 is only good to 1/128, a whole pixel on a 256-wide map; fp64 stays fp64 outside autocast
        dtype = _compute_dtype(query)
        offsets = self.sampling_offsets(query).to(dtype).view(n, lq, m, lv, k, 2)
        weights = self.attention_weights(query).to(dtype).view(n, lq, m, lv * k).softmax(-1).view(n, lq, m, lv, k)
        shapes = torch.as_tensor(_shapes(spatial_shapes), dtype=dtype, device=query.device)
        normalizer = torch.stack([shapes[:, 1], shapes[:, 0]], -1)  # (W_l, H_l)
        if ref_points.shape[-1] != 2:
            raise ValueError(f"reference points must be (x, y) pairs, got last dim {ref_points.shape[-1]}")
        locations = ref_points.to(dtype)[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return locations, weights

    def forward(self, query: Tensor, ref_points: Tensor, input_flatten: Tensor,
                spatial_shapes: Tensor | list[tuple[int, int]], padding_mask: Tensor | None = None) -> Tensor:
        """Attend from ``query`` [N, Lq, D] to the flattened multi-scale ``input_flatten`` [N, S, D].

        Args:
            query: [N, Lq, D].
            ref_points: [N or 1, Lq, L or 1, 2], (x, y) in [0, 1].
            input_flatten: [N, S, D], levels flattened row-major and concatenated.
            spatial_shapes: [L, 2] rows (H_l, W_l).
            padding_mask: optional [N, S], True where the input is padding (its value is zeroed).

        Returns:
            [N, Lq, D].
        """
        n, s, _ = input_flatten.shape
        if len(_shapes(spatial_shapes)) != self.n_levels:
            raise ValueError(f"MSDeformAttn built for {self.n_levels} levels, got spatial shapes {spatial_shapes}")
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.value_dim // self.n_heads)
        locations, weights = self.sampling(query, ref_points, spatial_shapes)
        dtype = locations.dtype
        with torch.autocast(device_type=value.device.type, enabled=False):
            out = ms_deform_attn(value.to(dtype), spatial_shapes, locations, weights)
        return self.output_proj(out.to(query.dtype))
