"""Model registry: factories register by function name; models are created by name.

After timm's ``@register_model`` / ``create_model`` (github.com/huggingface/pytorch-image-models
``timm/models/_registry.py``), replacing MAE's ``models_mae.__dict__[args.model]`` lookup (DESIGN rule 3).
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TypeVar

import torch.nn as nn

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
