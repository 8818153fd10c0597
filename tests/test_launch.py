"""submitit launching: option checks, and a preempted job that requeues itself and resumes (local executor)."""
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import main_pretrain
from util.checkpoint import load_checkpoint
from util import launch
from util.launch import strip_launch_args
from conftest import tiny_pretrain

ARGS = tiny_pretrain("--epochs", "3", "--warmup_epochs", "1", "--seed", "5", "--blr", "1e-2")


def test_slurm_option_without_launcher_is_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main([*ARGS, "--partition", "learnfair"])
    assert exc.value.code == 2 and "--partition only apply with --launcher slurm" in capsys.readouterr().err


def test_strip_launch_args():
    argv = ["--launcher", "slurm", "--nodes", "2", "--ngpus=4", "--use_volta32", "--epochs", "3", "--job_dir", "x"]
    assert strip_launch_args(argv) == ["--epochs", "3"]


def test_preempted_job_requeues_and_resumes_to_the_same_result(tmp_path, monkeypatch):
    main_pretrain.main([*ARGS, "--output_dir", str(tmp_path / "plain")])
    for path in (tmp_path / "plain").glob("checkpoint-[0-9]*.pth"):  # only checkpoint-last.pth is compared
        path.unlink()
    jobs = []
    real_submit = launch.submit
    monkeypatch.setattr(launch, "submit", lambda *a, **k: jobs.append(real_submit(*a, **k)) or jobs[-1])
    out = tmp_path / "job"
    main_pretrain.main([*ARGS, "--epochs", "3", "--output_dir", str(out), "--launcher", "local", "--timeout", "10",
                        "--job_dir", str(tmp_path / "logs"), "--save_every", "1"])
    job = jobs[0]
    deadline = time.time() + 600
    while not (out / "checkpoint-0.pth").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (out / "checkpoint-0.pth").exists(), job.stderr()
    # SLURM's preemption signal (USR2) to the task; submitit's local controller would only send it near time-out
    pid = job._process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert children, "the local job has no running task"
    for child in children:
        os.kill(int(child), signal.SIGUSR2)
    job.result()  # waits for the requeued job; raises if it failed
    text = "\n".join(p.read_text() for p in (tmp_path / "logs").rglob("*_log.*"))
    assert "requeued to resume" in text and "resumed from" in text, text[-3000:]
    final = load_checkpoint(out / "checkpoint-last.pth")
    plain = load_checkpoint(tmp_path / "plain" / "checkpoint-last.pth")
    assert final["epoch"] == 2
    for key, value in plain["model"].items():
        assert torch.equal(value, final["model"][key]), key


@pytest.mark.parametrize("script", ["main_finetune", "main_linprobe", "main_knn"])
def test_every_entry_script_takes_the_launch_options(script, capsys):
    module = __import__(script)
    options = {opt for action in module.build_parser()._actions for opt in action.option_strings}
    assert {"--launcher", "--nodes", "--ngpus", "--partition", "--timeout", "--job_dir", "--comment",
            "--use_volta32", "--exclude"} <= options
    with pytest.raises(SystemExit) as exc:
        module.main(["--nodes", "2"])
    assert exc.value.code == 2 and "--nodes only apply with --launcher slurm" in capsys.readouterr().err
