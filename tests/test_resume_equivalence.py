"""A run that is interrupted and resumed ends bit-identical to an unbroken run, for every training script (they share
one run driver, engine/run.py ``fit``): same weights, optimizer state (moments, step counts, every group's lr), step,
``log.txt`` lines (each epoch once, same averages) and returned metrics.

Interruptions, each at a chosen optimizer step (the script's step function is wrapped inside ``fit``):
  epoch_end  a hard kill at the first step of an epoch; ``--auto_resume`` continues from the last epoch-end
             checkpoint-last.pth (FreezeOut: the saved optimizer holds only the unfrozen units' groups);
  steps      ``--save_every_steps 2`` and a hard kill mid-epoch: ``--auto_resume`` continues from the last mid-epoch
             save (position inside the epoch; per-rank random state: mixup / cutmix, drop path, RoI sampling);
  signal     SIGTERM / SIGUSR2 arrives in the middle of a forward: the run stops after that update, saves its
             position, exits 128 + signal with the resume command (engine/preemption.py), and ``--auto_resume``
             goes on at the next batch;
  crash      (fine-tuning) a crash after each write of the last epoch's end (numbered checkpoint, best
             checkpoint, log line, checkpoint-last.pth; then results.json): every output of the unbroken run;
  numbered   (linear probe) ``--resume checkpoint-0.pth`` into a new folder trains epochs 1 and 2 only.

Tiny models, CPU, one thread. Each script's unbroken run is made once per module."""
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import engine.finetune
import main_finetune
import main_linprobe
import util.checkpoint
import util.logging
from script_runs import SCRIPTS, Script, at_step
from util.checkpoint import LAST_NAME, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread_module")
TIMES = ("train_epoch_time_s", "train_images_per_s", "epoch_time_s", "images_per_s")


class Killed(BaseException):
    """A hard kill (``kill -9``): nothing of the script runs after it."""


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """``unbroken(script, data)`` -> (run folder, main()'s result) of the uninterrupted run, made once. It keeps the
    checkpoints the tests compare with (all of fine-tuning's, the probe's first, everyone's last): five runs' worth
    of checkpoints held for the module's life would take a gigabyte."""
    runs = {}
    compared = {"main_finetune": ("*",), "main_linprobe": (LAST_NAME, "checkpoint-0.pth")}

    def get(script: Script, data) -> tuple[Path, dict]:
        if script.name not in runs:
            out = tmp_path_factory.mktemp(f"unbroken_{script.name}")
            runs[script.name] = out, script.module.main(script.argv(data, out))
            keep = compared.get(script.name, (LAST_NAME,))
            for path in out.glob("checkpoint-*.pth"):
                if "*" not in keep and path.name not in keep:
                    path.unlink()
        return runs[script.name]
    return get


# ------------------------------------------------------------------------------------------------- comparisons
def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def without_times(value):
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return {k: v for k, v in value.items() if k not in TIMES}


def assert_same_run(full: Path, cut: Path, name: str = LAST_NAME) -> None:
    """Same weights, optimizer state (moments, step counts, lr of every group), epoch and step: bit for bit."""
    a, b = load_checkpoint(full / name), load_checkpoint(cut / name)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] and "position" not in b
    assert a["model"].keys() == b["model"].keys()
    differing = [key for key in a["model"] if not torch.equal(a["model"][key], b["model"][key])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][k][key]), (k, key)


def kill(model) -> None:
    raise Killed("kill -9")


def killed_run(script: Script, data, out: Path, monkeypatch, step: int, action, *extra) -> None:
    """``script`` run in ``out`` until ``action`` kills it at optimizer step ``step``."""
    at_step(monkeypatch, script, step, action)
    with pytest.raises(Killed):
        script.module.main(script.argv(data, out, *extra))
    monkeypatch.undo()


# ---------------------------------------------------------------------------------------- kill, mid-epoch save
KILLS = [  # script, kind, step of the kill, extra flags
    ("pretrain", "epoch_end", 12, ()),  # epoch 3 starts; units froze in epoch 2
    ("pretrain", "steps", 15, ("--save_every_steps", "2")),  # epoch 3, update 4: saved after update 2, mid-freezing
    ("finetune", "epoch_end", 8, ()),  # epoch 2 starts
    ("finetune", "steps", 7, ("--save_every_steps", "2")),  # epoch 1, update 4: saved after update 2
    ("segment", "steps", 7, ("--save_every_steps", "2")),
]


