"""Runs that go wrong: non-finite training never overwrites a good checkpoint, stale temporary files and an
unreadable checkpoint-last.pth on resume, SIGTERM to the command line, a loader started part way into an epoch.
That an interrupted run (a crash between the epoch-end writes, a kill, a preemption) resumes bit-identically is
tests/test_resume_equivalence.py. Tiny models, CPU."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import main_pretrain
from util.checkpoint import (LAST_NAME, NonFiniteStateError, RunCheckpoints, load_checkpoint, load_latest,
                             save_checkpoint, training_state)
from util.logging import dumps_json
from conftest import tiny_demo_eval, tiny_pretrain

ROOT = Path(__file__).resolve().parent.parent
# --debug demo: 64 images, batch 16 -> 4 steps an epoch
TINY = tiny_pretrain("--print_freq", "1", "--warmup_epochs", "1", "--blr", "1e-2", "--seed", "0")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


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


def test_huge_lr_exits_non_zero_and_keeps_the_good_checkpoint(tmp_path, caplog):
    """A real blow-up: a good epoch, then a resume with --blr 1e6 (loss finite, then gradients NaN): the
    command line exits 1 with one line naming the good checkpoint, which stays as it was (the
    same stop for every script with a NaN loss or NaN weights: tests/test_non_finite_runs.py)."""
    out = tmp_path / "run"
    argv = [*TINY, "--epochs", "1", "--output_dir", str(out)]
    main_pretrain.main(argv)
    good = (out / LAST_NAME).read_bytes()
    with caplog.at_level(logging.ERROR, logger="vitfreeze"), pytest.raises(SystemExit) as exc:
        main_pretrain.cli([*argv, "--epochs", "3", "--blr", "1e6", "--max_skipped_steps", "2", "--auto_resume"])
    assert exc.value.code == 1
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert message.startswith("NonFiniteLossError") and "non-finite gradient norm" in message and "epoch 1" in message
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


# ------------------------------------------------------------------------------------------------ 4: preemption
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
    assert "Resume with: python main_pretrain.py --model mae_vit_tiny_patch16" in line
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
    probe = tiny_demo_eval("--batch_size", "32", "--epochs", "3", "--warmup_epochs", "1", "--print_freq", "100",
                           "--cache_features", "--save_every", "2")
    main_linprobe.main([*probe, "--output_dir", str(tmp_path / "probe")])
    assert sorted(p.name for p in (tmp_path / "probe").glob("checkpoint-*.pth")) == [
        "checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-best.pth", "checkpoint-last.pth"]
    main_pretrain.main([*TINY, "--epochs", "3", "--save_every", "2", "--output_dir", str(tmp_path / "pre")])
    assert sorted(p.name for p in (tmp_path / "pre").glob("checkpoint-*.pth")) == [
        "checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-last.pth"]
    with pytest.raises(ValueError, match=r"not a training checkpoint of this script \(no \['best'\]"):
        main_linprobe.main([*probe, "--output_dir", str(tmp_path / "p2"),
                            "--resume", str(tmp_path / "pre" / "checkpoint-last.pth")])
