"""ViT feature pyramid for dense tasks: our ViT encoder + ViTDet's simple feature pyramid.

After ViTDet (Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection", ECCV 2022;
detectron2 ``modeling/backbone/vit.py`` ``SimpleFeaturePyramid``): the plain ViT's stride-16 map is turned into
strides 4 (two 2x2 deconvolutions with LayerNorm + GELU between), 8 (one deconvolution), 16 (identity) and 32 (2x2
max-pool), each followed by a 1x1 conv + LayerNorm and a 3x3 conv + LayerNorm to ``out_channels``; ``extra_pool``
adds torchvision's ``LastLevelMaxPool`` level (stride 64, key ``'pool'``) for detection. The output is the
``OrderedDict`` of feature maps with ``out_channels`` that torchvision's ``MaskRCNN`` / ``FasterRCNN`` expect of a
backbone, so detection and segmentation share it (and ``models/adapter.py`` follows the same contract).

The encoder is a registered timm ``VisionTransformer`` (``models/vit.py``) with ``dynamic_img_size`` (the position
embedding is resampled bicubically to any input grid, so detection's padded, non-square batches work), with its
final ``norm`` / head removed (ViTDet and BEiT/MAE segmentation use the last block's tokens without the final norm;
an unused norm would also break DDP). Options:
- ``tap_blocks``: four block indices whose outputs feed the four levels, as BEiT's / MAE's UperNet configs
  (``out_indices=[3, 5, 7, 11]``); default: every level from the last block (ViTDet).
- ``window_size`` > 0: window attention (ViTDet) in every block not in ``global_blocks``; the class token is not
  used then (ViTDet has none). As detectron2's ``Block``: ``norm1`` first, then the normalised tokens are
  zero-padded to whole windows and partitioned (the padded tokens take part in attention as keys of value 0 before
  ``qkv``), attention per window, unpartition, crop, and drop path / LayerScale per image on the residual.
- ``use_rel_pos``: ViTDet's decomposed relative position (detectron2 ``modeling/backbone/utils.py``
  ``add_decomposed_rel_pos`` / ``get_rel_pos``): per block, tables ``attn.rel_pos_h`` / ``attn.rel_pos_w`` of
  [2 S - 1, head_dim] for the block's attention size S (the window, or the ``img_size`` grid in global blocks),
  zero-initialised (``rel_pos_zero_init=True``), linearly resized when the attended size differs; the bias
  ``q . R_h[h_q - h_k] + q . R_w[w_q - w_k]`` (unscaled q) is added to the logits of patch pairs.
- ``rel_pos_bias``: BEiT's relative position bias (BEiT ``semantic_segmentation/backbone/beit.py`` and MAE's ADE20K
  backbone, implus/mae_segmentation ``backbone/mae.py``, ``use_rel_pos_bias=True``): per block a zero-initialised
  table ``attn.relative_position_bias_table`` of [(2 S - 1)^2 + 3, heads] indexed by
  :func:`relative_position_index` (three extra rows for cls->token, token->cls, cls->cls), for the ``img_size``
  grid (or the window); the attended grid must be that size.
- ``layer_scale_init_value``: LayerScale (timm ``init_values``; BEiT's / MAE's ``init_values=1.``) in every block.
  With zero tables and LayerScale 1 the backbone computes the pretrained function exactly.
- ``grad_checkpointing``: recompute each block in backward (torch.utils.checkpoint, non-reentrant).
"""
from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from models.backbone import DENSE_UNUSED, load_pretrained
from models.convert import adapt_to_model, fold_layer_scale
from models.registry import create_model
from models.vit import unit_of as vit_unit_of

logger = logging.getLogger(__name__)

__all__ = ["ViTFeaturePyramid", "LayerNorm2d", "window_partition", "window_unpartition", "get_rel_pos",
           "decomposed_rel_pos", "relative_position_index", "NEUTRAL_INIT_KEYS"]

# encoder parameters the dense options add (not in a classification checkpoint); they start neutral
NEUTRAL_INIT_KEYS = re.compile(r"^blocks\.\d+\.(attn\.(rel_pos_[hw]|relative_position_bias_table)|ls[12]\.gamma)$")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of [B, C, H, W] (detectron2 ``LayerNorm``, ConvNeXt), eps 1e-6."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int]]:
    """[B, H, W, C] -> ([B * nW, window * window, C], padded (Hp, Wp)); zero-pads H, W up to multiples of window."""
    b, h, w, c = x.shape
    ph, pw = (window - h % window) % window, (window - w % window) % window
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c), (hp, wp)


