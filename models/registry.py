"""Model registry: factories register by function name; models are created by name.

After timm's ``@register_model`` / ``create_model`` (github.com/huggingface/pytorch-image-models
``timm/models/_registry.py``), replacing MAE's ``models_mae.__dict__[args.model]`` lookup, so an unknown name is a clear error.
"""
from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch.nn as nn

from util.keys import describe_keys, describe_problems

MODELS: dict[str, Callable[..., nn.Module]] = {}

FactoryT = TypeVar("FactoryT", bound=Callable[..., nn.Module])


def register_model(fn: FactoryT) -> FactoryT:
    """Decorator: register ``fn`` under ``fn.__name__``; a duplicate name raises ValueError."""
    name = fn.__name__
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = fn
    return fn


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        **kwargs: overrides passed to the factory (img_size, depth, norm_pix_loss, ...).

    Raises:
        ValueError: unknown name; the message names the closest match and lists all valid names.
    """
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS.keys(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown model {name!r}.{hint} Valid names: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(MODELS)


def describe_checkpoint(state_dict: Mapping[str, Any]) -> str:
    """What ViT a state dict holds, in one phrase: depth, width, patch and image size read from its tensors, and the
    registered ``vit_*`` model of that depth, width and patch, if any. For the error when a checkpoint does not fit
    the model (instead of one line per differing key).

    Keys in timm / MAE layout (``blocks.N.``, ``patch_embed.proj.weight``, ``pos_embed``, ``cls_token``); a leading
    ``module.`` / ``backbone.`` / ``encoder.`` is ignored. Returns e.g. ``"a ViT of depth 12, width 768, patch 16,
    image 224 (vit_base_patch16)"``, or ``"no ViT (keys: ...)"`` when the keys say nothing of the sort.
    """
    state = {_strip_prefix(k): v for k, v in state_dict.items() if hasattr(v, "shape")}
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    kernel = state.get("patch_embed.proj.weight")
    if not blocks and kernel is None:
        return f"no ViT (keys: {describe_keys(state, 4) or 'none'})"
    depth = max(blocks) + 1 if blocks else None
    width = int(kernel.shape[0]) if kernel is not None else _width_of(state)
    patch = int(kernel.shape[-1]) if kernel is not None else None
    parts = [f"depth {depth}" if depth else "", f"width {width}" if width else "", f"patch {patch}" if patch else ""]
    img_size = image_size_of(state)
    if img_size:
        parts.append(f"image {img_size}")
    fits = [name for name, (d, w, p) in _vit_shapes().items() if (d, w, p) == (depth, width, patch)]
    return f"a ViT of {', '.join(p for p in parts if p)}" + (f" ({', '.join(fits)})" if fits else
                                                             " (no registered vit_* model has this shape)")


def image_size_of(state_dict: Mapping[str, Any]) -> int | None:
    """The square image size a ViT state dict's position table was made for: grid side x patch, the grid from
    ``pos_embed`` less its prefix tokens (cls, dist, registers) when they are in the table. None when unknown."""
    state = {_strip_prefix(k): v for k, v in state_dict.items() if hasattr(v, "shape")}
    pos, kernel = state.get("pos_embed"), state.get("patch_embed.proj.weight")
    if pos is None or kernel is None or pos.dim() != 3:
        return None
    tokens, patch = int(pos.shape[1]), int(kernel.shape[-1])
    prefix = sum(1 for k in ("cls_token", "dist_token") if k in state) + (
        int(state["reg_token"].shape[1]) if "reg_token" in state else 0)
    for grid_tokens in (tokens - prefix, tokens):  # prefix tokens in the table, or not (no_embed_class)
        side = math.isqrt(max(grid_tokens, 0))
        if side and side * side == grid_tokens:
            return side * patch
    return None


def checkpoint_vs_model(state_dict: Mapping[str, Any], model_state: Mapping[str, Any], problems: list[str], *,
                        limit: int = 3) -> str:
    """One line for a checkpoint that does not fit a model: which ViT each holds (:func:`describe_checkpoint`),
    when they differ, then at most ``limit`` of ``problems`` (the differing keys or shapes) and how many more."""
    held, wanted = describe_checkpoint(state_dict), describe_checkpoint(model_state)
    shown = describe_problems(state_dict, model_state, problems, limit=limit)
    if held == wanted or held.startswith("no ViT") or wanted.startswith("no ViT"):
        return shown
    return f"the checkpoint holds {held}, the model is {wanted}; e.g. {shown}"


_PREFIXES = ("module.", "backbone.", "encoder.")


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _width_of(state: Mapping[str, Any]) -> int | None:
    for key in ("cls_token", "pos_embed", "norm.weight", "blocks.0.norm1.weight"):
        if key in state:
            return int(state[key].shape[-1])
    return None


def _vit_shapes() -> dict[str, tuple[int, int, int]]:
    """(depth, width, patch) of every registered ``vit_*`` model, built on the meta device (no memory)."""
    import torch
    shapes = {}
    for name in sorted(MODELS):
        if not name.startswith("vit_"):
            continue
        with torch.device("meta"):
            model = MODELS[name]()
        kernel = model.patch_embed.proj.weight
        shapes[name] = (len(model.blocks), int(kernel.shape[0]), int(kernel.shape[-1]))
    return shapes
