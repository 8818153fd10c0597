"""How loading messages word state-dict keys: the one "first N of them, +N more" list and the missing /
unexpected / shape problems of a checkpoint against a model.

Standard library only (tests/test_layout.py lets ``models/`` import this module and no other of ``util/``): the
model-side loaders (``models/backbone.py``, ``models/convert.py``, ``models/registry.py``) and the strict resume
load (``util/checkpoint.py``) word their messages alike. The problem lines follow what ``torch.nn.Module
.load_state_dict`` reports (missing keys, unexpected keys, size mismatch), each list cut short to stay one line.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["shortlist", "describe_keys", "shape_problems", "key_problems", "describe_problems"]


def shortlist(items: Iterable[Any], limit: int = 8, *, sep: str = ", ") -> str:
    """At most ``limit`` of ``items``, in their order, joined by ``sep``, and how many more: ``a, b, ... (+3 more)``."""
    items = [str(item) for item in items]
    return sep.join(items[:limit]) + (f"{sep}... (+{len(items) - limit} more)" if len(items) > limit else "")


def describe_keys(keys: Iterable[Any], limit: int = 8) -> str:
    """Up to ``limit`` of ``keys``, sorted, and how many more: the key lists of every loading message."""
    return shortlist(sorted(map(str, keys)), limit)


def shape_problems(state_dict: Mapping[str, Any], model_state: Mapping[str, Any]) -> list[str]:
    """``shape of <key>: checkpoint (..), model (..)`` for each key both hold with different shapes, sorted."""
    return [f"shape of {key}: checkpoint {tuple(state_dict[key].shape)}, model {tuple(model_state[key].shape)}"
            for key in sorted(set(state_dict) & set(model_state))
            if tuple(state_dict[key].shape) != tuple(model_state[key].shape)]


def key_problems(state_dict: Mapping[str, Any], model_state: Mapping[str, Any]) -> list[str]:
    """Every difference of a strict load: missing keys, unexpected keys (each one line, :func:`describe_keys`),
    then :func:`shape_problems`; empty when ``state_dict`` fits ``model_state`` exactly."""
    missing, unexpected = set(model_state) - set(state_dict), set(state_dict) - set(model_state)
    problems = [f"{what} keys ({len(keys)}): {describe_keys(keys)}"
                for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    return problems + shape_problems(state_dict, model_state)


def describe_problems(state_dict: Mapping[str, Any], model_state: Mapping[str, Any], problems: list[str], *,
                      limit: int = 3) -> str:
    """One line of at most ``limit`` of ``problems`` and how many more (``util.checkpoint.load_model_state``'s
    default; ``models.registry.checkpoint_vs_model`` adds which ViT each side holds)."""
    return shortlist(problems, limit, sep="; ")
