"""Semantic segmentation heads: UperNet (PPM + FPN fusion) with an auxiliary FCN head, on a feature pyramid.

After mmsegmentation's ``UPerHead`` and ``FCNHead`` (Xiao et al., "Unified Perceptual Parsing", ECCV 2018) as
configured by BEiT's and MAE's ADE20K recipes (``upernet_*_512_160k_ade20k``): PPM with pool scales (1, 2, 3, 6) on
the coarsest level, 1x1 lateral convs, top-down addition with bilinear upsampling (align_corners False), 3x3
FPN convs, concatenation at stride 4, 3x3 bottleneck, dropout 0.1, 1x1 classifier; every conv is conv + BN + ReLU
(mmseg ``ConvModule``, SyncBN under DDP: ``nn.SyncBatchNorm.convert_sync_batchnorm`` in the entry script). The
auxiliary FCN head (one 3x3 conv, 256 channels, dropout 0.1) reads the stride-16 level; its loss weight (0.4) is
applied by the step function. Both classifiers are initialised normal(0, 0.01), bias 0, as mmseg's ``conv_seg``.

``UperNetSegmentor(backbone)`` takes any backbone with the pyramid contract (``models/pyramid.py``
``ViTFeaturePyramid`` or ``models/adapter.py``): ``forward(x) -> OrderedDict`` of 4 levels (strides 4..32),
``out_channels``, ``layer_id(name)``, ``depth``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ConvBNReLU", "UperNetHead", "FCNHead", "UperNetSegmentor"]


class ConvBNReLU(nn.Sequential):
    """mmseg ``ConvModule(conv_cfg=None, norm_cfg=BN, act_cfg=ReLU)``: conv (no bias) + BN + ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)
    return conv


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear",
                                                                      align_corners=False)


class UperNetHead(nn.Module):
    """UperNet decode head over ``len(in_channels)`` levels (finest first).

    Args:
        in_channels: channels of each input level.
        channels: width of the head (512 in UperNet, 768 in BEiT/MAE's ViT-B recipes).
        num_classes: output classes.
        pool_scales: PPM output grids.
        dropout: before the classifier.
    """

    def __init__(self, in_channels: list[int], channels: int, num_classes: int, pool_scales=(1, 2, 3, 6),
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList(ConvBNReLU(in_channels[-1], channels, 1) for _ in self.pool_scales)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(self.pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = _classifier(channels, num_classes)

    def psp_forward(self, x: Tensor) -> Tensor:
        outs = [x] + [_resize(conv(F.adaptive_avg_pool2d(x, scale)), x.shape[-2:])
                      for scale, conv in zip(self.pool_scales, self.ppm)]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, feats: list[Tensor]) -> Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1])] + [self.psp_forward(feats[-1])]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        outs = [outs[0]] + [_resize(o, outs[0].shape[-2:]) for o in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """mmseg ``FCNHead(num_convs=1, concat_input=False)``: 3x3 conv + BN + ReLU, dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.convs = ConvBNReLU(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = _classifier(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class UperNetSegmentor(nn.Module):
    """Backbone pyramid -> UperNet (+ auxiliary FCN head on level ``aux_level`` while training).

    ``forward(x [B, 3, H, W]) -> {'seg': [B, K, H / 4, W / 4]}`` plus ``'aux'`` [B, K, H / 16, W / 16] in training
    mode when ``aux_channels`` > 0; logits are at the levels' resolution (the step / inference upsample them).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, channels: int = 512, aux_channels: int = 256,
                 aux_level: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        levels = 4
        self.decode_head = UperNetHead([backbone.out_channels] * levels, channels, num_classes, dropout=dropout)
        self.aux_level = aux_level
        self.auxiliary_head = (FCNHead(backbone.out_channels, aux_channels, num_classes, dropout=dropout)
                               if aux_channels > 0 else None)

    @property
    def depth(self) -> int:
        return self.backbone.depth

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = list(self.backbone(x).values())[:4]
        out = {"seg": self.decode_head(feats)}
        if self.training and self.auxiliary_head is not None:
            out["aux"] = self.auxiliary_head(feats[self.aux_level])
        return out

    def layer_id(self, name: str) -> int:
        """Backbone's layer ids (``backbone.`` stripped); the heads get ``depth + 1`` (lr scale 1)."""
        if name.startswith("backbone."):
            return self.backbone.layer_id(name[len("backbone."):])
        return self.depth + 1

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", lambda: set())()}
