"""Classification ViT backbones: thin, registered factories over timm's ``VisionTransformer``.

MAE's fine-tuning / linear-probe model ([MAE] ``models_vit.py``, He et al., CVPR 2022) is timm's ViT with
``global_pool='avg'`` (mean of the patch tokens, cls excluded, then a fresh ``fc_norm``; the final ``norm`` becomes
identity) or ``global_pool='token'`` (final ``norm``, then the cls token). timm >= 0.9 provides both modes itself, so
there is no subclass and no override of ``forward_features`` (the MAE subclass double-pools under newer timm,
``models_vit.py``). LayerNorm eps 1e-6, qkv bias on, drop-path linearly spaced over depth (MAE ``models_vit.py``, timm).

Keys are timm's (``patch_embed.proj.*``, ``cls_token``, ``pos_embed``, ``blocks.N.*``, ``norm.*`` / ``fc_norm.*``,
``head.*``), the same as the encoder part of ``models/mim.py`` and of official MAE checkpoints.
"""
from __future__ import annotations

from functools import partial
from typing import Literal

import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from models.registry import register_model

GlobalPool = Literal["avg", "token"]


def _vit(arch: dict, *, img_size: int = 224, num_classes: int = 1000, global_pool: GlobalPool = "token",
         drop_path_rate: float = 0.0, **kwargs) -> VisionTransformer:
    if global_pool not in ("avg", "token"):
        raise ValueError(f"global_pool must be 'avg' (mean of patch tokens -> fc_norm) or 'token' (norm -> cls), "
                         f"got {global_pool!r}")
    return VisionTransformer(img_size=img_size, num_classes=num_classes, global_pool=global_pool,
                             drop_path_rate=drop_path_rate, qkv_bias=True, mlp_ratio=4.0,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **{**arch, **kwargs})


@register_model
def vit_tiny_patch16(**kwargs) -> VisionTransformer:
    """ViT-Ti/16 (D 192, depth 12, 3 heads). kwargs: img_size, num_classes, global_pool, drop_path_rate, ..."""
    return _vit(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), **kwargs)


@register_model
def vit_small_patch16(**kwargs) -> VisionTransformer:
    """ViT-S/16 (D 384, depth 12, 6 heads)."""
    return _vit(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), **kwargs)


@register_model
def vit_base_patch16(**kwargs) -> VisionTransformer:
    """ViT-B/16 (D 768, depth 12, 12 heads), [MAE] ``models_vit.vit_base_patch16``."""
    return _vit(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs)


@register_model
def vit_large_patch16(**kwargs) -> VisionTransformer:
    """ViT-L/16 (D 1024, depth 24, 16 heads), [MAE] ``models_vit.vit_large_patch16``."""
    return _vit(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), **kwargs)


@register_model
def vit_huge_patch14(**kwargs) -> VisionTransformer:
    """ViT-H/14 (D 1280, depth 32, 16 heads), [MAE] ``models_vit.vit_huge_patch14``."""
    return _vit(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), **kwargs)


def init_head(head: nn.Linear, std: float) -> None:
    """Re-initialise a classifier after loading: weight trunc_normal(std), bias 0.

    MAE uses std 2e-5 for fine-tuning and 0.01 for linear probing (``main_finetune.py``, ``main_linprobe.py``).
    """
    trunc_normal_(head.weight, std=std)
    nn.init.zeros_(head.bias)


def unit_of(name: str, *, depth: int) -> int:
    """Layer id of a ViT parameter for layer-wise lr decay ([MAE] ``util/lr_decay.get_layer_id_for_vit``).

    Args:
        name: parameter or state-dict name of a timm ``VisionTransformer``.
        depth: number of blocks.

    Returns:
        0 for ``cls_token``, ``pos_embed``, ``patch_embed.*``; ``j + 1`` for ``blocks.j.*``; ``depth + 1`` for the
        rest (``norm``, ``fc_norm``, ``head``).
    """
    parts = name.split(".")
    if parts[0] in ("cls_token", "pos_embed", "patch_embed", "reg_token"):
        return 0
    if parts[0] == "blocks":
        return int(parts[1]) + 1
    return depth + 1
