"""Decoders for masked image modeling: mask-token insertion, LocalMIM per-scale decoder, weight init.

Derived from MAE (He et al., CVPR 2022; github.com/facebookresearch/mae ``models_mae.py`` ``forward_decoder``,
``_init_weights``) and LocalMIM (Wang et al., CVPR 2023; huawei-noah/Efficient-Computing
``Self-supervised/LocalMIM/ViT/models_mim.py`` ``MAE_Decoder``), with the 8x head of ViTFreeze
(github.com/utkutpcgl/ViTFreeze ``ViT/models_mim.py``).

The MAE decoder itself lives inline in ``models/mim.py`` so that its parameters keep MAE's top-level checkpoint
names (``decoder_embed``, ``mask_token``, ``decoder_blocks``, ...); both decoders share
:func:`insert_mask_tokens`. :class:`LocalMIMDecoder` keeps LocalMIM's key names (``embed``, ``mask_token``,
``pos_embed``, ``blocks.N``, ``norm``, ``pred.N``).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import Block
from torch import Tensor

from models.pos_embed import get_2d_sincos_pos_embed

LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)
PREDICTION_SCALES = (8.0, 4.0, 2.0, 1.0, 0.5)


def init_linear_and_norm(module: nn.Module) -> None:
    """MAE / LocalMIM init for ``Module.apply``: Xavier-uniform Linear weights, zero biases, LayerNorm 1 / 0.

    Conv layers are left at PyTorch defaults (MAE ``models_mae.py _init_weights`` touches only Linear and LayerNorm).
    """
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)  # following the official JAX ViT
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def insert_mask_tokens(x: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """Append mask tokens after the visible tokens and undo the masking shuffle (cls stays first).

    Args:
        x: [B, 1+K, Dd], cls token then the K visible tokens in shuffled order.
        mask_token: [1, 1, Dd].
        ids_restore: [B, L] from :func:`models.masking.random_masking`.

    Returns:
        [B, 1+L, Dd], cls then all L tokens in the original (row-major) order.
    """
    batch, n, dim = x.shape
    length = ids_restore.shape[1]
    mask_tokens = mask_token.expand(batch, length + 1 - n, -1)
    x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x_.shape[-1]))
    return torch.cat([x[:, :1], x_], dim=1)


def prediction_head(dim: int, out_dim: int, scale: float) -> nn.Sequential:
    """LocalMIM's per-scale head from a [B, dim, G, G] map to [B, out_dim, G*scale, G*scale].

    8: ConvT, LN2d, GELU, ConvT, LN2d, GELU, ConvT, Conv1x1 (ViTFreeze); 4: ConvT, LN2d, GELU, ConvT, Conv1x1;
    2: ConvT, Conv1x1; 1: Conv1x1; 0.5: AvgPool 2x2, Conv1x1. Every ConvT is kernel 2 / stride 2 and halves the
    channels; LN2d is a channels-first LayerNorm (eps 1e-6).

    Args:
        dim: decoder width.
        out_dim: target width per output cell.
        scale: one of :data:`PREDICTION_SCALES`.

    Returns:
        The head; module indices follow LocalMIM (e.g. ``pred.4`` is the 1x1 conv of the 4x head).
    """
    layers: list[nn.Module] = []
    hidden = dim
    if scale in (8.0, 4.0, 2.0):
        for i in range(int(scale).bit_length() - 1):
            if i > 0:
                layers += [LayerNorm2d(hidden, eps=1e-6), nn.GELU()]
            layers.append(nn.ConvTranspose2d(hidden, hidden // 2, kernel_size=2, stride=2))
            hidden //= 2
    elif scale == 0.5:
        layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
    elif scale != 1.0:
        raise ValueError(f"unsupported prediction scale {scale}; supported: {PREDICTION_SCALES}")
    layers.append(nn.Conv2d(hidden, out_dim, kernel_size=1))
    return nn.Sequential(*layers)


class LocalMIMDecoder(nn.Module):
    """One LocalMIM decoder: Linear embed, mask tokens, fixed sin-cos position, Blocks, LayerNorm, scale head.

    Maps a stage latent [B, 1+K, D] to a prediction [B, (G*scale)**2, out_dim] on the row-major output grid.
    """

    def __init__(self, in_dim: int, out_dim: int, scale: float, grid_size: int, embed_dim: int = 256,
                 depth: int = 1, num_heads: int = 8, mlp_ratio: float = 4.0) -> None:
        """
        Args:
            in_dim: encoder width D.
            out_dim: target width per output cell (3 * nbins for HOG, 3 * r * r for pixels).
            scale: output cells per patch side, one of :data:`PREDICTION_SCALES`.
            grid_size: G, encoder patches per side.
            embed_dim: decoder width Dd (256 in LocalMIM).
            depth: decoder Blocks (1 in LocalMIM).
            num_heads: attention heads of the decoder Blocks.
            mlp_ratio: MLP hidden width over Dd.
        """
        super().__init__()
        self.scale = float(scale)
        self.grid_size = grid_size
        self.embed = nn.Linear(in_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed, but persistent: LocalMIM checkpoints carry decoder.K.pos_embed.
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(embed_dim, grid_size).unsqueeze(0))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LAYER_NORM)
                                     for _ in range(depth)])
        self.norm = LAYER_NORM(embed_dim)
        self.pred = prediction_head(embed_dim, out_dim, self.scale)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_and_norm)

    def forward(self, x: Tensor, ids_restore: Tensor) -> Tensor:
        """
        Args:
            x: stage latent, [B, 1+K, D] (cls first).
            ids_restore: [B, L] from the encoder's masking, L = G*G.

        Returns:
            [B, (G*scale)**2, out_dim].
        """
        x = insert_mask_tokens(self.embed(x), self.mask_token, ids_restore) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        x = x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, self.grid_size, self.grid_size)
        return self.pred(x).flatten(2).transpose(1, 2)
