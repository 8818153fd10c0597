"""Linear-probe head and the frozen-backbone probe that trains one or several of them side by side.

Head after MAE's ``main_linprobe.py`` (He et al., CVPR 2022): BatchNorm1d without affine parameters (eps 1e-6)
followed by a Linear layer whose weight is trunc_normal(std 0.01) and bias 0 (MAE
``main_linprobe.py``). Several heads over the
same features (one per learning rate) follow DINOv2's linear evaluation, which trains a grid of classifiers in
one pass because probe accuracy is sensitive to the learning rate.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from torch import Tensor


class LinearProbeHead(nn.Sequential):
    """BatchNorm1d(affine=False, eps=1e-6) -> Linear; state-dict keys ``0.running_*`` and ``1.weight/bias``
    (MAE's ``head.0`` / ``head.1`` once mounted as ``head``).

    Args:
        in_features: feature width D.
        num_classes: number of classes C.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        linear = nn.Linear(in_features, num_classes)
        trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        super().__init__(nn.BatchNorm1d(in_features, affine=False, eps=1e-6), linear)


class LinearProbe(nn.Module):
    """A frozen backbone (or none, for cached features) and ``num_heads`` linear-probe heads.

    The backbone has ``requires_grad`` off, always stays in eval mode (``train()`` does not touch it) and runs
    under ``torch.no_grad()``; only the heads' BatchNorm follows ``train()`` / ``eval()``.

    Args:
        backbone: maps images [B, 3, H, W] to features [B, D] (e.g. a timm ViT with ``num_classes=0``), or None
            when the inputs are already features [B, D].
        in_features: D.
        num_classes: C.
        num_heads: H heads over the same features (one per learning rate of a grid).
    """

    def __init__(self, backbone: nn.Module | None, in_features: int, num_classes: int, num_heads: int = 1) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.backbone = backbone
        if backbone is not None:
            backbone.requires_grad_(False)
            backbone.eval()
        self.heads = nn.ModuleList([LinearProbeHead(in_features, num_classes) for _ in range(num_heads)])

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        """Backbone features without autograd: images [B, 3, H, W] -> [B, D] (identity without a backbone)."""
        if self.backbone is None:
            return x
        with torch.no_grad():
            return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x: images [B, 3, H, W], or features [B, D] when there is no backbone.

        Returns:
            Logits of every head, [H, B, C].
        """
        feats = self.features(x)
        return torch.stack([head(feats) for head in self.heads])
