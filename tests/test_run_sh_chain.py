"""run.sh chains: each task its own data (TASK:key=value), a pretraining's checkpoint handed to the tasks after it,
and a command written for more nodes refused with the NNODES that fits."""
import os
import subprocess

import pytest
import yaml

from test_run_sh import checkout, job, run_sh  # noqa: F401 (fixtures)


def resolved_tasks(stdout: str) -> dict[str, dict]:
    """The dry run's resolved arguments per task: each task's '[run.sh] <command>' line, then its YAML."""
    tasks, current, lines = {}, None, []
    for line in [*stdout.splitlines(), "[run.sh] end"]:
        if line.startswith("[run.sh] ") and (" main_" in line or line == "[run.sh] end"):
            if current:
                data = yaml.safe_load("\n".join(lines))
                tasks[data["output_dir"].rsplit("/", 1)[1]] = data
            current, lines = line, []
        elif current and not line.startswith("[run.sh]"):
            lines.append(line)
    return tasks


def test_each_task_of_a_chain_gets_its_own_data_path(run_sh, job, tmp_path):
    """dBOT's transfer chain passes no --data_path; TASK:data_path=... gives each data set its folder."""
    ckpt = tmp_path / "checkpoint-1600.pth"
    ckpt.write_bytes(b"")
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cars").mkdir()
    res = run_sh(job, "cifar10_cls+cars_cls", "vit_base", "0", str(ckpt), f"cifar10_cls:data_path={tmp_path}/cifar10",
                 f"cars_cls:data_path={tmp_path}/cars", "cars_cls:epochs=7", "--dry_run=config")
    assert res.returncode == 0, res.stderr
    tasks = resolved_tasks(res.stdout)
    assert tasks["cifar10_cls"]["data_path"] == f"{tmp_path}/cifar10" and tasks["cifar10_cls"]["data_set"] == "cifar10"
    assert tasks["cars_cls"]["data_path"] == f"{tmp_path}/cars" and tasks["cars_cls"]["epochs"] == 7
    assert tasks["cifar10_cls"]["epochs"] != 7  # the override is the task's own
    assert tasks["cifar10_cls"]["finetune"] == tasks["cars_cls"]["finetune"] == str(ckpt)


def test_a_probe_after_pretraining_uses_the_pretrainings_checkpoint(run_sh, job):
    res = run_sh(job, "pretrain_demo+linprobe", "tiny", "0", "linprobe:data_set=demo", "--dry_run=config")
    assert res.returncode == 0, res.stderr
    wanted = f"output/{job}/pretrain_demo/checkpoint-last.pth"
    assert f"[run.sh] linprobe: --finetune {wanted} once the chain's pretraining has written it" in res.stdout
    tasks = resolved_tasks(res.stdout)
    assert tasks["pretrain_demo"]["data_path"] == "demo" and tasks["linprobe"]["data_set"] == "demo"


def test_an_explicit_finetune_wins_over_the_chain(run_sh, job, tmp_path):
    (tmp_path / "mine.pth").write_bytes(b"")
    res = run_sh(job, "pretrain_demo+linprobe", "tiny", "0", "linprobe:data_set=demo",
                 f"linprobe:finetune={tmp_path}/mine.pth", "--dry_run=config")
    assert res.returncode == 0, res.stderr
    assert resolved_tasks(res.stdout)["linprobe"]["finetune"] == f"{tmp_path}/mine.pth"
    assert "once the chain's pretraining" not in res.stdout


@pytest.mark.parametrize("task, flags, nodes, accum", [  # dBOT's ViT-H/14 fine-tuning commands, 224 and 448
    ("imagenet_finetune", ["--batch_size", "16", "--accum_iter", "2"], 4, 8),
    ("imagenet_finetune", ["--input_size", "448", "--batch_size", "8", "--accum_iter", "4", "--epochs", "10",
                           "--warmup_epochs", "2"], 4, 16),
])
def test_a_command_for_four_nodes_on_one_says_the_nnodes_that_fits(run_sh, checkout, job, tmp_path, task, flags,
                                                                   nodes, accum):
    res = run_sh(job, task, "vit_huge_patch14", "8", *flags, "--data_path", str(tmp_path))
    assert res.returncode == 2
    # 1024 = batch x accum x processes: 16 x 2 x 32 and 8 x 4 x 32 -> 4 nodes of 8 GPUs, or accum 1024 / (b x 8)
    assert f"NNODES={nodes} ./run.sh" in res.stderr and f"--accum_iter {accum} here" in res.stderr
    assert "pass only one of the two" not in res.stderr
    assert not (checkout / "output" / job).exists()


@pytest.mark.parametrize("args, words", [
    (("knn", "tiny", "0", "nope:data_path=x"), "'nope' is not a task"),
    (("knn", "tiny", "0", "linprobe:data_path=x"), "overrides a task that is not in the chain 'knn'"),
])
def test_a_task_override_for_no_task_of_the_chain_is_refused(run_sh, checkout, job, args, words):
    res = run_sh(job, *args)
    assert res.returncode == 2 and words in res.stderr
    assert not (checkout / "output" / job).exists()


@pytest.mark.slow
def test_a_pretrain_then_probe_chain_runs_end_to_end(checkout, job):
    """One real chain on the demo data (a minute or more on a loaded CPU): the probe loads the checkpoint the
    pretraining wrote."""
    res = subprocess.run(["bash", str(checkout / "run.sh"), job, "pretrain_demo+linprobe", "tiny", "0",
                          "pretrain_demo:epochs=1", "pretrain_demo:--debug", "linprobe:data_set=demo",
                          "linprobe:epochs=1", "linprobe:warmup_epochs=0", "linprobe:batch_size=64",
                          "linprobe:eff_batch_size=64", "linprobe:input_size=64"],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert (checkout / "output" / job / "pretrain_demo" / "checkpoint-last.pth").is_file()
    command = next((checkout / "output" / job / "linprobe" / "records").iterdir()) / "command.txt"
    assert f"--finetune output/{job}/pretrain_demo/checkpoint-last.pth" in command.read_text()
    log = (checkout / "output" / job / "linprobe" / "cli_logs.txt").read_text()
    assert f"output/{job}/pretrain_demo/checkpoint-last.pth" in log
