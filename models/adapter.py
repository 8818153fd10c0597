"""ViT-Adapter: a plain ViT plus a convolutional spatial prior and deformable-attention interactions, giving the
four-level feature pyramid (strides 4, 8, 16, 32) that dense heads (Mask R-CNN + FPN, UperNet) take.

Chen et al., "Vision Transformer Adapter for Dense Predictions", ICLR 2023 (github.com/czczup/ViT-Adapter,
``detection/mmdet_custom/models/backbones/vit_adapter.py`` and ``adapter_modules.py``; DINOv2 configs
``detection/configs/mask_rcnn/dinov2/*.py``). Layout as there:

- spatial prior module (SPM): ResNet-like conv stem -> c1..c4 at strides 4, 8, 16, 32, each projected to D by a
  1x1 conv; c2..c4 get a learned level embedding and are flattened into one sequence ``c``;
- four interactions over block ranges (depth 12: [0-2], [3-5], [6-8], [9-11]): an **injector** (ViT patch
  tokens query ``c`` with 3-level deformable attention; ``x + gamma * attn`` with gamma initialised to 0, so the
  pretrained ViT starts untouched), the ViT blocks of the range, then an **extractor** (``c`` queries the ViT
  patch tokens with 1-level deformable attention, then a ConvFFN: linear, 3x3 depth-wise conv per level, GELU,
  linear); the last interaction has two extra extractors;
- outputs: c1 + up(c2), c2, c3, c4, each plus ViT tokens resized to that stride (bilinear), then a BatchNorm per
  level. Detection (``detection/mmdet_custom/models/backbones/vit_adapter.py``, which the DINOv2 configs run) adds
  the last interaction's tokens to every level; segmentation (``segmentation/mmseg_custom/models/backbones/
  vit_adapter.py``) adds interaction i's tokens to level i: ``vit_feature_per_interaction=True``.

Differences from the reference, and why:

- The ViT is timm's ``VisionTransformer`` from ``models/vit.py`` under ``vit.*`` (composition; the reference
  subclasses its own ViT). It keeps its **prefix tokens** (cls and, for DINOv2 *_reg4, register tokens) in the
  token sequence; the interactions read and write only the patch tokens. The reference drops the cls token; keeping
  it makes the ViT tokens identical to the pretrained ViT's while the injector gammas are 0 (tested) and uses
  every backbone key of the checkpoint. The ViT's final ``norm`` is not used (as in the reference) and is removed,
  so DDP sees no unused parameter; a checkpoint's ``norm.*`` is reported as unexpected.
- **LayerScale** stays a module (timm ``init_values``, keys ``blocks.N.ls{1,2}.gamma``) in every row, DINOv2 and
  DeiT alike: the reference's ``TIMMVisionTransformer`` (``backbones/base/vit.py``) defaults to ``layer_scale=True``
  with ``gamma1``/``gamma2`` initialised to 1 and trained, and the DeiT configs keep that default; folding it into ``attn.proj`` /
  ``mlp.fc2`` is exact at load time but changes fine-tuning (AdamW steps are relative to the weights' scale, and
  the reference's layer-decay recipe was tuned with gammas as parameters). A model built with
  ``layer_scale=False`` gets checkpoints with LayerScale folded (``models/convert.backbone_state``).
- ``level_embed`` does not decay (the reference's DeiT-adapter configs: ``custom_keys={'level_embed':
  dict(decay_mult=0.)}``, e.g. ``detection/configs/mask_rcnn/mask_rcnn_deit_adapter_base_fpn_3x_coco.py``).
- Window attention (``window_size`` / ``global_blocks``, the DINOv2 configs' ``window_attn``): non-overlapping
  windows over the patch grid, padded at the bottom/right with the padded keys masked out (the reference lets
  zero-padded keys take part with logit 0); the prefix tokens form their own group in windowed blocks.
- Multi-scale deformable attention is the ``grid_sample`` implementation of ``models/deform_attn.py`` (no
  compiled op); BatchNorm is plain ``BatchNorm2d`` (convert with ``nn.SyncBatchNorm.convert_sync_batchnorm`` for
  DDP as the reference's SyncBN).
"""
from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, SwiGLUPacked, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from models.backbone import DENSE_UNUSED, load_pretrained
from models.convert import backbone_state
from models.deform_attn import MSDeformAttn, reference_points
from models.registry import register_model
from models.vit import unit_of as vit_unit_of

