"""FreezeOut: the schedule against its formulas, and the Freezer's effect on weights, optimizer and autograd."""
import math

import pytest
import torch

import models
from engine.pretrain import mim_step
from engine.train import EpochProgress, LoopConfig, train_one_epoch
from engine.freezeout import Freezer, FreezeOutSchedule
from util.lr_sched import cosine_lr
from util.param_groups import param_groups

SCALE = {"linear": 1, "squared": 2, "cubic": 3}


def reference_lr(unit, step, *, n_units, total, warmup, base, t_0, how, scale_lr=True, layerwise=True, min_lr=0.0,
                 jump=False):
    """The FreezeOut schedule written out independently (ViTFreeze's formulas for the compat jump)."""
    t = (t_0 + (1 - t_0) * unit / (n_units - 1)) ** SCALE[how]
    freeze_at = warmup + t * (total - warmup)
    glob = (base * step / warmup if step < warmup else
            min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup)))))
    if step >= freeze_at:
        return 0.0
    if not layerwise or (jump and step < warmup):
        return glob
    peak = base / t if scale_lr else base
    if step < warmup:
        return peak * step / warmup
    end = 0.0 if jump else min_lr
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (t * (total - warmup))))


FLAGS = [dict(), dict(scale_lr=False), dict(layerwise_lr=False), dict(min_lr=1e-5), dict(warmup_jump=True),
         dict(scale_lr=False, layerwise_lr=False)]


@pytest.mark.parametrize("how, t_0", [("linear", 0.5), ("squared", 0.7), ("cubic", 0.8)])
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f) or "default")
def test_schedule_matches_formula(how, t_0, flags):
    sched = FreezeOutSchedule(num_units=7, total_steps=1000, base_lr=1e-3, warmup_steps=100, t_0=t_0,
                              how_scale=how, **flags)
    ref_flags = dict(scale_lr=flags.get("scale_lr", True), layerwise=flags.get("layerwise_lr", True),
                     min_lr=flags.get("min_lr", 0.0), jump=flags.get("warmup_jump", False))
    for unit in range(7):
        for step in (0, 1, 50, 99, 100, 101, 333, 512, 640, 777, 901, 999):
            expected = reference_lr(unit, step, n_units=7, total=1000, warmup=100, base=1e-3, t_0=t_0, how=how,
                                    **ref_flags)
            assert sched.lr(unit, step) == pytest.approx(expected, rel=1e-9, abs=1e-15), (unit, step)


@pytest.mark.parametrize("how, t_0", [("linear", 0.5), ("squared", 0.6), ("cubic", 0.8), ("cubic", 0.65)])
def test_freeze_points_monotone_and_lr_zero_after(how, t_0):
    sched = FreezeOutSchedule(num_units=13, total_steps=2000, base_lr=1.0, warmup_steps=200, t_0=t_0, how_scale=how)
    points = [sched.freeze_step(u) for u in range(13)]
    assert points == sorted(points) and points[-1] == 2000 and points[0] > 200
    frozen = [sched.num_frozen(s) for s in range(2001)]
    assert frozen == sorted(frozen) and frozen[0] == 0 and frozen[1999] == 12
    for unit, point in enumerate(points[:-1]):
        assert sched.lr(unit, point - 1) > 0
        assert all(sched.lr(unit, s) == 0.0 for s in range(point, 2000, 7))
        assert sched.num_frozen(point) >= unit + 1 and sched.num_frozen(point - 1) <= unit


def test_spec_worked_example_cubic_08():
    """ViTFreeze ``run_pretrain.py``: ViT-B, 100 epochs, 10 warmup: unit i freezes at epoch 10 + 90 t_i."""
    sched = FreezeOutSchedule(num_units=13, total_steps=100_000, base_lr=1.0, warmup_steps=10_000, t_0=0.8)
    epochs = [round(sched.freeze_point(u) / 1000, 1) for u in range(12)]
    assert epochs == [56.1, 59.0, 62.1, 65.3, 68.6, 72.0, 75.6, 79.3, 83.2, 87.2, 91.3, 95.6]
    assert sched.peak_lr(0) == pytest.approx(1 / 0.512)  # ViTFreeze's 1.95x peak lr (1 / 0.512)


def test_no_jump_at_end_of_warmup_except_in_compat_mode():
    kw = dict(num_units=5, total_steps=1000, base_lr=1.0, warmup_steps=100, t_0=0.8)
    ours, compat = FreezeOutSchedule(**kw), FreezeOutSchedule(**kw, warmup_jump=True)
    t0 = ours.freeze_fraction(0)
    assert ours.lr(0, 99) == pytest.approx(0.99 / t0) and ours.lr(0, 100) == pytest.approx(1 / t0)
    assert compat.lr(0, 99) == pytest.approx(0.99) and compat.lr(0, 100) == pytest.approx(1 / t0)