@pytest.mark.parametrize("name, kind, step, extra", KILLS, ids=[f"{s}-{k}" for s, k, _, _ in KILLS])
def test_killed_run_resumes_to_the_unbroken_run(name, kind, step, extra, script_data, unbroken, tmp_path,
                                                 monkeypatch):
    script = SCRIPTS[name]
    data = script_data(script)
    full, full_result = unbroken(script, data)
    out = tmp_path / "cut"
    killed_run(script, data, out, monkeypatch, step, kill, *extra)
    saved = load_checkpoint(out / LAST_NAME)
    epoch, update = divmod(step, script.steps_per_epoch)
    if kind == "epoch_end":
        assert saved["epoch"] == epoch - 1 and saved["step"] == step and "position" not in saved
        assert [line["epoch"] for line in logged(out)] == list(range(epoch))
    else:  # the last save: after update 2 of the epoch
        assert saved["epoch"] == epoch - 1 and saved["step"] == epoch * script.steps_per_epoch + 2
        assert (saved["position"]["epoch"], saved["position"]["update"]) == (epoch, 2)
    if name == "pretrain" and kind == "epoch_end":  # saved with the frozen units' groups removed
        assert len(saved["optimizer"]["param_groups"]) < 26  # 13 units, with and without weight decay
    result = script.module.main(script.argv(data, out, *extra, "--auto_resume"))
    assert_same_run(full, out)
    assert without_times(logged(out)) == without_times(logged(full))  # each epoch once, same averages
    assert without_times(result) == without_times(full_result)


# ---------------------------------------------------------------------------------------------------- preemption
SIGNALS = [  # script, signal, step at which it arrives, where the run says it stopped
    ("pretrain", signal.SIGTERM, 6, "at step 7 (update 3 of 4 in epoch 1)"),
    ("segment", signal.SIGTERM, 8, "at step 9 (update 1 of 2 in epoch 2)"),  # the last epoch, cut short
    ("detect", signal.SIGUSR2, 5, "at step 6 (update 2 of 4 in epoch 1)"),
]


@pytest.mark.parametrize("name, signum, step, where", SIGNALS, ids=[s for s, *_ in SIGNALS])
def test_preempted_run_stops_after_the_update_and_resumes_to_the_unbroken_run(name, signum, step, where,
                                                                              script_data, unbroken, tmp_path,
                                                                              monkeypatch, caplog):
    script = SCRIPTS[name]
    data = script_data(script)
    full, full_result = unbroken(script, data)
    out = tmp_path / "cut"
    at_step(monkeypatch, script, step, lambda model: os.kill(os.getpid(), signum))  # in the middle of an update
    with pytest.raises(SystemExit) as exc:
        script.module.main(script.argv(data, out))
    monkeypatch.undo()
    assert exc.value.code == 128 + signum and signal.getsignal(signum) == signal.SIG_DFL  # handler restored
    assert f"stopped by {signal.Signals(signum).name} {where}" in caplog.text
    assert f"Resume with: python {script.name}.py" in caplog.text and "--auto_resume" in caplog.text
    saved = load_checkpoint(out / LAST_NAME)
    epoch, update = divmod(step + 1, script.steps_per_epoch)
    assert saved["step"] == step + 1 and saved["epoch"] == epoch - 1  # the last finished epoch
    assert (saved["position"]["epoch"], saved["position"]["update"]) == (epoch, update)
    assert [line["epoch"] for line in logged(out)] == list(range(epoch))
    caplog.clear()
    result = script.module.main(script.argv(data, out, "--auto_resume"))
    assert f"{update} updates into epoch {epoch}" in caplog.text
    assert f"Epoch: [{epoch}] [{update + 1}/" in caplog.text and f"Epoch: [{epoch}] [1/" not in caplog.text
    assert_same_run(full, out)  # random state (drop path, torchvision's RoI sampling) restored too
    assert without_times(logged(out)) == without_times(logged(full))
    assert without_times(result) == without_times(full_result)  # final evaluation too


