"""Backbones from checkpoints: build a timm ViT by name and load pretrained weights of any supported layout into it,
with MAE's exact missing-key check; plus the layer id that FreezeOut and layer-wise lr decay share.

Moved here from the entry scripts (``main_finetune.py``, ``main_knn.py``; ``load_pretrained`` from
``util/checkpoint.py``, so that model-side loaders can use it: ``models`` imports torch, timm and the
standard-library ``util/keys.py`` only). No file I/O: callers read the file (``util.checkpoint.load_checkpoint``) and pass the checkpoint dict; key maps are in
``models/convert.py``. After MAE (He et al., CVPR 2022; github.com/facebookresearch/mae ``main_finetune.py``,
``main_linprobe.py``, ``util/lr_decay.py``).
"""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping
from typing import Any

import torch.nn as nn
from torch import Tensor

from models.convert import backbone_state, to_timm_vit
from models.registry import checkpoint_vs_model, create_model
from models.vit import init_head, unit_of as vit_layer_of
from util.keys import describe_keys, shape_problems

logger = logging.getLogger("vitfreeze")

__all__ = ["build_backbone", "freeze_unit", "load_finetune_weights", "load_pretrained", "load_pyramid_backbone"]


def build_backbone(model: str, *, img_size: int, global_pool: bool, checkpoint: Mapping[str, Any] | None,
                   checkpoint_source: str = "auto", name: str = "checkpoint") -> nn.Module:
    """The frozen feature extractor [B, 3, H, W] -> [B, D] (timm ViT, no head) of k-NN and the linear probe.

    Args:
        model: registered ViT name (``vit_*``).
        img_size: input size (position embedding resampled to it).
        global_pool: mean patch token + ``fc_norm`` (True) or cls token after ``norm``.
        checkpoint: the loaded ``--finetune`` file, any supported layout (None: random weights, a baseline).
        checkpoint_source: layout (``auto`` detects it).
        name: the file, for messages.

    Returns:
        The backbone in eval mode with ``requires_grad`` off, on the CPU.
    """
    backbone = create_model(model, num_classes=0, img_size=img_size, global_pool="avg" if global_pool else "token")
    if checkpoint is not None:
        state, source = backbone_state(checkpoint, backbone, source=checkpoint_source)
        # global pooling uses a fresh fc_norm (identity affine) unless the checkpoint has one (MAE main_finetune.py / main_linprobe.py)
        load_pretrained(backbone, state, expected_missing=("fc_norm.*",) if global_pool else (),
                        source=f"{name} ({source})")
    else:
        logger.warning("no --finetune checkpoint: the backbone is randomly initialised (a baseline)")
    return backbone.requires_grad_(False).eval()


def load_finetune_weights(model: nn.Module, checkpoint: Mapping[str, Any], *, source: str = "auto",
                          global_pool: bool = True, head_init_std: float = 2e-5, name: str = "checkpoint",
                          what: str = "the model") -> None:
    """MAE's ``--finetune`` load (``main_finetune.py``, ``util/pos_embed.py``): any supported checkpoint -> timm keys, patch kernel and position
    embedding resampled to the model, every backbone key required, then a fresh head (trunc_normal(std), bias 0).

    Raises:
        ValueError: unrecognised checkpoint, shapes of another architecture, or backbone keys missing.
    """
    state, source = backbone_state(checkpoint, model, source=source)  # MAE re-initialises the head
    load_pretrained(model, state, expected_missing=("head.*", "fc_norm.*") if global_pool else ("head.*",),
                    source=f"{name} ({source} checkpoint into {what})")
    init_head(model.head, std=head_init_std)


# the ViT keys a feature pyramid has no use for: the final norm (its levels take the blocks' outputs), fc_norm, and
# the class token of a windowed ViT without one
PYRAMID_UNUSED = frozenset({"norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias", "cls_token"})


