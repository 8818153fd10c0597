import torch
import torch.nn as nn

from util.param_groups import param_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)


def unit_of(name):
    return {"cls_token": 0, "proj.weight": 0, "proj.bias": 0, "norm.weight": 1, "norm.bias": 1}.get(name)


def test_weight_decay_split_and_units():
    groups = param_groups(Toy(), weight_decay=0.05, unit_of=unit_of)
    by_key = {(g["unit"], g["weight_decay"]): sorted(g["param_names"]) for g in groups}
    assert by_key == {
        (0, 0.05): ["cls_token", "proj.weight"],  # 3-D cls token decays, as in MAE/timm
        (0, 0.0): ["proj.bias"],
        (1, 0.0): ["norm.bias", "norm.weight"],
        (None, 0.05): ["head.weight"],
        (None, 0.0): ["head.bias"],
    }
    assert [g["unit"] for g in groups] == [0, 0, 1, None, None]  # forward order, never-frozen last
    assert all(g["lr_scale"] == 1.0 for g in groups)
    names = [n for g in groups for n in g["param_names"]]
    assert "frozen" not in names and len(names) == len(set(names)) == 7


def test_no_weight_decay_names_and_optimizer_accepts_groups():
    model = Toy()
    groups = param_groups(model, weight_decay=0.1, no_weight_decay=["cls_token"])
    nodecay = {n for g in groups if g["weight_decay"] == 0 for n in g["param_names"]}
    assert "cls_token" in nodecay and "proj.weight" not in nodecay
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    assert sum(len(g["params"]) for g in opt.param_groups) == 7
