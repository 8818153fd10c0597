"""Runs that go wrong : non-finite training never overwrites a good checkpoint, a crash
at any point of the epoch-end writes resumes to every output of a finished run, and a preempted run (SIGTERM /
SIGUSR2) stops at the next optimizer step and resumes bit-identically from inside the epoch. Tiny models, CPU."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import engine.finetune
import main_finetune
import main_pretrain
import util.checkpoint
import util.logging
from util.checkpoint import (LAST_NAME, NonFiniteStateError, RunCheckpoints, load_checkpoint, load_latest,
                             save_checkpoint, training_state)
from util.logging import dumps_json

ROOT = Path(__file__).resolve().parent.parent
# --debug demo: 64 images, batch 16 -> 4 steps an epoch
TINY = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--batch_size", "16", "--num_workers", "0",
        "--print_freq", "1", "--warmup_epochs", "1", "--data_path", "demo", "--debug", "--blr", "1e-2", "--seed", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def without_times(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in ("train_epoch_time_s", "train_images_per_s")} for line in lines]


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


# ------------------------------------------------------------------------------------------------- 1: non-finite
def test_json_outputs_never_hold_bare_nan():
    text = dumps_json({"loss": float("nan"), "acc": [1.0, float("inf")], "ok": 2.5, "n": None})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "loss": None, "acc": [1.0, None], "ok": 2.5, "n": None}


def test_non_finite_state_is_never_saved_and_names_the_good_checkpoint(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    lines = []
    ckpts = RunCheckpoints(tmp_path, epochs=5, save_every=1, log_epoch=lines.append)
    ckpts.end_epoch(0, training_state(model, optimizer, scaler, epoch=0, step=1, skipped=0, args={}), log={"epoch": 0})
    before = (tmp_path / LAST_NAME).read_bytes()
    model.weight.requires_grad_(False)[0, 1] = float("nan")
    with pytest.raises(NonFiniteStateError, match=r"epoch 1: 1 tensor.*model\.weight.*checkpoint-last\.pth, is left"):
        ckpts.end_epoch(1, training_state(model, optimizer, scaler, epoch=1, step=2, skipped=0, args={}),
                        log={"epoch": 1})
    model.weight[0, 1] = 0.0
    optimizer.state[model.bias] = {"exp_avg": torch.tensor([1.0, float("inf")])}  # the optimizer state counts too
    with pytest.raises(NonFiniteStateError, match=r"optimizer\.state\.\d+\.exp_avg"):
        ckpts.end_epoch(1, training_state(model, optimizer, scaler, epoch=1, step=2, skipped=0, args={}),
                        log={"epoch": 1})
    assert (tmp_path / LAST_NAME).read_bytes() == before and not (tmp_path / "checkpoint-1.pth").exists()
    assert lines == [{"epoch": 0}]


def test_huge_lr_exits_non_zero_and_keeps_the_good_checkpoint(tmp_path):
    """The issue's reproduction: a good epoch, then a resume with --blr 1e6 (loss finite, then gradients NaN)."""
    out = tmp_path / "run"
    argv = [*TINY[:-5], "--seed", "0", "--epochs", "1", "--output_dir", str(out)]  # full demo: 16 steps an epoch
    main_pretrain.main([*argv, "--blr", "1e-2"])
    good = (out / LAST_NAME).read_bytes()
    proc = subprocess.run([sys.executable, "main_pretrain.py", *argv, "--epochs", "3", "--blr", "1e6", "--auto_resume"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    message = next(line for line in (proc.stdout + proc.stderr).splitlines() if "NonFiniteLossError" in line)
    assert "NonFiniteLossError" in message and "non-finite gradient norm" in message and "epoch 1" in message
    assert f"{out / LAST_NAME}, is left as it was" in message
    assert (out / LAST_NAME).read_bytes() == good
    assert [line["epoch"] for line in logged(out)] == [0]


def test_an_epoch_with_every_update_skipped_logs_null_not_zero(tmp_path, monkeypatch):
    real = main_pretrain.mim_step

    def nan_in_epoch_1(model, batch, step, **kwargs):
        out = real(model, batch, step, **kwargs)
        if 4 <= step < 8:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(main_pretrain, "mim_step", nan_in_epoch_1)
    out = tmp_path / "run"
    stats = main_pretrain.main([*TINY, "--epochs", "3", "--max_skipped_steps", "4", "--output_dir", str(out)])
    text = (out / "log.txt").read_text()
    assert "NaN" not in text and "Infinity" not in text
    lines = logged(out)
    assert lines[1]["train_loss"] is None and lines[1]["train_skipped_steps"] == 4
    assert lines[0]["train_loss"] > 0 and lines[2]["train_loss"] > 0 and stats["skipped_steps"] == 4


# ------------------------------------------------------------------------------------------- 3: crash-safe order
def test_stale_temp_files_are_removed_and_an_unreadable_last_falls_back(tmp_path, caplog):
    (tmp_path / ".checkpoint-last.pth.x1y2.tmp").write_bytes(b"partial")
    (tmp_path / ".checkpoint-7.pth.abc.tmp").write_bytes(b"partial")
    (tmp_path / "notes.tmp").write_text("not ours")
    RunCheckpoints(tmp_path, epochs=3, save_every=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp"]
    for epoch in (1, 2):
        save_checkpoint(tmp_path / f"checkpoint-{epoch}.pth", {"epoch": epoch})
    (tmp_path / LAST_NAME).write_bytes(b"")  # e.g. a copy cut short
    (tmp_path / "checkpoint-2.pth").write_bytes(b"garbage")
    path, checkpoint = load_latest(tmp_path)
    assert path.name == "checkpoint-1.pth" and checkpoint["epoch"] == 1
    assert "falling back to" in caplog.text and "checkpoint-last.pth is unreadable" in caplog.text


CRASH_POINTS = [0, 1, 2, 3, "results"]  # after k writes of the last epoch's end, or before results.json


@pytest.fixture(scope="module")
def demo_folder(make_demo_folder) -> Path:
    return make_demo_folder(4, 2)


def ft_argv(data: Path, out: Path, *extra: str) -> list[str]:
    # 32 train images, batch 8 -> 4 steps an epoch; 3 epochs; numbered checkpoints every 2 epochs and at the end
    return ["--model", "vit_tiny_patch16", "--data_path", str(data), "--input_size", "32", "--batch_size", "8",
            "--num_workers", "0", "--print_freq", "100", "--warmup_epochs", "1", "--epochs", "3", "--save_every", "2",
            "--blr", "5e-3", "--seed", "1", "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def unbroken(demo_folder, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("unbroken")
    torch.set_num_threads(1)
    return out, main_finetune.main(ft_argv(demo_folder, out))


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_between_epoch_end_writes_then_auto_resume_gives_every_output(point, demo_folder, unbroken, tmp_path,
                                                                            monkeypatch):
    """A crash after each write of the last epoch's end (numbered checkpoint, best checkpoint when that epoch is
    the best, log line, checkpoint-last.pth; then results.json), then --auto_resume: every output of an unbroken
    run, each epoch logged once, and results.json naming the epoch of checkpoint-best.pth."""
    full, full_result = unbroken
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
    out = tmp_path / "run"
    with pytest.raises(Crash):
        main_finetune.main(ft_argv(demo_folder, out))
    monkeypatch.undo()
    if point == "results":
        assert writes[-1] == LAST_NAME  # checkpoint-last.pth is the last write of an epoch
    result = main_finetune.main(ft_argv(demo_folder, out, "--auto_resume"))

    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == sorted(p.name for p in full.glob("checkpoint-*.pth"))
    assert sorted(p.name for p in full.glob("checkpoint-*.pth")) == [  # every 2 epochs and after the last
        "checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-best.pth", "checkpoint-last.pth"]
    assert not list(out.glob(".*.tmp"))
    for name in ("checkpoint-last.pth", "checkpoint-best.pth", f"checkpoint-{final}.pth", "checkpoint-1.pth"):
        assert_same_weights(full / name, out / name)
    assert without_times(logged(out)) == without_times(logged(full))  # each epoch once
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads((full / "results.json").read_text()) == result == full_result
    assert load_checkpoint(out / "checkpoint-best.pth")["epoch"] == results["best_epoch"]


# ------------------------------------------------------------------------------------------------ 4: preemption
def test_sigterm_stops_at_the_next_step_and_resumes_bit_identically(tmp_path, monkeypatch, caplog):
    argv = [*TINY, "--epochs", "3"]
    main_pretrain.main([*argv, "--output_dir", str(tmp_path / "full")])
    real = main_pretrain.mim_step

    def terminated_at_step_6(model, batch, step, **kwargs):
        if step == 6:  # epoch 1, update 2: the signal arrives in the middle of the forward
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch, step, **kwargs)

    monkeypatch.setattr(main_pretrain, "mim_step", terminated_at_step_6)
    out = tmp_path / "cut"
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main([*argv, "--output_dir", str(out)])
    monkeypatch.undo()
    assert exc.value.code == 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored
    assert "stopped by SIGTERM at step 7 (update 3 of 4 in epoch 1)" in caplog.text
    assert "Resume with: python" in caplog.text and "--auto_resume" in caplog.text
    saved = load_checkpoint(out / LAST_NAME)
    assert saved["epoch"] == 0 and saved["step"] == 7 and saved["position"]["update"] == 3
    assert [line["epoch"] for line in logged(out)] == [0]
    main_pretrain.main([*argv, "--output_dir", str(out), "--auto_resume"])
    assert_same_weights(tmp_path / "full" / LAST_NAME, out / LAST_NAME)
    assert without_times(logged(out)) == without_times(logged(tmp_path / "full"))  # epoch 1's average too


def test_mid_epoch_checkpoints_resume_finetuning_with_the_same_mixup_and_drop_path(demo_folder, tmp_path,
                                                                                 monkeypatch):
    """--save_every_steps, then a hard kill: the resumed epoch draws the same mixup/cutmix and drop path (per-rank
    random state saved with the position), the same samples and crops (keyed), and ends bit-identical."""
    extra = ["--mixup", "0.8", "--cutmix", "1.0", "--drop_path", "0.1", "--save_every_steps", "2", "--epochs", "2"]
    main_finetune.main(ft_argv(demo_folder, tmp_path / "full", *extra))
    real = engine.finetune.classify_step

    def killed_at_step_7(model, batch, step, **kwargs):
        if step == 7:  # epoch 1, update 3: the last save was after update 2
            raise KeyboardInterrupt("kill -9")
        return real(model, batch, step, **kwargs)

    monkeypatch.setattr(engine.finetune, "classify_step", killed_at_step_7)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        main_finetune.main(ft_argv(demo_folder, out, *extra))
    monkeypatch.undo()
    saved = load_checkpoint(out / LAST_NAME)
    assert saved["position"] == {**saved["position"], "epoch": 1, "update": 2} and saved["step"] == 6
    main_finetune.main(ft_argv(demo_folder, out, *extra, "--auto_resume"))
    assert_same_weights(tmp_path / "full" / LAST_NAME, out / LAST_NAME)
    assert without_times(logged(out)) == without_times(logged(tmp_path / "full"))


def test_sigterm_to_the_cli_exits_143_with_the_resume_command(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "main_pretrain.py", *TINY, "--epochs", "500", "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / LAST_NAME).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout[-3000:]
    line = next(line for line in stdout.splitlines() if "stopped by SIGTERM" in line)
    assert f"Resume with: python main_pretrain.py --model mae_vit_tiny_patch16" in line
    assert line.endswith(f"--output_dir {out} --auto_resume")
    assert load_checkpoint(out / LAST_NAME)["step"] > 0


def test_a_loader_started_part_way_gives_the_rest_of_the_epoch_without_loading_the_skipped_images():
    from torch.utils.data import Dataset

    from util.data.loaders import build_train_loader, set_loader_epoch

    class Counting(Dataset):
        def __init__(self):
            self.loaded = []

        def __len__(self):
            return 40

        def __getitem__(self, i):
            self.loaded.append(i)
            return torch.rand(2), i  # augmentation-like randomness, keyed per sample

    def epoch(start_batch, rank=0):
        data = Counting()
        loader = build_train_loader(data, batch_size=4, num_workers=0, pin_memory=False, rank=rank, world_size=2,
                                    seed=3)
        set_loader_epoch(loader, seed=3, epoch=5, rank=rank, start_batch=start_batch)
        return list(loader), data.loaded

    full, _ = epoch(0)
    rest, loaded = epoch(2)
    assert len(full) == 5 and len(rest) == 3 and len(loaded) == 12
    for a, b in zip(full[2:], rest):
        assert all(torch.equal(x, y) for x, y in zip(a, b))  # same indices, same draws, same keys
    assert set(loaded).isdisjoint(torch.cat([b[1] for b in full[:2]]).tolist())


def test_the_resume_command_continues_from_the_run_folder():
    from util.launch import resume_argv, resume_command
    assert resume_argv(["--epochs", "3", "--resume", "a.pth", "--output_dir", "o"]) == [
        "--epochs", "3", "--output_dir", "o", "--auto_resume"]
    assert resume_argv(["--resume=a.pth", "--auto_resume"]) == ["--auto_resume"]
    assert resume_command("main_pretrain.py", ["--output_dir", "my run"]) == \
        "python main_pretrain.py --output_dir 'my run' --auto_resume"


def test_the_three_scripts_share_the_save_rules_and_the_probe_resumes_with_key_checks(small_demo, tmp_path):
    """Numbered checkpoints every --save_every epochs and after the last epoch for pretraining, fine-tuning and
    the probe alike; the probe resumes through resume_training, so a checkpoint of another kind is refused."""
    import main_linprobe
    probe = ["--data_set", "demo", "--model", "vit_tiny_patch16", "--input_size", "32", "--num_workers", "0",
             "--batch_size", "32", "--epochs", "3", "--warmup_epochs", "1", "--print_freq", "100", "--cache_features",
             "--save_every", "2"]
    main_linprobe.main([*probe, "--output_dir", str(tmp_path / "probe")])
    assert sorted(p.name for p in (tmp_path / "probe").glob("checkpoint-*.pth")) == [
        "checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-best.pth", "checkpoint-last.pth"]
    main_pretrain.main([*TINY, "--epochs", "3", "--save_every", "2", "--output_dir", str(tmp_path / "pre")])
    assert sorted(p.name for p in (tmp_path / "pre").glob("checkpoint-*.pth")) == [
        "checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-last.pth"]
    with pytest.raises(ValueError, match=r"not a training checkpoint of this script \(no \['best'\]"):
        main_linprobe.main([*probe, "--output_dir", str(tmp_path / "p2"),
                            "--resume", str(tmp_path / "pre" / "checkpoint-last.pth")])