def load_pyramid_backbone(backbone: nn.Module, checkpoint: Mapping[str, Any], *, source: str = "auto",
                          name: str = "checkpoint") -> tuple[list[str], list[str]]:
    """A ViT checkpoint of any supported layout (``models.convert.to_timm_vit``) into a dense model's ViT
    (``ViTFeaturePyramid.load_backbone``: patch kernel and position grid resampled, LayerScale folded), the one
    policy of segmentation and detection: the classifier head is dropped, every ViT key must load, and a checkpoint
    key the pyramid cannot use (a deeper ViT's blocks, say) is refused rather than silently dropped; only
    :data:`PYRAMID_UNUSED` may stay unused.

    Returns:
        ``(missing, unexpected)`` from ``load_backbone`` (missing empty; unexpected within :data:`PYRAMID_UNUSED`).

    Raises:
        ValueError: keys missing, or keys the pyramid cannot use.
    """
    state, source = to_timm_vit(checkpoint, source=source)
    missing, unexpected = backbone.load_backbone({k: v for k, v in state.items() if not k.startswith("head.")})
    unusable = sorted(set(unexpected) - PYRAMID_UNUSED)
    if missing or unusable:
        raise ValueError(f"{name} ({source}) does not fit the backbone: missing {missing[:8]}, unexpected "
                         f"{unusable[:8]}")
    logger.info("loaded backbone from %s (%s checkpoint); ignored: %s", name, source, unexpected or "none")
    return missing, unexpected


def freeze_unit(name: str, *, depth: int) -> int | None:
    """Unit of a ViT parameter for FreezeOut and layer-wise lr decay: 0 = patch embedding, cls token and position
    embedding; j + 1 = block j; None = final norm, fc_norm and head (never frozen early; lr_scale 1)."""
    layer = vit_layer_of(name, depth=depth)
    return None if layer > depth else layer


def load_pretrained(model: nn.Module, state_dict: Mapping[str, Tensor], *,
                    expected_missing: tuple[str, ...] | list[str] | set[str] = (),
                    source: str = "checkpoint") -> tuple[list[str], list[str]]:
    """Non-strict load of a backbone that fails loudly when the backbone did not really load.

    MAE's ``main_finetune.py`` / ``main_linprobe.py`` assert the exact missing set after ``strict=False``
    (``{'head.weight', 'head.bias'}`` plus ``fc_norm.*`` with global pooling); here any missing key
    outside ``expected_missing`` raises, unexpected keys (decoders, ``mask_token``, a head we do not use, ``norm.*``
    under global pooling) are reported, and a shape mismatch raises instead of crashing inside ``load_state_dict``.

    Args:
        model: the module to load into.
        state_dict: weights under the model's key names (e.g. from ``models.convert.to_timm_vit``).
        expected_missing: ``fnmatch`` patterns of keys that may stay at their initial values
            (e.g. ``'fc_norm.*'``, ``'head.*'``).
        source: name used in messages (e.g. the file path).

    Returns:
        ``(missing, unexpected)`` key lists, sorted.

    Raises:
        ValueError: a key outside ``expected_missing`` is missing, or a shape differs.
    """
    own = model.state_dict()
    shapes = shape_problems(state_dict, own)
    if shapes:
        raise ValueError(f"{source}: shapes differ from the model: {checkpoint_vs_model(state_dict, own, shapes)}")
    result = model.load_state_dict(state_dict, strict=False)
    missing, unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
    bad = [k for k in missing if not any(fnmatch.fnmatchcase(k, p) for p in expected_missing)]
    if bad:
        raise ValueError(f"{source} did not load the backbone: {len(bad)} of {len(own)} model keys are missing "
                         f"({describe_keys(bad)}); only {sorted(expected_missing) or 'none'} may be missing")
    logger.info("loaded %s: %d keys; missing (kept initial, expected): %s; unexpected (ignored): %s", source,
                len(own) - len(missing), describe_keys(missing) if missing else "none",
                describe_keys(unexpected) if unexpected else "none")
    return missing, unexpected

