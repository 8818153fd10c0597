"""Fixed 2-D sin-cos position embeddings and their resampling to a new patch grid.

Derived from MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022;
github.com/facebookresearch/mae ``util/pos_embed.py``), itself after MoCo v3. The table layout is kept exactly
(MAE
``util/pos_embed.py get_2d_sincos_pos_embed``) so MAE / LocalMIM checkpoints line up:
for the token at (row r, col c) the channels are
``[sin(c*w) | cos(c*w) | sin(r*w) | cos(r*w)]`` with ``w_k = 10000 ** (-k / (D / 4))``; the column (x) index
comes first because MAE builds its meshgrid with the w-coordinate first. Resampling wraps
``timm.layers.resample_abs_pos_embed`` with MAE's settings (bicubic, align_corners False, no antialias).
"""
from __future__ import annotations

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """1-D sin-cos table.

    Args:
        embed_dim: output width D1 (even).
        pos: positions, any shape with M elements.

    Returns:
        [M, D1] float64 array ``[sin(pos * w) | cos(pos * w)]``, ``w_k = 10000 ** (-k / (D1 / 2))``.
    """
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos position embedding of a square patch grid (MAE layout, float64 math).

    Args:
        embed_dim: channel width D, divisible by 4.
        grid_size: G, patches per side; token t sits at row ``t // G``, col ``t % G``.
        cls_token: prepend an all-zero row for the class token.

    Returns:
        [1 + G*G, D] float32 (or [G*G, D] without cls_token).
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                             indexing="ij")
    emb = np.concatenate([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


def resample_pos_embed(pos_embed: Tensor, new_grid: int, num_prefix_tokens: int = 1) -> Tensor:
    """Bicubically resize the patch part of a square position embedding, keeping prefix (cls) rows.

    Same result as MAE's ``util/pos_embed.py interpolate_pos_embed``: bicubic, align_corners False, no antialias.

    Args:
        pos_embed: [1, num_prefix_tokens + G0*G0, D].
        new_grid: G1, the new number of patches per side.
        num_prefix_tokens: leading rows that are not on the grid (1 for a cls token).

    Returns:
        [1, num_prefix_tokens + G1*G1, D], the input itself when G0 == G1.
    """
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    old_grid = int(round(num_grid**0.5))
    if old_grid * old_grid != num_grid:
        raise ValueError(f"position embedding with {num_grid} grid tokens is not a square grid")
    return resample_abs_pos_embed(pos_embed, [new_grid, new_grid], [old_grid, old_grid],
                                  num_prefix_tokens=num_prefix_tokens, interpolation="bicubic", antialias=False)
