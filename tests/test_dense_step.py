"""benchmarks/dense_step.py times the real training loop (``engine.train.train_one_epoch`` with the scripts' step
functions), warm-up and timed updates counted by the loop itself, and prints one JSON line per task. Tiny sizes:
this checks that it runs, it publishes no timing."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import dense_step  # noqa: E402


@pytest.mark.parametrize("task, size", [("classify", ["--input_size", "32"]), ("upernet", ["--input_size", "64"]),
                                        ("mask_rcnn", ["--det_size", "64"])])
def test_the_benchmark_runs_the_training_loop(task, size, monkeypatch, capsys, one_thread):
    real, calls = dense_step.train_one_epoch, []

    def recorded(step_fn, loader, optimizer, scaler, config, progress, **kwargs):
        steps, before = [], [p.detach().clone() for g in optimizer.param_groups for p in g["params"]][:3]

        def spy(batch, step):
            steps.append(step)
            return step_fn(batch, step)
        stats = real(spy, loader, optimizer, scaler, config, progress, **kwargs)
        after = [p for g in optimizer.param_groups for p in g["params"]][:3]
        calls.append((steps, progress.update, stats["loss"] is not None,
                      any(not a.equal(b) for a, b in zip(after, before))))
        return stats

    monkeypatch.setattr(dense_step, "train_one_epoch", recorded)
    warmup, steps = (1, 2) if task == "classify" else (0, 1)
    dense_step.main(["--task", task, "--model", "vit_tiny_patch16", "--batch_size", "2", "--steps", str(steps),
                     "--warmup", str(warmup), "--threads", "1", *size])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = [([0], 1, True, True)] if warmup else []
    assert calls == expected + [(list(range(warmup, warmup + steps)), steps, True, True)]  # updates applied
    assert row["benchmark"] == "dense_step" and row["task"] == task and row["steps"] == steps
    assert row["timed"] == "engine.train.train_one_epoch" and row["peak_mem_mib"] > 0
    assert row["images_per_s"] == pytest.approx(2 / row["s_per_step"], rel=0.01)
