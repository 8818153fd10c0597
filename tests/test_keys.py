"""util/keys.py: the one wording of key lists and state-dict problems that util/ and models/ loaders share."""
from __future__ import annotations

import torch

from util.keys import describe_keys, describe_problems, key_problems, shape_problems, shortlist


def test_shortlist_shows_the_first_items_and_counts_the_rest():
    assert shortlist([]) == ""
    assert shortlist(["a", "b", "c"], 3) == "a, b, c"  # exactly the limit: nothing more to count
    assert shortlist(["a", "b", "c", "d", "e"], 3) == "a, b, c, ... (+2 more)"
    assert shortlist(["x", "y"], 1, sep="; ") == "x; ... (+1 more)"
    assert shortlist((n for n in range(10)), 8) == "0, 1, 2, 3, 4, 5, 6, 7, ... (+2 more)"  # any iterable, str()


def test_describe_keys_sorts_and_describe_problems_keeps_the_order():
    assert describe_keys({"b.weight", "a.bias", "c"}, 2) == "a.bias, b.weight, ... (+1 more)"
    problems = ["z first", "a second", "m third", "b fourth"]
    assert describe_problems({}, {}, problems) == "z first; a second; m third; ... (+1 more)"
    assert describe_problems({}, {}, problems, limit=4) == "z first; a second; m third; b fourth"


def test_key_problems_lists_missing_unexpected_and_shapes():
    model = {"w": torch.zeros(2, 3), "b": torch.zeros(2), "gone": torch.zeros(1)}
    ckpt = {"w": torch.zeros(3, 3), "b": torch.zeros(2), "extra": torch.zeros(1), "more": torch.zeros(1)}
    assert shape_problems(ckpt, model) == ["shape of w: checkpoint (3, 3), model (2, 3)"]
    assert key_problems(ckpt, model) == ["missing keys (1): gone", "unexpected keys (2): extra, more",
                                         "shape of w: checkpoint (3, 3), model (2, 3)"]
    assert key_problems(model, model) == []
    many = {f"k{i:02d}": torch.zeros(1) for i in range(10)}
    assert key_problems({}, many) == ["missing keys (10): k00, k01, k02, k03, k04, k05, k06, k07, ... (+2 more)"]
