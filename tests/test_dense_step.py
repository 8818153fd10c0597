"""benchmarks/dense_step.py times the real training loop (``engine.train.train_one_epoch`` with the scripts' step
functions), warm-up and timed updates counted by the loop itself, and prints one JSON line per task. Tiny sizes and
a stand-in clock: the line's throughput follows from the clock's seconds and its parameter count from the model."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import dense_step  # noqa: E402


@pytest.mark.parametrize("task, size, batch", [("classify", ["--input_size", "32"], 2),
                                               ("upernet", ["--input_size", "64"], 2),  # the PPM's BatchNorm: >= 2
                                               ("mask_rcnn", ["--det_size", "64"], 1)])  # 512 RoIs an image
def test_the_benchmark_runs_the_training_loop(task, size, batch, monkeypatch, capsys, one_thread):
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
    built, build = [], dense_step.build
    monkeypatch.setattr(dense_step, "build", lambda *a: built.append(build(*a)) or built[-1])
    warmup, steps = (1, 2) if task == "classify" else (0, 1)
    clock = iter([100.0, 100.0 + 0.8 * steps])  # the benchmark reads its clock before and after the timed updates
    monkeypatch.setattr(dense_step, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    dense_step.main(["--task", task, "--model", "vit_tiny_patch16", "--batch_size", str(batch), "--steps", str(steps),
                     "--warmup", str(warmup), "--threads", "1", *size])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = [([0], 1, True, True)] if warmup else []
    assert calls == expected + [(list(range(warmup, warmup + steps)), steps, True, True)]  # updates applied
    assert row["benchmark"] == "dense_step" and row["task"] == task and row["steps"] == steps
    assert row["timed"] == "engine.train.train_one_epoch" and row["peak_mem_mib"] > 0
    # `batch` images per update, 0.8 s per update on the stand-in clock
    assert (row["images_per_s"], row["s_per_step"], row["batch_size"]) == (batch / 0.8, 0.8, batch)
    (model, _, _), = built
    assert row["params_m"] == round(sum(p.numel() for p in model.parameters()) / 1e6, 2) > 0
    assert row["model"] == "vit_tiny_patch16" and row["input_size"] == int(size[1])
