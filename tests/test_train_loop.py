"""The shared loop: accumulation, lr hook, non-finite skipping, clipping (against hand computations)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from engine.train import EpochProgress, LoopConfig, NonFiniteLossError, train_one_epoch
from spawn_ranks import spawn


def make_data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(n, generator=g)
    return x, y


def run(batch, accum, steps, *, nan_steps=(), max_skipped=0, clip=None, lr=0.1, data_seed=0):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = make_data(seed=data_seed)
    loader = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]
    calls = []

    def step_fn(b, step):
        loss = ((model(b[0]).squeeze(1) - b[1]) ** 2).mean()
        if step in nan_steps:
            loss = loss * float("nan")
        return {"loss": loss, "aux": loss.detach() * 2}

    config = LoopConfig(steps_per_epoch=steps, accum_steps=accum, max_skipped_steps=max_skipped, clip_grad=clip,
                        print_freq=1)
    stats = train_one_epoch(step_fn, loader, opt, torch.amp.GradScaler("cpu", enabled=False), config,
                            EpochProgress(epoch=0, first_step=5), before_update=calls.append)
    return model, stats, calls


def test_accumulation_equals_large_batch():
    big, stats_big, calls_big = run(batch=8, accum=1, steps=2)
    small, stats_small, calls_small = run(batch=4, accum=2, steps=2)
    assert torch.allclose(big.weight, small.weight, atol=1e-6) and torch.allclose(big.bias, small.bias, atol=1e-6)
    assert calls_big == calls_small == [5, 6]  # once per optimizer update, counted in updates
    assert stats_small["step"] == 7 and stats_small["loss"] == pytest.approx(stats_big["loss"], rel=1e-5)
    assert stats_small["aux"] == pytest.approx(2 * stats_small["loss"], rel=1e-5)


def test_hand_sgd_step():
    model, _, _ = run(batch=16, accum=1, steps=1)
    torch.manual_seed(0)
    ref = nn.Linear(3, 1)
    x, y = make_data()
    w, b = ref.weight.detach().clone(), ref.bias.detach().clone()
    err = (x @ w.T).squeeze(1) + b - y
    w -= 0.1 * (2 * err[:, None] * x).mean(0, keepdim=True)
    b -= 0.1 * (2 * err).mean()
    assert torch.allclose(model.weight, w, atol=1e-6) and torch.allclose(model.bias, b, atol=1e-6)


def test_non_finite_step_is_skipped_then_run_stops():
    clean, _, _ = run(batch=4, accum=1, steps=3)  # steps 5, 6, 7
    skipped, stats, _ = run(batch=4, accum=1, steps=4, nan_steps={6}, max_skipped=1)  # 6 skipped: 5, 7, 8 update
    assert stats["skipped_steps"] == 1 and stats["step"] == 9
    assert torch.isfinite(skipped.weight).all()
    with pytest.raises(NonFiniteLossError, match="at step 7"):
        run(batch=4, accum=1, steps=4, nan_steps={6, 7}, max_skipped=1)


def test_clip_grad_limits_update():
    lr, clip = 1.0, 1e-3
    model, _, _ = run(batch=16, accum=1, steps=1, clip=clip, lr=lr)
    torch.manual_seed(0)
    ref = nn.Linear(3, 1)
    delta = torch.cat([(model.weight - ref.weight).flatten(), (model.bias - ref.bias).flatten()])
    assert delta.norm().item() == pytest.approx(lr * clip, rel=1e-4)


def _rank_worker(rank: int, out: str) -> None:
    dist.init_process_group("gloo")
    # other data on each rank; a NaN at step 6 on rank 1 only
    _, stats, _ = run(batch=4, accum=1, steps=4, nan_steps={6} if rank == 1 else (), max_skipped=1, data_seed=rank)
    clean_stats = run(batch=4, accum=1, steps=1, data_seed=rank)[1]  # step 5 alone, still all-reduced
    torch.save({"stats": stats, "clean": clean_stats}, f"{out}/rank{rank}.pt")


def test_ranks_skip_together_and_log_the_mean_loss(tmp_path):
    """A non-finite loss on one rank skips the update on every rank (else DDP would deadlock or the weights
    drift apart), and every rank logs the loss averaged over ranks (MAE's all_reduce_mean)."""
    spawn(_rank_worker, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for result in results:
        assert result["stats"]["skipped_steps"] == 1 and result["stats"]["step"] == 9
    single = [run(batch=4, accum=1, steps=1, data_seed=seed)[1]["loss"] for seed in (0, 1)]
    assert single[0] != pytest.approx(single[1])
    for result in results:
        assert result["clean"]["loss"] == pytest.approx(sum(single) / 2, rel=1e-6)
