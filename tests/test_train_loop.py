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


class NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss whose gradient is not)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_non_finite_gradient_with_finite_loss_is_skipped():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_data()
    loader = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]

    def step_fn(b, step):
        loss = ((model(b[0]).squeeze(1) - b[1]) ** 2).mean()
        return {"loss": NanGrad.apply(loss) if step == 1 else loss}

    weights = []
    config = LoopConfig(steps_per_epoch=3, max_skipped_steps=1)
    progress = EpochProgress(epoch=0, first_step=0)
    stats = train_one_epoch(step_fn, loader, opt, torch.amp.GradScaler("cpu", enabled=False), config, progress,
                            before_update=lambda s: weights.append(model.weight.detach().clone()))
    assert torch.equal(weights[1], weights[2]) and not torch.equal(weights[0], weights[1])  # step 1 not applied
    assert torch.isfinite(model.weight).all() and stats["skipped_steps"] == 1 and progress.loss_count == 2
    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm nan at step 1"):
        train_one_epoch(step_fn, loader, opt, torch.amp.GradScaler("cpu", enabled=False),
                        LoopConfig(steps_per_epoch=3), EpochProgress(epoch=0, first_step=0), before_update=print)


def test_log_steps_carry_every_scalar_and_images_per_second():
    logs = []
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = make_data()
    loader = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]

    def step_fn(b, step):
        loss = ((model(b[0]).squeeze(1) - b[1]) ** 2).mean()
        return {"loss": loss, "loss_x4": loss.detach() * 2, "loss_x2": torch.tensor(float(step))}

    config = LoopConfig(steps_per_epoch=4, print_freq=2, images_per_update=4)
    stats = train_one_epoch(step_fn, loader, torch.optim.SGD(model.parameters(), lr=0.01),
                            torch.amp.GradScaler("cpu", enabled=False), config, EpochProgress(epoch=0, first_step=10),
                            before_update=lambda s: None, log_fn=lambda m, s: logs.append((s, m)))
    assert [s for s, _ in logs] == [12, 14]
    for _, metrics in logs:
        assert {"train/loss", "train/lr", "train/loss_x4", "train/loss_x2", "train/images_per_s"} <= set(metrics)
        assert metrics["train/loss_x4"] == pytest.approx(2 * metrics["train/loss"], rel=1e-5)
    assert logs[0][1]["train/loss_x2"] == 10.5 and logs[1][1]["train/loss_x2"] == 12.5  # mean since the last log
    assert stats["loss_x2"] == 11.5 and stats["epoch_time_s"] > 0
    assert stats["images_per_s"] == pytest.approx(16 / stats["epoch_time_s"])


def test_stop_and_continue_from_the_progress_equals_one_epoch():
    """should_stop ends the epoch after the current update and hands the progress to checkpoint_fn; a second call
    from that progress (loader started at that batch) ends as the unbroken epoch: weights and averages."""
    x, y = make_data()
    batches = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 16, 2)]  # 8 updates

    def fresh():
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    def step_fn_of(model):
        return lambda b, step: {"loss": ((model(b[0]).squeeze(1) - b[1]) ** 2).mean(), "aux": b[1].mean()}

    config = LoopConfig(steps_per_epoch=8, save_every_steps=3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model, opt = fresh()
    full = train_one_epoch(step_fn_of(model), batches, opt, scaler, config, EpochProgress(2, 16),
                           before_update=lambda s: None)
    model2, opt2 = fresh()
    saved, calls = [], []
    first = EpochProgress(2, 16)
    train_one_epoch(step_fn_of(model2), batches, opt2, scaler, config, first, before_update=calls.append,
                    checkpoint_fn=lambda p: saved.append(p.state_dict()), should_stop=lambda: len(calls) >= 5)
    assert first.stopped and first.update == 5 and [s["update"] for s in saved] == [3, 5]
    resumed = EpochProgress.from_state_dict(saved[-1])
    rest = train_one_epoch(step_fn_of(model2), batches[5:], opt2, scaler, config, resumed,
                           before_update=calls.append)
    assert calls == list(range(16, 24)) and not resumed.stopped
    assert torch.equal(model.weight, model2.weight) and torch.equal(model.bias, model2.bias)
    for key in ("loss", "aux", "step", "skipped_steps"):
        assert rest[key] == full[key], key


def _stop_worker(rank: int, out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = make_data(seed=rank)
    loader = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 16, 2)]
    calls = []
    progress = EpochProgress(epoch=0, first_step=0)
    train_one_epoch(lambda b, s: {"loss": ((model(b[0]).squeeze(1) - b[1]) ** 2).mean()}, loader,
                    torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False),
                    LoopConfig(steps_per_epoch=8), progress, before_update=calls.append,
                    should_stop=lambda: rank == 1 and len(calls) >= 3)  # only rank 1 is signalled
    torch.save({"update": progress.update, "stopped": progress.stopped}, f"{out}/rank{rank}.pt")


def test_a_stop_signal_on_one_rank_stops_every_rank_after_the_same_update(tmp_path):
    spawn(_stop_worker, str(tmp_path))
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)] == [{"update": 3, "stopped": True}] * 2


def test_fp16_loss_scaler_owns_gradient_overflow_and_a_nan_loss_still_counts():
    """With an enabled loss scaler an overflowing gradient is routine: the scaler skips that update and halves its
    scale, and it is not counted against --max_skipped_steps; a NaN loss is skipped and counted (and the scaler
    is closed for that update, so the next unscale_ works)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = make_data()
    loader = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]

    def step_fn(b, step):
        loss = ((model(b[0]).squeeze(1) - b[1]) ** 2).mean()
        return {"loss": NanGrad.apply(loss) if step == 1 else loss * float("nan") if step == 2 else loss}

    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0 ** 8)
    weights = []
    stats = train_one_epoch(step_fn, loader, torch.optim.SGD(model.parameters(), lr=0.1), scaler,
                            LoopConfig(steps_per_epoch=4, max_skipped_steps=1, clip_grad=1.0),
                            EpochProgress(epoch=0, first_step=0),
                            before_update=lambda s: weights.append(model.weight.detach().clone()))
    assert [torch.equal(a, b) for a, b in zip(weights, weights[1:])] == [False, True, True]
    assert stats["skipped_steps"] == 1 and scaler.get_scale() == 2.0 ** 6 and torch.isfinite(model.weight).all()


def test_progress_line_shows_the_runs_eta(caplog, monkeypatch):
    """The run ETA is the mean update time times the updates left in the whole run, not only the epoch."""
    import engine.train as train
    clock = iter(range(0, 1000, 2))  # every time.time() call advances 2 s
    monkeypatch.setattr(train.time, "time", lambda: float(next(clock)))
    model = nn.Linear(3, 1)
    x, y = make_data()
    loader = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]
    config = LoopConfig(steps_per_epoch=4, print_freq=4, total_steps=40)
    with caplog.at_level("INFO", logger="vitfreeze"):
        train_one_epoch(lambda b, s: {"loss": ((model(b[0]).squeeze(1) - b[1]) ** 2).mean()}, loader,
                        torch.optim.SGD(model.parameters(), lr=0.01), torch.amp.GradScaler("cpu", enabled=False),
                        config, EpochProgress(epoch=2, first_step=8), before_update=lambda s: None)
    (line,) = [r.getMessage() for r in caplog.records if "Epoch: [2] [4/4]" in r.getMessage()]
    per_update = float(line.split("time: ")[1].split(" s/it")[0])
    left = 40 - 12  # steps 8..11 done
    assert f"(run: {train.format_eta(per_update * left)})" in line