# ------------------------------------------------------------------------------------ crash in the epoch-end writes
@pytest.fixture(scope="module")
def finetune_after_epoch_1(ft_folder, tmp_path_factory) -> Path:
    """A fine-tuning run killed as epoch 2 (the last) starts: its folder holds epochs 0 and 1."""
    script = SCRIPTS["finetune"]
    out = tmp_path_factory.mktemp("finetune_after_epoch_1")
    with pytest.MonkeyPatch.context() as patch:
        killed_run(script, ft_folder, out, patch, 8, kill)
    return out


CRASH_POINTS = [0, 1, 2, 3, "results"]  # after k writes of the last epoch's end, or before results.json


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_between_epoch_end_writes_then_auto_resume_gives_every_output(point, script_data, unbroken,
                                                                            finetune_after_epoch_1, tmp_path,
                                                                            monkeypatch):
    """A crash after each write of the last epoch's end (numbered checkpoint, best checkpoint when that epoch is
    the best, log line, checkpoint-last.pth; then results.json), then --auto_resume: every output of an unbroken
    run, each epoch logged once, and results.json naming the epoch of checkpoint-best.pth."""
    script = SCRIPTS["finetune"]
    data = script_data(script)
    full, full_result = unbroken(script, data)
    out = tmp_path / "run"
    # checkpoints are hard links (checkpoints are only ever replaced, never written in place: the shared folder
    # stays as it was), the rest copies: five crash points cost one folder of checkpoints on disk, not five
    shutil.copytree(finetune_after_epoch_1, out, copy_function=lambda src, dst: os.link(src, dst)
                    if src.endswith(".pth") else shutil.copy2(src, dst))
    final, writes = 2, []
    real_save, real_log = util.checkpoint.save_checkpoint, util.logging.MetricWriter.log_epoch

    class Crash(Exception):
        pass

    def count(name: str) -> None:
        writes.append(name)
        if len(writes) == point:
            raise Crash(f"after {writes}")

    def save(path, state):
        if state["epoch"] == final and "position" not in state:
            if point == 0:
                raise Crash("before the first write")
            real_save(path, state)
            count(Path(path).name)
        else:
            real_save(path, state)

    def log_epoch(self, stats):
        real_log(self, stats)
        if stats["epoch"] == final:
            count("log.txt")

    def write_results(output_dir, results):
        raise Crash("before results.json")

    monkeypatch.setattr(util.checkpoint, "save_checkpoint", save)
    monkeypatch.setattr(util.logging.MetricWriter, "log_epoch", log_epoch)
    if point == "results":
        monkeypatch.setattr(engine.finetune, "write_results", write_results)
    with pytest.raises(Crash):
        main_finetune.main(script.argv(data, out, "--auto_resume"))
    monkeypatch.undo()
    if point == "results":
        assert writes[-1] == LAST_NAME  # checkpoint-last.pth is the last write of an epoch
    result = main_finetune.main(script.argv(data, out, "--auto_resume"))

    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == sorted(p.name for p in full.glob("checkpoint-*.pth"))
    assert sorted(p.name for p in full.glob("checkpoint-*.pth")) == [  # every 2 epochs and after the last
        "checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-best.pth", "checkpoint-last.pth"]
    assert not list(out.glob(".*.tmp"))
    for name in ("checkpoint-last.pth", "checkpoint-best.pth", f"checkpoint-{final}.pth", "checkpoint-1.pth"):
        assert_same_run(full, out, name)
    assert without_times(logged(out)) == without_times(logged(full))  # each epoch once
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads((full / "results.json").read_text()) == result == full_result
    assert load_checkpoint(out / "checkpoint-best.pth")["epoch"] == results["best_epoch"]


# ------------------------------------------------------------------------------- resume from a numbered checkpoint
def test_probe_resumed_from_a_numbered_checkpoint_trains_only_the_later_epochs(script_data, unbroken, tmp_path):
    script = SCRIPTS["linprobe"]
    data = script_data(script)
    full, full_result = unbroken(script, data)
    out = tmp_path / "resumed"
    result = main_linprobe.main(script.argv(data, out, "--resume", str(full / "checkpoint-0.pth")))
    assert_same_run(full, out)
    # the resumed run started after epoch 0 (a run that ignored --resume would train the same heads from epoch 0)
    assert without_times(logged(out)) == without_times(logged(full))[1:]
    start = load_checkpoint(full / "checkpoint-0.pth")["model"]
    assert not torch.equal(start["0.1.weight"], load_checkpoint(full / LAST_NAME)["model"]["0.1.weight"])
    assert result == full_result