__all__ = ["ViTAdapter", "PyramidFPN", "SpatialPriorModule", "Injector", "Extractor", "InteractionBlock",
           "ADAPTER_MODELS", "create_adapter", "default_interaction_indexes"]

logger = logging.getLogger(__name__)

_Norm = partial(nn.LayerNorm, eps=1e-6)
Shapes = list[tuple[int, int]]


class ConvFFN(nn.Module):
    """Linear -> 3x3 depth-wise conv on each level's grid -> GELU -> linear (reference ``ConvFFN`` + ``DWConv``)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, shapes: Shapes) -> Tensor:
        """x: [B, sum_l H_l W_l, D] levels of ``shapes`` concatenated -> same shape."""
        x = self.fc1(x)
        b, _, c = x.shape
        parts = []
        for part, (h, w) in zip(x.split([h * w for h, w in shapes], dim=1), shapes):
            grid = part.transpose(1, 2).reshape(b, c, h, w)
            parts.append(self.dwconv(grid).flatten(2).transpose(1, 2))
        return self.drop(self.fc2(self.drop(self.act(torch.cat(parts, dim=1)))))


class Injector(nn.Module):
    """ViT patch tokens query the spatial features: ``x + gamma * MSDeformAttn(norm(x), norm(c))``."""

    def __init__(self, dim: int, *, num_heads: int, n_points: int, n_levels: int = 3, deform_ratio: float = 1.0,
                 init_values: float = 0.0) -> None:
        super().__init__()
        self.query_norm, self.feat_norm = _Norm(dim), _Norm(dim)
        self.attn = MSDeformAttn(dim, n_levels=n_levels, n_heads=num_heads, n_points=n_points, ratio=deform_ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, query: Tensor, ref: Tensor, feat: Tensor, shapes: Shapes) -> Tensor:
        return query + self.gamma * self.attn(self.query_norm(query), ref, self.feat_norm(feat), shapes)


class Extractor(nn.Module):
    """Spatial features query the ViT patch tokens, then a ConvFFN: ``c + attn``, ``c + drop_path(ffn)``."""

    def __init__(self, dim: int, *, num_heads: int, n_points: int, deform_ratio: float = 1.0,
                 cffn_ratio: float = 0.25, drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.query_norm, self.feat_norm = _Norm(dim), _Norm(dim)
        self.attn = MSDeformAttn(dim, n_levels=1, n_heads=num_heads, n_points=n_points, ratio=deform_ratio)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio), drop=drop)
        self.ffn_norm = _Norm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, query: Tensor, ref: Tensor, feat: Tensor, feat_shape: Shapes, query_shapes: Shapes) -> Tensor:
        query = query + self.attn(self.query_norm(query), ref, self.feat_norm(feat), feat_shape)
        return query + self.drop_path(self.ffn(self.ffn_norm(query), query_shapes))


class InteractionBlock(nn.Module):
    """Injector, then (outside, by :class:`ViTAdapter`) the ViT blocks of the range, then extractor(s)."""

    def __init__(self, dim: int, *, num_heads: int, n_points: int, deform_ratio: float, cffn_ratio: float,
                 init_values: float, drop_path: float, extra_extractor: bool) -> None:
        super().__init__()
        common = dict(num_heads=num_heads, n_points=n_points, deform_ratio=deform_ratio)
        self.injector = Injector(dim, init_values=init_values, **common)
        self.extractor = Extractor(dim, cffn_ratio=cffn_ratio, drop_path=drop_path, **common)
        self.extra_extractors = nn.ModuleList([Extractor(dim, cffn_ratio=cffn_ratio, drop_path=drop_path, **common)
                                               for _ in range(2)] if extra_extractor else [])

    def extract(self, c: Tensor, x: Tensor, ref: Tensor, vit_shape: Shapes, c_shapes: Shapes) -> Tensor:
        for extractor in [self.extractor, *self.extra_extractors]:
            c = extractor(c, ref, x, vit_shape, c_shapes)
        return c


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """Conv stem (3 convs, max-pool) and three stride-2 convs: c1..c4 at strides 4..32, projected to D (1x1 conv).

    Returns c1 [B, D, H/4, W/4] and c2, c3, c4 flattened to [B, h_l * w_l, D].
    """

    def __init__(self, inplanes: int = 64, embed_dim: int = 384) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, inplanes, 2), *_conv_bn_relu(inplanes, inplanes, 1),
                                  *_conv_bn_relu(inplanes, inplanes, 1), nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return (self.fc1(c1), *(fc(c).flatten(2).transpose(1, 2) for fc, c in ((self.fc2, c2), (self.fc3, c3),
                                                                             (self.fc4, c4))))


def default_interaction_indexes(depth: int) -> list[tuple[int, int]]:
    """Four equal block ranges (first, last): depth 12 -> (0, 2), (3, 5), (6, 8), (9, 11); 24 -> (0, 5), ..."""
    if depth % 4:
        raise ValueError(f"default interaction ranges need a depth divisible by 4, got {depth}; pass "
                         "interaction_indexes explicitly")
    q = depth // 4
    return [(i * q, i * q + q - 1) for i in range(4)]


class ViTAdapter(nn.Module):
    """ViT-Adapter around timm's ViT; ``forward(x [B, 3, H, W])`` -> OrderedDict "0".."3" of [B, D, H/s, W/s] for
    strides s = 4, 8, 16, 32 (H, W multiples of 32), the contract of ``models/pyramid.ViTFeaturePyramid``.

    Args:
        embed_dim, depth, num_heads, mlp_ratio: the ViT (patch 16).
        img_size: the ViT's position-embedding grid is ``img_size / 16`` (ViT-Adapter's ``pretrain_size``; 592 for
            the DINOv2 recipes, where the 37x37 grid of a DINOv2 checkpoint is used as is); inputs of any size that
            is a multiple of 32 are accepted and the grid is resampled bicubically on the fly.
        drop_path_rate: stochastic depth of the ViT (linear over depth) and of the extractors' ConvFFN.
        layer_scale: LayerScale in every block (the reference's default; gammas initialised to 1 as there).
        reg_tokens: register tokens (DINOv2 *_reg4); their position has no embedding, as in DINOv2.
        swiglu: SwiGLU feed-forward (DINOv2 ViT-g/14; timm ``SwiGLUPacked``, fc1 = DINOv2's w12, fc2 = w3).
        conv_inplane: width of the spatial prior module's stem.
        n_points, deform_num_heads, deform_ratio: deformable attention (points per head and level, heads, value
            width ratio).
        cffn_ratio: ConvFFN hidden width / D.
        init_values: initial injector gamma (0: the pretrained ViT starts untouched).
        interaction_indexes: (first, last) block of each interaction; default four equal ranges.
        add_vit_feature: add ViT tokens, resized, to the output levels.
        vit_feature_per_interaction: False (detection): the last interaction's tokens go to every level; True
            (the reference's segmentation backbone): interaction i's tokens go to level i.
        use_extra_extractor: two extra extractors in the last interaction.
        window_size: 0 = global attention everywhere; else window attention in every block not in ``global_blocks``
            (the DINOv2 configs: 14, global blocks 2, 5, 8, 11 for depth 12; ``ViTFeaturePyramid``'s arguments).
        global_blocks: blocks that keep global attention under ``window_size`` (negative indices count from the end).
        grad_checkpointing: recompute the ViT blocks in backward (memory for time).
    """

    strides = (4, 8, 16, 32)

    def __init__(self, *, embed_dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 img_size: int = 224, drop_path_rate: float = 0.0, layer_scale: bool = False, reg_tokens: int = 0,
                 swiglu: bool = False, conv_inplane: int = 64, n_points: int = 4, deform_num_heads: int = 6,
                 deform_ratio: float = 1.0, cffn_ratio: float = 0.25, init_values: float = 0.0,
                 interaction_indexes: Sequence[Sequence[int]] | None = None, add_vit_feature: bool = True,
                 use_extra_extractor: bool = True, window_size: int = 0, global_blocks: Sequence[int] = (),
                 grad_checkpointing: bool = False, vit_feature_per_interaction: bool = False) -> None:
        super().__init__()
        vit_kwargs: dict[str, Any] = dict(init_values=1.0 if layer_scale else None, reg_tokens=reg_tokens,
                                          no_embed_class=reg_tokens > 0)
        if swiglu:  # DINOv2 ViT-g: hidden (int(4 D * 2/3) + 7) // 8 * 8, packed gate and value in fc1 (as timm)
            hidden = (int(embed_dim * 4 * 2 / 3) + 7) // 8 * 8
            # timm sizes fc1 as int(D * mlp_ratio): + 0.5 keeps float rounding from losing a unit
            vit_kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=(2 * hidden + 0.5) / embed_dim)
        else:
            vit_kwargs.update(mlp_ratio=mlp_ratio)
        # the classification ViT of models/vit.py (qkv bias, LayerNorm eps 1e-6), no head
        self.vit = VisionTransformer(img_size=img_size, patch_size=16, embed_dim=embed_dim, depth=depth,
                                     num_heads=num_heads, num_classes=0, global_pool="token", qkv_bias=True,
                                     drop_path_rate=drop_path_rate, norm_layer=_Norm, **vit_kwargs)
        self.vit.norm = nn.Identity()  # unused by the adapter (as in the reference): no parameter without a gradient
        self.embed_dim, self.depth, self.out_channels, self.layer_scale = embed_dim, depth, embed_dim, layer_scale
        self.num_layers = depth + 1  # layer-decay exponent of layer 0 (param_groups' num_layers)
        ranges = [tuple(r) for r in (interaction_indexes or default_interaction_indexes(depth))]
        if [r[0] for r in ranges] != [0] + [r[1] + 1 for r in ranges[:-1]] or ranges[-1][1] != depth - 1:
            raise ValueError(f"interaction_indexes {ranges} must cover blocks 0..{depth - 1} in consecutive ranges")
        self.interaction_indexes = ranges
        if window_size < 0 or any(not -depth <= i < depth for i in global_blocks):
            raise ValueError(f"window_size must be >= 0 and global_blocks in [-{depth}, {depth}), got {window_size}, "
                             f"{list(global_blocks)}")
        self.window_size = window_size
        self.window_blocks = frozenset(set(range(depth)) - {i % depth for i in global_blocks}) if window_size else \
            frozenset()
        self.add_vit_feature, self.grad_checkpointing = add_vit_feature, grad_checkpointing
        self.vit_feature_per_interaction = vit_feature_per_interaction
        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spm = SpatialPriorModule(conv_inplane, embed_dim)
        self.interactions = nn.ModuleList([
            InteractionBlock(embed_dim, num_heads=deform_num_heads, n_points=n_points, deform_ratio=deform_ratio,
                             cffn_ratio=cffn_ratio, init_values=init_values, drop_path=drop_path_rate,
                             extra_extractor=use_extra_extractor and i == len(ranges) - 1)
            for i in range(len(ranges))])
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        self.norms = nn.ModuleList([nn.BatchNorm2d(embed_dim) for _ in range(4)])
        for module in (self.up, self.spm, self.interactions):
            module.apply(_init_weights)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    # ---- parameters ---------------------------------------------------------------------------------------------
    def layer_id(self, name: str) -> int:
        """Layer of a parameter for layer-wise lr decay (ViT-Adapter's ``LayerDecayOptimizerConstructor``): 0 for
        the ViT's patch embedding, position embedding, cls and register tokens; j + 1 for ``vit.blocks.j``;
        ``depth + 1`` (lr scale 1) for everything of the adapter."""
        # the ViT's own rule (MAE's get_layer_id_for_vit, models.vit.unit_of) under "vit."; the rest at scale 1
        return vit_unit_of(name[4:], depth=self.depth) if name.startswith("vit.") else self.depth + 1

    def no_weight_decay(self) -> set[str]:
        """The ViT's position embedding and tokens (timm's ``no_weight_decay``), under ``vit.``, and ``level_embed``
        (the reference's DeiT-adapter configs, ``custom_keys={'level_embed': dict(decay_mult=0.)}``)."""
        return {f"vit.{name}" for name in self.vit.no_weight_decay()} | {"vit.reg_token", "level_embed"}

    def load_backbone(self, checkpoint: Mapping[str, Any], *, source: str = "auto",
                      what: str = "checkpoint") -> tuple[list[str], list[str]]:
        """Load a ViT checkpoint into ``vit.*`` (the contract of ``ViTFeaturePyramid.load_backbone``), under the one
        policy of ``models.backbone.load_pretrained``.

        Accepts any layout ``models/convert`` reads, as loaded (DINOv2 raw, *_reg4, ViT-Adapter's 14->16 file,
        DeiT, MAE, ours, timm) or already converted by ``to_timm_vit``. Patch kernel and position grid are fitted to
        this model. LayerScale is kept when the model has it (every factory row); if the checkpoint has none (DeiT, or
        a state already folded by ``to_timm_vit``) the gammas are set to 1 (the same function; the reference
        initialises its gammas to 1 too) and a warning says so. The adapter's own modules stay at their
        initialisation.

        Returns:
            ``(missing, unexpected)`` ViT keys, without the ``vit.`` prefix, sorted: missing is empty (a missing
            ViT key raises), unexpected are the checkpoint's keys the adapter does not use (``norm.*``, which
            :data:`models.backbone.DENSE_UNUSED` expects; any other is ignored with a warning).

        Raises:
            ValueError: a ViT key is missing, shapes differ, or the checkpoint has parts this model lacks
                (register tokens, SwiGLU, other block parameters).
        """
        state, source = backbone_state(checkpoint, self.vit, source=source)
        own = self.vit.state_dict()
        unset_gammas = [k for k in own if re.search(r"\.ls[12]\.gamma$", k) and k not in state]
        if unset_gammas:
            logger.warning("%s has no LayerScale for the %d gammas of the ViT-Adapter's ViT (folded or never "
                           "trained with it): they start at 1, which leaves the checkpoint's function unchanged",
                           what, len(unset_gammas))
            state.update({k: torch.ones_like(own[k]) for k in unset_gammas})
        missing, unexpected = load_pretrained(self.vit, state, expected_unused=DENSE_UNUSED,
                                              source=f"{what} ({source} checkpoint into the ViT-Adapter's ViT)")
        logger.info("the ViT-Adapter's own %d tensors start initialised", len(self.state_dict()) - len(own))
        return missing, unexpected

    # ---- forward --------------------------------------------------------------------------------------------------
    def _tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch embedding, position embedding (resampled to the input's grid) and prefix tokens: [B, T + h w, D]."""
        vit = self.vit
        patches = vit.patch_embed.proj(x)
        h, w = patches.shape[-2:]
        patches = vit.patch_embed.norm(patches.flatten(2).transpose(1, 2))
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        pos = resample_abs_pos_embed(vit.pos_embed, new_size=[h, w], old_size=list(vit.patch_embed.grid_size),
                                     num_prefix_tokens=prefix, interpolation="bicubic", antialias=False)
        tokens = [t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if vit.no_embed_class:  # DINOv2 with registers: cls already holds its position (converter), registers none
            out = torch.cat(tokens + [patches + pos], dim=1)
        else:
            out = torch.cat(tokens + [patches], dim=1) + pos
        return vit.norm_pre(vit.pos_drop(out)), (h, w)

    def _block(self, index: int, x: Tensor, hw: tuple[int, int]) -> Tensor:
        block = self.vit.blocks[index]
        run = partial(checkpoint, block, use_reentrant=False) if self.grad_checkpointing and self.training else block
        if index not in self.window_blocks:
            return run(x)
        prefix = self.vit.num_prefix_tokens
        windows, mask, padded = _partition(x[:, prefix:], hw, self.window_size)
        windows = run(windows, attn_mask=mask) if mask is not None else run(windows)
        patches = _unpartition(windows, hw, padded, self.window_size, x.shape[0])
        return torch.cat([run(x[:, :prefix]), patches], dim=1) if prefix else patches

    def forward_interactions(self, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor, tuple[int, int]]:
        """Run the ViT and the interactions.

        Returns:
            ``(vit_tokens, c, c1, (h, w))``: the ViT token sequence [B, T + h w, D] after each interaction's last
            block, the spatial features ``c`` [B, 4hw + hw + hw/4, D] after the last extractor, c1 [B, D, 4h, 4w]
            from the spatial prior module, and the ViT grid (h, w) = (H/16, W/16).
        """
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"ViT-Adapter needs input height and width divisible by 32, got {tuple(x.shape[-2:])}")
        c1, c2, c3, c4 = self.spm(x)
        c = torch.cat([c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]], dim=1)
        tokens, (h, w) = self._tokens(x)
        c_shapes = [(2 * h, 2 * w), (h, w), (h // 2, w // 2)]
        ref_inject = reference_points([(h, w)], x.device)    # ViT tokens query 3 levels of c
        ref_extract = reference_points(c_shapes, x.device)   # c queries the ViT grid
        prefix, outs = self.vit.num_prefix_tokens, []
        for (first, last), interaction in zip(self.interaction_indexes, self.interactions):
            patches = interaction.injector(tokens[:, prefix:], ref_inject, c, c_shapes)
            tokens = torch.cat([tokens[:, :prefix], patches], dim=1)
            for index in range(first, last + 1):
                tokens = self._block(index, tokens, (h, w))
            c = interaction.extract(c, tokens[:, prefix:], ref_extract, [(h, w)], c_shapes)
            outs.append(tokens)
        return outs, c, c1, (h, w)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """x [B, 3, H, W] -> OrderedDict "0".."3": [B, D, H/4, W/4], [B, D, H/8, W/8], [B, D, H/16, W/16],
        [B, D, H/32, W/32]."""
        outs, c, c1, (h, w) = self.forward_interactions(x)
        b, d, prefix = x.shape[0], self.embed_dim, self.vit.num_prefix_tokens
        c2, c3, c4 = (part.transpose(1, 2).reshape(b, d, hh, ww) for part, (hh, ww) in
                      zip(c.split([4 * h * w, h * w, (h // 2) * (w // 2)], dim=1),
                          [(2 * h, 2 * w), (h, w), (h // 2, w // 2)]))
        feats = [self.up(c2) + c1, c2, c3, c4]
        if self.add_vit_feature:  # detection: the last tokens everywhere; segmentation: interaction i's to level i
            for i, scale in enumerate((4.0, 2.0, 1.0, 0.5)):
                tokens = outs[i] if self.vit_feature_per_interaction else outs[-1]
                grid = tokens[:, prefix:].transpose(1, 2).reshape(b, d, h, w)
                feats[i] = feats[i] + (grid if scale == 1 else F.interpolate(grid, scale_factor=scale,
                                                                             mode="bilinear", align_corners=False))
        return OrderedDict((str(i), norm(f)) for i, (norm, f) in enumerate(zip(self.norms, feats)))


class PyramidFPN(nn.Module):
    """An FPN neck over a four-level pyramid (strides 4..32): the reference configs' mmdet ``FPN`` (in_channels
    [D] * 4, out_channels 256, num_outs 5 without extra convs = a stride-64 max-pool level) as torchvision's
    ``FeaturePyramidNetwork`` + ``LastLevelMaxPool``, convolutions Xavier-uniform initialised as mmdet's.

    Output: OrderedDict "0".."3" (+ "pool" with ``extra_pool``), each [B, out_channels, H/s, W/s]: the input
    torchvision's ``MaskRCNN`` and ``models/detectors.py`` take. ``layer_id``, ``no_weight_decay``, ``num_layers`` and
    ``load_backbone`` delegate to the body (the neck is at lr scale 1).
    """

    def __init__(self, body: nn.Module, out_channels: int = 256, extra_pool: bool = True) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork([body.out_channels] * len(body.strides), out_channels,
                                         extra_blocks=LastLevelMaxPool() if extra_pool else None)
        for m in self.fpn.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.out_channels, self.num_layers, self.depth = out_channels, body.num_layers, body.depth
        self.strides = tuple(body.strides) + ((body.strides[-1] * 2,) if extra_pool else ())

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))

    def layer_id(self, name: str) -> int:
        return self.body.layer_id(name[len("body."):]) if name.startswith("body.") else self.num_layers

    def no_weight_decay(self) -> set[str]:
        return {f"body.{n}" for n in self.body.no_weight_decay()}

    def load_backbone(self, checkpoint: Mapping[str, Any], **kwargs: Any) -> tuple[list[str], list[str]]:
        return self.body.load_backbone(checkpoint, **kwargs)


def _partition(patches: Tensor, hw: tuple[int, int], ws: int) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
    """[B, h w, D] -> windows [B * nW, ws * ws, D], an additive mask [B * nW, 1, 1, ws * ws] (-inf on padding) or
    None, and the padded grid."""
    (h, w), (b, _, d) = hw, patches.shape
    hp, wp = h + (-h) % ws, w + (-w) % ws
    grid = F.pad(patches.view(b, h, w, d), (0, 0, 0, wp - w, 0, hp - h))
    windows = grid.view(b, hp // ws, ws, wp // ws, ws, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, d)
    if (hp, wp) == (h, w):
        return windows, None, (hp, wp)
    valid = torch.zeros(hp, wp, dtype=torch.bool, device=patches.device)
    valid[:h, :w] = True
    valid = valid.view(hp // ws, ws, wp // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws).repeat(b, 1)
    mask = torch.zeros(valid.shape, dtype=patches.dtype, device=patches.device).masked_fill(~valid, float("-inf"))
    return windows, mask[:, None, None, :], (hp, wp)


def _unpartition(windows: Tensor, hw: tuple[int, int], padded: tuple[int, int], ws: int, b: int) -> Tensor:
    (h, w), (hp, wp), d = hw, padded, windows.shape[-1]
    grid = windows.view(b, hp // ws, wp // ws, ws, ws, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, d)
    return grid[:, :h, :w].reshape(b, h * w, d)


def _init_weights(m: nn.Module) -> None:
    """The reference's ``_init_weights`` for the adapter's own modules."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ---- factories: the reference configs' hyper-parameters (kwargs override them, e.g. a tiny depth for tests) ------
_SIZES = {  # ViT dims (DINOv2 / DeiT / AugReg) and the reference's deformable-attention settings
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, deform_num_heads=6, deform_ratio=1.0),
    "small": dict(embed_dim=384, depth=12, num_heads=6, deform_num_heads=6, deform_ratio=1.0),
    "base": dict(embed_dim=768, depth=12, num_heads=12, deform_num_heads=12, deform_ratio=0.5),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, deform_num_heads=16, deform_ratio=0.5),
    "giant": dict(embed_dim=1536, depth=40, num_heads=24, deform_num_heads=24, deform_ratio=0.5, swiglu=True),
}


def _register(name: str, size: str, what: str, **preset: Any) -> Callable[..., ViTAdapter]:
    def factory(**kwargs: Any) -> ViTAdapter:
        return ViTAdapter(**{**_SIZES[size], **preset, **kwargs})
    factory.__name__ = factory.__qualname__ = name
    dims = _SIZES[size]
    factory.__doc__ = (f"ViT-Adapter-{size[0].upper()} ({what}): D {dims['embed_dim']}, depth {dims['depth']}, "
                       f"{dims['num_heads']} heads. kwargs override the preset (drop_path_rate, window_size, ...).")
    return register_model(factory)


# DeiT / AugReg rows (pretrain size 224) and DINOv2 rows (LayerScale, 592 = DINOv2's 37x37 grid x 16)
ADAPTER_MODELS: dict[str, Callable[..., ViTAdapter]] = {
    **{f"adapter_{s}": _register(f"adapter_{s}", s, "DeiT / AugReg", layer_scale=True)
       for s in ("tiny", "small", "base", "large")},
    **{f"adapter_dinov2_{s}": _register(f"adapter_dinov2_{s}", s, "DINOv2", layer_scale=True, img_size=592)
       for s in ("small", "base", "large", "giant")},
    **{f"adapter_dinov2_{s}_reg4": _register(f"adapter_dinov2_{s}_reg4", s, "DINOv2 with 4 registers",
                                             layer_scale=True, img_size=592, reg_tokens=4)
       for s in ("small", "base", "large", "giant")},
}


def create_adapter(name: str, *, fpn_channels: int | None = None, **kwargs: Any) -> ViTAdapter | PyramidFPN:
    """Build a ViT-Adapter by name (``ADAPTER_MODELS``, also in the model registry); kwargs override the preset
    (drop_path_rate, img_size, window_size / global_blocks, depth for tiny tests, ...). ``fpn_channels`` (256 in the
    Mask R-CNN configs) wraps it in :class:`PyramidFPN` with the stride-64 ``'pool'`` level, ready for a detector."""
    if name not in ADAPTER_MODELS:
        raise ValueError(f"unknown ViT-Adapter {name!r}; choose one of {sorted(ADAPTER_MODELS)}")
    adapter = ADAPTER_MODELS[name](**kwargs)
    return adapter if fpn_channels is None else PyramidFPN(adapter, fpn_channels, extra_pool=True)
