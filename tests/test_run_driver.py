"""The run driver (engine/run.py): best as the task defines it, NaN never best, mid-epoch checkpoints and resume,
and the entry scripts' one command line (aliases give their main's one-line errors)."""
import argparse
import importlib
import logging
import math
import os
import runpy
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from engine.run import Best, EpochEnd, fit, mid_epoch_state, Task
from engine.train import EpochProgress
from util.checkpoint import load_checkpoint, NonFiniteStateError
from util.data.loaders import build_train_loader
from util.distributed import DistInfo
from util.logging import MetricWriter

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4  # 8 samples, batch 2


def make_run(tmp_path, *, epochs=3, metrics=None, best=None, stop_at=None, auto_resume=False, save_every_steps=0):
    """A tiny regression through :func:`fit`; returns (outcome, model, calls). ``metrics[epoch]``: what the
    evaluation hook returns; ``stop_at``: the update before which SIGUSR2 arrives (preemption)."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, generator=g)
    data = TensorDataset(x, x @ torch.tensor([1.0, -1.0]))
    loader = build_train_loader(data, batch_size=2, num_workers=0, pin_memory=False, rank=0, world_size=1, seed=0,
                                keyed=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(epochs=epochs, resume="", auto_resume=auto_resume, start_epoch=0, seed=0, accum_iter=1,
                              clip_grad=None, max_skipped_steps=0, print_freq=100, save_every=100,
                              save_every_steps=save_every_steps, output_dir=str(tmp_path), log_dir=None)
    calls = {"evaluate": [], "best_seen": [], "before_update": []}

    def before_update(step):
        calls["before_update"].append(step)
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGUSR2)

    def evaluate(epoch, progress):
        calls["evaluate"].append((epoch, progress.step))
        return None if metrics[epoch] is None else dict(metrics[epoch])

    def end_epoch(epoch, stats, m, run):
        calls["best_seen"].append(dict(run.best) if run.best else None)
        return EpochEnd(log={"seen": m and m["acc"]})

    task = Task(step=lambda b, step: {"loss": ((model(b[0]).squeeze(1) - b[1]) ** 2).mean()},
                before_update=before_update, train=model.train, evaluate=evaluate if metrics else None, best=best,
                end_epoch=end_epoch, state=lambda run: {"classes": ["a"]})
    outcome = fit(task, args, DistInfo(), model=model, optimizer=optimizer,
                  scaler=torch.amp.GradScaler("cpu", enabled=False), loader=loader,
                  writer=MetricWriter(tmp_path, None), steps_per_epoch=STEPS, images_per_update=2, amp_dtype=None,
                  record={}, script="main_x.py", argv=[])
    return outcome, model, calls


ACC_BEST = Best("acc", {"acc": -1.0, "epoch": -1}, lambda m, epoch, progress: {"acc": m["acc"], "epoch": epoch,
                                                                               "step": progress.step})


def test_fit_calls_the_evaluation_hook_and_marks_best_as_the_task_defines(tmp_path):
    outcome, _, calls = make_run(tmp_path, metrics=[{"acc": 1.0}, {"acc": 3.0}, {"acc": 2.0}], best=ACC_BEST)
    assert calls["evaluate"] == [(0, 4), (1, 8), (2, 12)]  # after every epoch, at the epoch's last step
    assert outcome.best == {"acc": 3.0, "epoch": 1, "step": 8}
    # the epoch-end report already sees the updated record
    assert [b["acc"] for b in calls["best_seen"]] == [1.0, 3.0, 3.0]
    assert outcome.metrics == {"acc": 2.0} and outcome.step == 12
    best_ckpt, last = load_checkpoint(tmp_path / "checkpoint-best.pth"), load_checkpoint(tmp_path /
                                                                                          "checkpoint-last.pth")
    assert best_ckpt["epoch"] == 1 and best_ckpt["best"] == outcome.best and best_ckpt["classes"] == ["a"]
    assert last["epoch"] == 2 and last["best"] == outcome.best
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert [line.count('"seen"') for line in lines] == [1, 1, 1] and '"epoch": 2' in lines[-1]


def test_a_nan_metric_is_never_best(tmp_path):
    nan = float("nan")
    outcome, _, calls = make_run(tmp_path, metrics=[{"acc": nan}, {"acc": 0.5}, {"acc": nan}], best=ACC_BEST)
    assert outcome.best == {"acc": 0.5, "epoch": 1, "step": 8}
    assert calls["best_seen"][0] == {"acc": -1.0, "epoch": -1}  # a NaN first evaluation does not replace "none"
    assert load_checkpoint(tmp_path / "checkpoint-best.pth")["epoch"] == 1
    assert not ACC_BEST.improves({"acc": math.inf}, {"acc": -1.0})
    assert not ACC_BEST.improves({"acc": 0.5}, {"acc": 0.5})  # a tie keeps the earlier epoch
    assert ACC_BEST.improves({"acc": 0.0}, {"acc": -1.0})


def test_all_nan_metrics_write_no_best_checkpoint(tmp_path):
    outcome, _, _ = make_run(tmp_path, epochs=2, metrics=[{"acc": float("nan")}] * 2, best=ACC_BEST)
    assert outcome.best == {"acc": -1.0, "epoch": -1}
    assert not (tmp_path / "checkpoint-best.pth").exists()


def test_an_epoch_without_evaluation_keeps_the_last_metrics_and_best(tmp_path):
    """An evaluation hook that returns None (not due this epoch, as segmentation's --eval_interval) leaves the
    metrics and the best record as they were and marks no best."""
    outcome, _, calls = make_run(tmp_path, metrics=[None, {"acc": 1.0}, None], best=ACC_BEST)
    assert [e for e, _ in calls["evaluate"]] == [0, 1, 2]
    assert outcome.metrics == {"acc": 1.0} and outcome.best == {"acc": 1.0, "epoch": 1, "step": 8}
    assert calls["best_seen"][0] == {"acc": -1.0, "epoch": -1}
    assert load_checkpoint(tmp_path / "checkpoint-best.pth")["epoch"] == 1
    assert ['"seen": null' in line for line in (tmp_path / "log.txt").read_text().splitlines()] == [True, False, True]


def test_mid_epoch_state_names_the_last_finished_epoch():
    progress = EpochProgress(epoch=3, first_step=12, update=2)
    state = mid_epoch_state(lambda epoch, p: {"epoch": epoch, "step": p.step}, progress)
    assert state == {"epoch": 2, "step": 14}


def test_preempted_run_saves_its_position_and_resumes_bit_identically(tmp_path):
    """SIGUSR2 before update 5 (epoch 1's second): the driver stops after it, saves checkpoint-last.pth with epoch 0
    (the last finished one) and the position (epoch 1, update 2), and exits 140; --auto_resume ends with the
    weights of an unbroken run, every update done once."""
    _, unbroken, calls = make_run(tmp_path / "unbroken", epochs=2)
    with pytest.raises(SystemExit) as stop:
        make_run(tmp_path / "cut", epochs=2, stop_at=5)
    assert stop.value.code == 128 + signal.SIGUSR2
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint-last.pth")
    assert saved["epoch"] == 0 and saved["step"] == 6 and saved["classes"] == ["a"]
    assert (saved["position"]["epoch"], saved["position"]["update"]) == (1, 2)
    outcome, resumed, resumed_calls = make_run(tmp_path / "cut", epochs=2, auto_resume=True)
    assert resumed_calls["before_update"] == [6, 7] and outcome.start_epoch == 1 and outcome.step == 8
    assert calls["before_update"] == list(range(8))
    assert torch.equal(resumed.weight, unbroken.weight) and torch.equal(resumed.bias, unbroken.bias)


def test_save_every_steps_checkpoint_keeps_epoch_bookkeeping(tmp_path, monkeypatch):
    """Mid-epoch checkpoints (--save_every_steps 2) of epoch e record epoch e - 1 and the position inside e."""
    from util.checkpoint import RunCheckpoints
    seen = []
    original = RunCheckpoints.save_position

    def spy(self, state, position):
        seen.append((state["epoch"], state["step"], position["epoch"], position["update"]))
        return original(self, state, position)
    monkeypatch.setattr(RunCheckpoints, "save_position", spy)
    make_run(tmp_path, epochs=2, save_every_steps=2)
    assert seen == [(-1, 2, 0, 2), (0, 6, 1, 2)]  # not after an epoch's last update: that is the epoch end


# ------------------------------------------------------------------------------------------ one command line
ALIASES = [("run_pretrain", "main_pretrain"), ("run_finetune", "main_finetune"), ("run_linprobe", "main_linprobe"),
           ("run_knn", "main_knn"), ("main_finetune_gastrovision", "main_finetune"),
           ("main_finetune_hyperkvasir", "main_finetune"), ("submitit_finetune", "main_finetune")]


def error_line(run, caplog) -> tuple[int, str]:
    """Exit status and the one error line of ``run()`` (an entry point under ``run_cli``)."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="vitfreeze"), pytest.raises(SystemExit) as exc:
        run()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    return exc.value.code, errors[0]


@pytest.mark.parametrize("alias, script", ALIASES)
def test_alias_gives_its_mains_one_line_error(alias, script, monkeypatch, caplog):
    """The same failure (a non-finite state, a missing file) is the same one line and status 1 through an alias
    as through its main script's command line."""
    module = importlib.import_module(script)
    failures = [FileNotFoundError("data path /nowhere does not exist")]
    if script != "main_knn":  # the training scripts' non-finite errors
        failures.append(NonFiniteStateError("epoch 3: 2 tensor(s) of the weights are NaN; nothing is saved"))
    monkeypatch.setattr(sys, "argv", [f"{alias}.py", "--output_dir", "unused"])
    for failure in failures:
        def fail(argv=None, failure=failure):
            raise failure
        monkeypatch.setattr(module, "main", fail)
        through_main = error_line(module.cli, caplog)
        through_alias = error_line(lambda: runpy.run_path(str(ROOT / f"{alias}.py"), run_name="__main__"), caplog)
        assert through_alias == through_main == (1, f"{type(failure).__name__}: {failure}")


def test_alias_and_main_report_a_missing_data_path_alike(tmp_path, monkeypatch, caplog):
    """End to end (no stand-in main): ``run_pretrain.py`` and ``main_pretrain.py`` with a missing --data_path."""
    import main_pretrain
    lines = []
    for name, run in (("main", main_pretrain.cli),
                      ("alias", lambda: runpy.run_path(str(ROOT / "run_pretrain.py"), run_name="__main__"))):
        monkeypatch.setattr(sys, "argv", ["x.py", "--model", "mae_vit_tiny_patch16", "--input_size", "32",
                                          "--data_path", str(tmp_path / "missing"), "--output_dir",
                                          str(tmp_path / name), "--device", "cpu"])
        lines.append(error_line(run, caplog))
    assert lines[0] == lines[1] and lines[0][0] == 1 and str(tmp_path / "missing") in lines[0][1]
