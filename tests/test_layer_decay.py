"""Layer-wise lr decay groups (util/param_groups.py) against MAE's formula and timm's BEiT-style grouping."""
from functools import partial

import pytest
import torch
from timm.optim import param_groups_layer_decay

import models
from models.backbone import freeze_unit
from util.param_groups import param_groups

DEPTH = 3


def mae_layer_id(name: str, num_layers: int) -> int:
    """[MAE] ``util/lr_decay.get_layer_id_for_vit``, written out."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def per_param(groups: list[dict]) -> dict[str, tuple[float, float]]:
    return {n: (g["lr_scale"], g["weight_decay"]) for g in groups for n in g["param_names"]}


@pytest.mark.parametrize("pool", ["avg", "token"])
@pytest.mark.parametrize("decay", [0.65, 0.75, 1.0])
def test_groups_match_the_mae_formula(pool, decay):
    model = models.create_model("vit_tiny_patch16", img_size=32, num_classes=5, depth=DEPTH, global_pool=pool)
    skip = model.no_weight_decay()
    groups = param_groups(model, weight_decay=0.05, unit_of=partial(freeze_unit, depth=DEPTH),
                          no_weight_decay=skip, layer_decay=decay, num_layers=DEPTH + 1)
    got = per_param(groups)
    assert set(got) == {n for n, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        scale = decay ** (DEPTH + 1 - mae_layer_id(name, DEPTH + 1))
        no_decay = param.ndim == 1 or name in skip
        assert got[name] == (pytest.approx(scale), 0.0 if no_decay else 0.05), name
    assert got["head.weight"][0] == 1.0 and got["patch_embed.proj.weight"][0] == pytest.approx(decay ** (DEPTH + 1))
    assert got["cls_token"][1] == got["pos_embed"][1] == 0.0  # timm's no_weight_decay(), as MAE
    for group in groups:  # one (layer, decay) per group, so a freeze event drops whole groups
        assert len({mae_layer_id(n, DEPTH + 1) for n in group["param_names"]}) == 1
        assert len({got[n][1] for n in group["param_names"]}) == 1


def test_groups_equal_timm_param_groups_layer_decay():
    """timm's BEiT-style grouping numbers patch embedding, blocks and head as MAE does; it differs on the final norm
    only, which timm files with the last block (scale ``decay``) and MAE with the head (scale 1)."""
    model = models.create_model("vit_tiny_patch16", img_size=32, num_classes=5, depth=DEPTH, global_pool="token")
    ours = param_groups(model, weight_decay=0.05, unit_of=partial(freeze_unit, depth=DEPTH),
                        no_weight_decay=model.no_weight_decay(), layer_decay=0.7, num_layers=DEPTH + 1)
    names = {id(p): n for n, p in model.named_parameters()}
    timm_groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(),
                                           layer_decay=0.7)
    theirs = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in timm_groups for p in g["params"]}
    assert theirs.keys() == per_param(ours).keys()
    for name, (scale, wd) in per_param(ours).items():
        expected = 1.0 if name.startswith("norm.") else theirs[name][0]
        assert (scale, wd) == (pytest.approx(expected), theirs[name][1]), name
    assert theirs["norm.weight"][0] == pytest.approx(0.7) and theirs["head.weight"][0] == 1.0


def test_lr_scale_reaches_the_optimizer_through_apply_lr():
    from util.lr_sched import apply_lr
    model = models.create_model("vit_tiny_patch16", img_size=32, num_classes=5, depth=DEPTH)
    groups = param_groups(model, weight_decay=0.05, unit_of=partial(freeze_unit, depth=DEPTH), layer_decay=0.5,
                          num_layers=DEPTH + 1)
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    apply_lr(optimizer, 0.1)
    expected = [0.1 * 0.5**k for k in range(DEPTH + 1, -1, -1)]  # patch embedding ... head
    assert sorted({round(g["lr"], 12) for g in optimizer.param_groups}) == pytest.approx(expected)


def test_without_layer_decay_every_scale_is_one_and_bad_arguments_raise():
    model = models.create_model("vit_tiny_patch16", img_size=32, num_classes=5, depth=DEPTH)
    unit_of = partial(freeze_unit, depth=DEPTH)
    assert all(g["lr_scale"] == 1.0 for g in param_groups(model, weight_decay=0.1, unit_of=unit_of))
    with pytest.raises(ValueError, match="num_layers"):
        param_groups(model, weight_decay=0.1, unit_of=unit_of, layer_decay=0.75)
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(model, weight_decay=0.1, unit_of=unit_of, layer_decay=0.0, num_layers=DEPTH + 1)
    with pytest.raises(ValueError, match="outside"):
        param_groups(model, weight_decay=0.1, unit_of=unit_of, layer_decay=0.75, num_layers=DEPTH - 1)