def test_t0_one_is_the_plain_cosine():
    sched = FreezeOutSchedule(num_units=13, total_steps=500, base_lr=2e-3, warmup_steps=50, t_0=1.0, min_lr=1e-6)
    for unit in (None, 0, 6, 12):
        for step in range(0, 500, 7):
            assert sched.lr(unit, step) == cosine_lr(step, base_lr=2e-3, min_lr=1e-6, warmup_steps=50,
                                                     total_steps=500)
    assert sched.num_frozen(499) == 0


def test_invalid_schedules():
    with pytest.raises(ValueError, match="t_0"):
        FreezeOutSchedule(num_units=3, total_steps=10, base_lr=1.0, t_0=1.5)
    with pytest.raises(ValueError, match="how_scale"):
        FreezeOutSchedule(num_units=3, total_steps=10, base_lr=1.0, how_scale="quartic")


def tiny_mim(**kw):
    torch.manual_seed(0)
    return models.create_model("MIM_vit_tiny_patch16", img_size=32, depth=4, **kw)


def train_tiny(model, schedule, steps, *, start=0, optimizer_state=None):
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.05, unit_of=model.unit_of), lr=1e-3,
                            betas=(0.9, 0.95))
    freezer = Freezer(model, opt, schedule, unit_of=model.unit_of)
    if optimizer_state is not None:
        freezer.sync(start)
        opt.load_state_dict(optimizer_state)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 32, 32, generator=gen), None) for _ in range(steps + start)][start:]

    def step_fn(batch, step):
        return mim_step(freezer.module, batch, step, mask_ratio=0.75, device=torch.device("cpu"),
                        num_frozen=freezer.num_frozen)

    torch.manual_seed(start)
    freezer.train()
    train_one_epoch(step_fn, data, opt, torch.amp.GradScaler("cpu", enabled=False),
                    LoopConfig(steps_per_epoch=steps, print_freq=100), EpochProgress(epoch=0, first_step=start),
                    before_update=freezer.before_update, no_sync=freezer.no_sync)
    return freezer, opt


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_frozen_units_do_not_change_by_a_bit_and_leave_the_optimizer():
    model = tiny_mim()  # 5 units: embedding, 4 blocks; stages fed by blocks 0..3 -> units 1..4
    sched = FreezeOutSchedule(num_units=5, total_steps=12, base_lr=1e-3, warmup_steps=2, t_0=0.5,
                              how_scale="linear")
    assert [sched.freeze_step(u) for u in range(5)] == [7, 9, 10, 11, 12]  # 2 + 10 t_i, t_i = 0.5 + i / 8, rounded up
    before = snapshot(model)
    freezer, opt = train_tiny(model, sched, 8)  # steps 0..7: unit 0 frozen from step 7
    mid = snapshot(model)
    freezer2, opt2 = train_tiny(model, sched, 3, start=8, optimizer_state=opt.state_dict())  # steps 8, 9, 10
    after = snapshot(model)
    assert freezer2.num_frozen == 3
    for name, param in model.named_parameters():
        unit = model.unit_of(name)
        if unit == 0:  # frozen at step 7: identical to its value at the end of step 6... and ever after
            assert torch.equal(mid[name], after[name]) and not param.requires_grad and param.grad is None
        if unit is not None and unit >= 3:  # still training
            assert not torch.equal(mid[name], after[name]), name
            assert param.requires_grad
        assert not torch.equal(before[name], mid[name]) or unit is None, name
    frozen_ids = {id(p) for n, p in model.named_parameters() if model.unit_of(n) < 3}
    assert not any(id(p) in frozen_ids for g in opt2.param_groups for p in g["params"])
    assert not any(id(p) in frozen_ids for p in opt2.state)
    assert all(g["unit"] >= 3 for g in opt2.param_groups)
    for group in opt2.param_groups:  # lrs of the last update come from the schedule
        assert group["lr"] == sched.lr(group["unit"], 10)
    assert not model.blocks[0].training and model.blocks[3].training and model.decoder[3].training


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_frozen_prefix_runs_no_backward_unless_cls_stays_trainable():
    for compat in (False, True):
        model = tiny_mim(freeze_cls_token=not compat)
        fired = []
        for i, block in enumerate(model.blocks):
            block.register_full_backward_hook(lambda m, gi, go, i=i: fired.append(i))
        for name, param in model.named_parameters():
            if model.unit_of(name) is not None and model.unit_of(name) < 3:
                param.requires_grad_(False)
        out = model(torch.randn(2, 3, 32, 32), num_frozen=3)
        out["loss"].backward()
        # blocks 0, 1 are units 1, 2 (frozen); block 2, 3 train
        assert sorted(set(fired)) == ([0, 1, 2, 3] if compat else [2, 3]), compat
        assert (model.cls_token.grad is not None) == compat
