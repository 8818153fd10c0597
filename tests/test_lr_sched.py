import math

import pytest
import torch

from util.lr_sched import apply_lr, cosine_lr, training_budget


def mae_lr(epoch: float, *, lr: float, min_lr: float, warmup: float, epochs: float) -> float:
    """MAE's util/lr_sched.adjust_learning_rate written out (fractional epochs)."""
    if epoch < warmup:
        return lr * epoch / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


@pytest.mark.parametrize("step", [0, 1, 49, 50, 51, 120, 299, 300, 400])
def test_cosine_matches_mae_formula(step):
    steps_per_epoch, warmup_epochs, epochs = 10, 5, 30
    expected = mae_lr(min(step / steps_per_epoch, epochs), lr=1e-3, min_lr=1e-6, warmup=warmup_epochs, epochs=epochs)
    got = cosine_lr(step, base_lr=1e-3, min_lr=1e-6, warmup_steps=warmup_epochs * steps_per_epoch,
                    total_steps=epochs * steps_per_epoch)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_hand_values():
    kw = dict(base_lr=2.0, min_lr=0.0, warmup_steps=4, total_steps=12)
    assert cosine_lr(0, **kw) == 0.0
    assert cosine_lr(2, **kw) == 1.0
    assert cosine_lr(4, **kw) == 2.0
    assert cosine_lr(8, **kw) == pytest.approx(1.0)  # half-way through the cosine
    assert cosine_lr(12, **kw) == pytest.approx(0.0, abs=1e-15)
    assert cosine_lr(0, base_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10) == 1.0


def test_apply_lr_uses_lr_scale():
    w1, w2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w1]}, {"params": [w2], "lr_scale": 0.25}], lr=1.0)
    apply_lr(opt, 0.4)
    assert [g["lr"] for g in opt.param_groups] == [0.4, 0.1]


def test_training_budget_follows_mae_scaling():
    # MAE ViT-B: 64 per GPU x accum 8 x 8 GPUs = 4096, lr = 1.5e-4 x 4096 / 256 = 2.4e-3; partial groups dropped
    steps, eff, lr = training_budget(num_samples=10**6, num_batches=1001, batch_size=64, accum_iter=8, world_size=8,
                                     blr=1.5e-4)
    assert (steps, eff) == (125, 4096) and lr == pytest.approx(2.4e-3)
    assert training_budget(num_samples=8, num_batches=1, batch_size=8, accum_iter=1, world_size=1, blr=1.0,
                           lr=0.5)[2] == 0.5  # --lr wins
    with pytest.raises(ValueError, match="12 training samples are fewer than one optimizer step needs \\(16 ="):
        training_budget(num_samples=12, num_batches=1, batch_size=8, accum_iter=2, world_size=1, blr=1.0)