def window_unpartition(windows: Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: [B * nW, window * window, C] -> [B, H, W, C] (padding cropped)."""
    hp, wp = padded
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, :size[0], :size[1]].contiguous()


def get_rel_pos(q_size: int, k_size: int, table: Tensor) -> Tensor:
    """Relative position embeddings [q_size, k_size, C] of ``table`` [L, C] (detectron2 ``get_rel_pos``): the table
    is resized linearly to ``2 max(q_size, k_size) - 1`` rows if needed; row ``q * max(k/q, 1) - k * max(q/k, 1) +
    (k_size - 1) max(q/k, 1)`` for each (q, k)."""
    rows = 2 * max(q_size, k_size) - 1
    if table.shape[0] != rows:
        table = F.interpolate(table.t()[None], size=rows, mode="linear")[0].t()
    q = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    return table[((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


def decomposed_rel_pos(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, size: tuple[int, int]) -> Tensor:
    """ViTDet's decomposed relative position bias (detectron2 ``add_decomposed_rel_pos``, queries and keys on the same
    grid): q [B, h w, C] (unscaled) -> bias [B, h w, h w] = ``q . Rh[hq, hk] + q . Rw[wq, wk]``."""
    h, w = size
    rh, rw = get_rel_pos(h, h, rel_pos_h), get_rel_pos(w, w, rel_pos_w)
    grid_q = q.reshape(q.shape[0], h, w, -1)
    bias_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rh.to(q.dtype))
    bias_w = torch.einsum("bhwc,wkc->bhwk", grid_q, rw.to(q.dtype))
    return (bias_h[..., :, None] + bias_w[..., None, :]).reshape(q.shape[0], h * w, h * w)


def relative_position_index(size: tuple[int, int]) -> Tensor:
    """BEiT's ``relative_position_index`` [h w + 1, h w + 1] for a grid with a cls token first: patch pairs index
    ``(dh + h - 1) (2 w - 1) + (dw + w - 1)`` (dh, dw = query - key), row 0 (cls -> token) ``L - 3``, column 0
    (token -> cls) ``L - 2``, (0, 0) ``L - 1``, with L = (2 h - 1)(2 w - 1) + 3 table rows."""
    h, w = size
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # [2, h w]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    patches = (rel[..., 0] + h - 1) * (2 * w - 1) + (rel[..., 1] + w - 1)
    rows = (2 * h - 1) * (2 * w - 1) + 3
    index = torch.zeros((h * w + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = patches
    index[0, :], index[:, 0], index[0, 0] = rows - 3, rows - 2, rows - 1
    return index


def _conv_ln(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), LayerNorm2d(cout))


class ViTFeaturePyramid(nn.Module):
    """ViT encoder + simple feature pyramid.

    Args:
        vit_name: a registered ViT factory (``vit_base_patch16``, ...).
        img_size: training crop size; the position embedding is kept (and resampled on load) for this grid.
        out_channels: channels of every pyramid level None: 256 (ViTDet, Mask R-CNN) for
            the simple neck, the ViT width for the 'beit' neck.
        strides: levels to build, a subset of (4, 8, 16, 32) for patch 16 (scales 4, 2, 1, 1/2 of the ViT map).
        extra_pool: add key ``'pool'`` = max-pool (kernel 1, stride 2) of the coarsest level (detection).
        drop_path_rate: stochastic depth, linearly spaced over the blocks.
        window_size: 0 = global attention everywhere; else window attention outside ``global_blocks``.
        global_blocks: blocks that keep global attention under ``window_size`` (ViTDet: 2, 5, 8, 11 for ViT-B).
        grad_checkpointing: recompute blocks in backward.
        use_rel_pos: ViTDet's decomposed relative position in every block (zero-initialised tables).
        rel_pos_bias: BEiT's relative position bias in every block (zero-initialised tables).
        layer_scale_init_value: None (no LayerScale) or the initial LayerScale gamma (BEiT / MAE ADE20K: 1.0).
        tap_blocks: None (all levels from the last block) or one block index per level (BEiT/MAE UperNet).
        neck: ``'simple'`` (ViTDet's, above) or ``'beit'``: BEiT's / MAE's segmentation neck (``fpn1``..``fpn4``:
            ConvT(D, D) + BatchNorm + GELU + ConvT(D, D) at stride 4, ConvT(D, D) at 8, identity, 2x2 max-pool),
            no output convs, every level with D channels (``out_channels`` must be None or D).

    ``forward(x [B, 3, H, W]) -> OrderedDict`` ``'0'``.. (one per stride, coarsest last) [+ ``'pool'``], each
    [B, out_channels, H / s, W / s] (H, W multiples of the patch size; of 32 for a stride-32 level).
    """

    def __init__(self, vit_name: str, *, img_size: int, out_channels: int | None = None,
                 strides: Sequence[int] = (4, 8, 16, 32), extra_pool: bool = False, drop_path_rate: float = 0.1,
                 window_size: int = 0,
                 global_blocks: Sequence[int] = (), grad_checkpointing: bool = False,
                 tap_blocks: Sequence[int] | None = None, neck: str = "simple", use_rel_pos: bool = False,
                 rel_pos_bias: bool = False, layer_scale_init_value: float | None = None, **vit_kwargs) -> None:
        super().__init__()
        self.window_size = int(window_size)
        use_cls = self.window_size == 0
        if layer_scale_init_value is not None:
            vit_kwargs["init_values"] = float(layer_scale_init_value)
        self.vit = create_model(vit_name, img_size=img_size, num_classes=0, global_pool="token" if use_cls else "avg",
                                drop_path_rate=drop_path_rate, dynamic_img_size=True, class_token=use_cls,
                                **vit_kwargs)
        # the final norm / fc_norm are not used by dense heads (and unused parameters would stall DDP)
        self.vit.norm, self.vit.fc_norm, self.vit.head = nn.Identity(), nn.Identity(), nn.Identity()
        self.depth = len(self.vit.blocks)
        self.patch_size = self.vit.patch_embed.patch_size[0]
        self.global_blocks = frozenset(int(b) % self.depth for b in global_blocks)
        self.grad_checkpointing = grad_checkpointing
        self.use_rel_pos, self.rel_pos_bias = bool(use_rel_pos), bool(rel_pos_bias)
        if self.rel_pos_bias and self.vit.num_prefix_tokens > 1:
            raise ValueError("rel_pos_bias (BEiT) supports at most one prefix token (cls); this ViT has "
                             f"{self.vit.num_prefix_tokens}")
        self._add_relative_positions(self.vit.patch_embed.grid_size)
        strides = tuple(int(s) for s in strides)
        allowed = {self.patch_size // 4: None, self.patch_size // 2: None, self.patch_size: None,
                   self.patch_size * 2: None}
        bad = [s for s in strides if s not in allowed]
        if bad or not strides or list(strides) != sorted(set(strides)):
            raise ValueError(f"strides must be increasing, distinct and among {sorted(allowed)} for patch "
                             f"{self.patch_size}; got {strides}")
        if tap_blocks is not None:
            tap_blocks = tuple(int(b) % self.depth for b in tap_blocks)
            if len(tap_blocks) != len(strides):
                raise ValueError(f"tap_blocks needs one block per stride ({len(strides)}), got {tap_blocks}")
        self.tap_blocks = tap_blocks
        self.strides = strides + ((strides[-1] * 2,) if extra_pool else ())
        self.extra_pool = extra_pool
        dim = self.vit.embed_dim
        if neck not in ("simple", "beit"):
            raise ValueError(f"neck must be 'simple' (ViTDet) or 'beit', got {neck!r}")
        if neck == "beit":
            if out_channels not in (None, dim):
                raise ValueError(f"the 'beit' neck keeps the ViT width {dim}; got out_channels {out_channels}")
            out_channels = dim
        out_channels = out_channels or 256
        self.out_channels, self.neck = out_channels, neck
        self.samplers = nn.ModuleList()
        self.outputs = nn.ModuleList()
        for stride in strides:
            scale = self.patch_size // stride if stride <= self.patch_size else -1
            if scale == 4:
                sampler = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(),
                                        nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2))
                width = dim // 4
            elif scale == 2:
                sampler, width = nn.ConvTranspose2d(dim, dim // 2, 2, 2), dim // 2
            elif scale == 1:
                sampler, width = nn.Identity(), dim
            else:
                sampler, width = nn.MaxPool2d(2, 2), dim
            if neck == "beit" and scale == 4:
                sampler = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                        nn.ConvTranspose2d(dim, dim, 2, 2))
            elif neck == "beit" and scale == 2:
                sampler = nn.ConvTranspose2d(dim, dim, 2, 2)
            self.samplers.append(sampler)
            self.outputs.append(nn.Identity() if neck == "beit" else nn.Sequential(
                _conv_ln(width, out_channels, 1), _conv_ln(out_channels, out_channels, 3)))

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    def _attn_size(self, index: int, grid: tuple[int, int]) -> tuple[int, int]:
        """The grid one attention of block ``index`` sees: the window, or ``grid`` in global blocks."""
        windowed = self.window_size and index not in self.global_blocks
        return (self.window_size, self.window_size) if windowed else tuple(grid)

    def _add_relative_positions(self, grid: tuple[int, int]) -> None:
        """Zero-initialised relative position parameters on each block's ``attn`` (names as detectron2's / BEiT's)."""
        for index, block in enumerate(self.vit.blocks):
            attn, (h, w) = block.attn, self._attn_size(index, grid)
            if self.use_rel_pos:  # detectron2 Attention(use_rel_pos=True, rel_pos_zero_init=True)
                attn.rel_pos_h = nn.Parameter(torch.zeros(2 * h - 1, attn.head_dim))
                attn.rel_pos_w = nn.Parameter(torch.zeros(2 * w - 1, attn.head_dim))
            if self.rel_pos_bias:  # BEiT Attention(window_size=patch_shape): zeros, index buffer (recomputable)
                attn.relative_position_bias_table = nn.Parameter(
                    torch.zeros((2 * h - 1) * (2 * w - 1) + 3, attn.num_heads))
                attn.register_buffer("relative_position_index", relative_position_index((h, w)), persistent=False)
                attn.bias_grid = (h, w)

    def _attention(self, attn: nn.Module, x: Tensor, size: tuple[int, int]) -> Tensor:
        """timm ``Attention`` of [B, N, C] tokens (prefix tokens first, then the ``size`` grid) with the relative
        position terms added to the logits."""
        b, n, c = x.shape
        prefix = n - size[0] * size[1]
        q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = None
        if self.use_rel_pos:
            patch = decomposed_rel_pos(q[:, :, prefix:].flatten(0, 1), attn.rel_pos_h, attn.rel_pos_w, size)
            bias = F.pad(patch.view(b, attn.num_heads, *patch.shape[1:]), (prefix, 0, prefix, 0))
        if self.rel_pos_bias:
            if tuple(size) != attn.bias_grid:
                raise ValueError(f"rel_pos_bias was built for a {attn.bias_grid} grid, the input gives {tuple(size)}: "
                                 "use inputs of img_size (as BEiT's / MAE's sliding-window evaluation)")
            index = attn.relative_position_index[1 - prefix:, 1 - prefix:]
            table = attn.relative_position_bias_table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)
            bias = table[None].to(q.dtype) if bias is None else bias + table[None].to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=attn.attn_drop.p if self.training else 0.0)
        return attn.proj_drop(attn.proj(attn.norm(x.transpose(1, 2).reshape(b, n, -1))))

    def _run_block(self, index: int, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """One block as detectron2's ViTDet ``Block``: norm1, (pad + window partition), attention, (unpartition),
        residual with LayerScale / drop path per image, MLP. Global blocks without relative positions run timm's
        ``Block`` itself."""
        block = self.vit.blocks[index]
        windowed = self.window_size and index not in self.global_blocks
        if not (windowed or self.use_rel_pos or self.rel_pos_bias):
            return block(x)
        h = block.norm1(x)
        if windowed:
            b, _, c = h.shape
            windows, padded = window_partition(h.view(b, grid[0], grid[1], c), self.window_size)
            windows = self._attention(block.attn, windows, (self.window_size, self.window_size))
            h = window_unpartition(windows, self.window_size, padded, grid).view(b, -1, c)
        else:
            h = self._attention(block.attn, h, grid)
        x = x + block.drop_path1(block.ls1(h))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    def forward_tokens(self, x: Tensor) -> list[Tensor]:
        """Images [B, 3, H, W] -> the maps that feed the levels, each [B, D, H / p, W / p]."""
        vit = self.vit
        b, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        grid = (h // self.patch_size, w // self.patch_size)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        prefix = vit.num_prefix_tokens
        taps = self.tap_blocks or (self.depth - 1,)
        maps: dict[int, Tensor] = {}
        for i in range(max(taps) + 1):
            if self.grad_checkpointing and self.training and x.requires_grad:
                x = checkpoint(self._run_block, i, x, grid, use_reentrant=False)
            else:
                x = self._run_block(i, x, grid)
            if i in taps:
                maps[i] = x[:, prefix:].transpose(1, 2).reshape(b, -1, *grid)
        return [maps[i] for i in (self.tap_blocks or (self.depth - 1,) * len(self.samplers))]

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        maps = self.forward_tokens(x)
        out: OrderedDict[str, Tensor] = OrderedDict()
        for level, (fmap, sampler, head) in enumerate(zip(maps, self.samplers, self.outputs)):
            out[str(level)] = head(sampler(fmap))
        if self.extra_pool:
            out["pool"] = F.max_pool2d(out[str(len(self.samplers) - 1)], 1, 2, 0)
        return out

    def layer_id(self, name: str) -> int:
        """Layer id for layer-wise lr decay, names relative to this module: 0 = patch embedding, cls token and
        position embedding; j + 1 = block j; depth + 1 = the pyramid (scale 1, like a classifier head)."""
        # the ViT's own rule (MAE's get_layer_id_for_vit, models.vit.unit_of) under "vit."; the rest at scale 1
        return vit_unit_of(name[4:], depth=self.depth) if name.startswith("vit.") else self.depth + 1

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) that never decay: tokens and position embedding, as timm's ViT."""
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}

    def load_backbone(self, state_dict: Mapping[str, Tensor], *,
                      what: str = "checkpoint") -> tuple[list[str], list[str]]:
        """Load a timm-keyed ViT state dict (``models.convert.to_timm_vit``) into the encoder, under the one policy
        of ``models.backbone.load_pretrained``.

        The patch kernel and the position embedding are resampled to this model (``adapt_to_model``); without a
        class token (window attention) the checkpoint's cls row of ``pos_embed`` and its ``cls_token`` are dropped.
        LayerScale in ViT-Adapter's format (``blocks.N.gamma1`` / ``gamma2``, written by ``tools/convert_14to16.py``)
        is folded into ``attn.proj`` / ``mlp.fc2`` like DINOv2's ``ls1.gamma`` (``models.convert.fold_layer_scale``).
        ``fc_norm.*`` and ``norm.*`` are not used (:data:`models.backbone.DENSE_UNUSED`); other unused keys (a head,
        ``attn_pool``) are ignored with a warning. Parameters the dense options add (relative position tables,
        LayerScale gammas: ``NEUTRAL_INIT_KEYS``) that the checkpoint lacks keep their neutral initialisation (zero
        tables, gammas at ``layer_scale_init_value``); one log line lists them.

        Args:
            state_dict: timm keys.
            what: the checkpoint, for messages.

        Returns:
            ``(missing, unexpected)`` encoder keys, sorted (keys without the ``vit.`` prefix): missing is empty (a
            missing key raises; the neutral-init keys above are not counted), unexpected are the checkpoint's keys
            the encoder does not use.

        Raises:
            ValueError: a shape differs after resampling, a ViT key is missing, or the checkpoint has encoder
                parameters this ViT lacks (a deeper ViT's blocks, say).
        """
        sd = dict(state_dict)
        if any(re.search(r"^blocks\.\d+\.gamma[12]$", k) for k in sd):
            sd = fold_layer_scale({re.sub(r"\.gamma([12])$", r".ls\1.gamma", k): v for k, v in sd.items()})
        pos = sd.get("pos_embed")
        ckpt_prefix = 0
        if pos is not None:
            pos = pos if pos.ndim == 3 else pos.unsqueeze(0)
            n = pos.shape[1]
            ckpt_prefix = 0 if int(round(n**0.5)) ** 2 == n else 1
            if ckpt_prefix and self.vit.cls_token is None:
                pos = pos[:, ckpt_prefix:]
                ckpt_prefix = 0
            sd["pos_embed"] = pos
        if self.vit.cls_token is None:
            sd.pop("cls_token", None)
        sd = adapt_to_model(sd, patch_size=self.patch_size, grid_size=self.vit.patch_embed.grid_size[0],
                            num_prefix_tokens=ckpt_prefix)
        neutral = [k for k in self.vit.state_dict() if k not in sd and NEUTRAL_INIT_KEYS.match(k)]
        missing, unexpected = load_pretrained(self.vit, sd, expected_missing=neutral, expected_unused=DENSE_UNUSED,
                                              source=f"{what} into the pyramid's ViT")
        if neutral:
            names = sorted({re.sub(r"^blocks\.\d+\.", "blocks.*.", k) for k in neutral})
            logger.info("not in the checkpoint, kept at their neutral initialisation (%d tensors): %s", len(neutral),
                        ", ".join(names))
        return sorted(set(missing) - set(neutral)), unexpected
