"""Backbones from checkpoints: build a timm ViT by name and load pretrained weights of any supported layout into it
under the one loading policy of every task (:func:`load_pretrained`: MAE's exact missing-key check, unused keys a
warning as in mmcv / detectron2); plus the layer id that FreezeOut and layer-wise lr decay share.

Moved here from the entry scripts (``main_finetune.py``, ``main_knn.py``; ``load_pretrained`` from
``util/checkpoint.py``, so that model-side loaders can use it: ``models`` imports torch, timm and the
standard-library ``util/keys.py`` only). No file I/O: callers read the file (``util.checkpoint.load_checkpoint``) and pass the checkpoint dict; key maps are in
``models/convert.py``. After MAE (He et al., CVPR 2022; github.com/facebookresearch/mae ``main_finetune.py``,
``main_linprobe.py``, ``util/lr_decay.py``).
"""
from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch.nn as nn
from torch import Tensor

from models.convert import backbone_state, to_timm_vit
from models.registry import checkpoint_vs_model, create_model
from models.vit import init_head, unit_of as vit_layer_of
from util.keys import describe_keys, shape_problems

logger = logging.getLogger("vitfreeze")

__all__ = ["DENSE_UNUSED", "build_backbone", "freeze_unit", "load_finetune_weights", "load_pretrained",
           "load_pyramid_backbone"]


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
                        expected_unused=_unused_by(global_pool), source=f"{name} ({source})")
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
                    expected_unused=_unused_by(global_pool), source=f"{name} ({source} checkpoint into {what})")
    init_head(model.head, std=head_init_std)


def _unused_by(global_pool: bool) -> tuple[str, ...]:
    """The norm a timm ViT classifier replaces by ``Identity``: ``norm`` under global pooling (MAE's ``fc_norm``
    after the mean token), ``fc_norm`` under the cls token."""
    return ("norm.*",) if global_pool else ("fc_norm.*",)


# the ViT keys a dense model (feature pyramid, ViT-Adapter) has no use for: the final norm (its levels take the blocks'
# outputs) and fc_norm; a checkpoint that has them loads without a warning
DENSE_UNUSED = ("norm.*", "fc_norm.*")


def load_pyramid_backbone(backbone: nn.Module, checkpoint: Mapping[str, Any], *, source: str = "auto",
                          name: str = "checkpoint") -> tuple[list[str], list[str]]:
    """A ViT checkpoint of any supported layout (``models.convert.to_timm_vit``) into a dense model's ViT
    (``ViTFeaturePyramid.load_backbone``: patch kernel and position grid resampled, LayerScale folded), under the
    one policy of :func:`load_pretrained`; the classifier head is dropped.

    Returns:
        ``(missing, unexpected)`` from ``load_backbone`` (missing empty).

    Raises:
        ValueError: shapes differ, ViT keys are missing, or the checkpoint has encoder parameters the ViT lacks.
    """
    state, source = to_timm_vit(checkpoint, source=source)
    return backbone.load_backbone({k: v for k, v in state.items() if not k.startswith("head.")},
                                  what=f"{name} ({source} checkpoint)")


def freeze_unit(name: str, *, depth: int) -> int | None:
    """Unit of a ViT parameter for FreezeOut and layer-wise lr decay: 0 = patch embedding, cls token and position
    embedding; j + 1 = block j; None = final norm, fc_norm and head (never frozen early; lr_scale 1)."""
    layer = vit_layer_of(name, depth=depth)
    return None if layer > depth else layer


# keys on the encoder's path up to its last block: a checkpoint's key here that the model lacks (a deeper ViT's blocks,
# LayerScale or SwiGLU parameters, register tokens, a pre-norm) would be dropped and change what the encoder computes
ENCODER_KEY = re.compile(r"^(cls_token|reg_token|pos_embed|patch_embed\.|norm_pre\.|blocks\.)")


def load_pretrained(model: nn.Module, state_dict: Mapping[str, Tensor], *,
                    expected_missing: Collection[str] = (), expected_unused: Collection[str] = (),
                    source: str = "checkpoint") -> tuple[list[str], list[str]]:
    """The one backbone-loading policy (classification, k-NN / linear probe, feature pyramid, ViT-Adapter):
    a non-strict load that fails loudly, in one line, when the backbone did not really load.

    After MAE's ``main_finetune.py`` / ``main_linprobe.py`` (``strict=False``, print the result, assert the
    missing set is the new head: ``{'head.weight', 'head.bias'}`` plus ``fc_norm.*`` with global pooling) and
    mmcv's / detectron2's ``load_checkpoint`` (unused checkpoint keys are a warning, not an error):

    - a shape that differs raises (:func:`models.registry.checkpoint_vs_model` names the ViT each side holds);
    - a missing key outside ``expected_missing`` raises: every backbone weight must come from the checkpoint;
    - a checkpoint key on the encoder's path that the model lacks (:data:`ENCODER_KEY`: blocks of a deeper ViT,
      LayerScale, register tokens) raises: it is another architecture, as a shape mismatch is;
    - any other unexpected key (a final norm, ``fc_norm``, ``attn_pool`` or a head the model does not use) is
      ignored: a warning lists it unless it matches ``expected_unused``, and loading goes on.

    Args:
        model: the module to load into.
        state_dict: weights under the model's key names (e.g. from ``models.convert.to_timm_vit``).
        expected_missing: ``fnmatch`` patterns of keys that may stay at their initial values
            (e.g. ``'fc_norm.*'``, ``'head.*'``).
        expected_unused: ``fnmatch`` patterns of checkpoint keys the model is known not to use (e.g. ``'norm.*'``
            under global pooling); they are listed at INFO level instead of in a warning.
        source: name used in messages (e.g. the file path).

    Returns:
        ``(missing, unexpected)`` key lists, sorted.

    Raises:
        ValueError: a shape differs, a key outside ``expected_missing`` is missing, or the checkpoint has
            encoder parameters the model lacks.
    """
    own = model.state_dict()
    shapes = shape_problems(state_dict, own)
    if shapes:
        raise ValueError(f"{source}: shapes differ from the model: {checkpoint_vs_model(state_dict, own, shapes)}")
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    bad = [k for k in missing if not _matches(k, expected_missing)]
    if bad:
        allowed = f"only {describe_keys(expected_missing)} may be" if expected_missing else "no key may be"
        raise ValueError(f"{source} did not load the backbone: {len(bad)} of {len(own)} model keys are missing "
                         f"({describe_keys(bad)}); {allowed} missing")
    extra = [k for k in unexpected if ENCODER_KEY.match(k)]
    if extra:
        raise ValueError(f"{source} has {len(extra)} encoder parameters the model lacks ({describe_keys(extra)}): "
                         "ignoring them would change the features (another depth, LayerScale, SwiGLU or register "
                         "tokens?)")
    model.load_state_dict(state_dict, strict=False)
    ignored = [k for k in unexpected if not _matches(k, expected_unused)]
    if ignored:
        logger.warning("%s: %d checkpoint keys are not used by the model and are ignored: %s", source, len(ignored),
                       describe_keys(ignored))
    logger.info("loaded %s: %d keys; missing (kept initial, expected): %s; unused (ignored): %s", source,
                len(own) - len(missing), describe_keys(missing) if missing else "none",
                describe_keys(unexpected) if unexpected else "none", extra={"preflight": "checkpoint"})
    return missing, unexpected


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)
