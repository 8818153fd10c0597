"""run.sh: task table, argument mapping and refusals (dry runs only: nothing trains)."""
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def run_sh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "run.sh"), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def job():
    name = f"test_{uuid.uuid4().hex[:8]}"
    yield name
    shutil.rmtree(ROOT / "output" / name, ignore_errors=True)


def test_help_lists_tasks():
    res = run_sh("--help")
    assert res.returncode == 0
    for task in ("pretrain_demo", "pretrain_localmim_vit_base_freezeout_cubic_t0.8_100e", "imagenet_finetune",
                 "linprobe", "knn", "cifar10_cls", "hyperkvasir_cls"):
        assert task in res.stdout


def test_refusals(job):
    for args, msg in [((job, "nope", "base", "0"), "unknown task 'nope'"),
                      ((job, "pretrain_demo+ade20kv_seg", "base", "0"), "not supported yet"),
                      ((job, "pretrain_demo", "base"), "expected JOB_NAME TASK MODEL NGPUS"),
                      ((job, "pretrain_demo", "base", "two"), "NGPUS must be a number")]:
        res = run_sh(*args)
        assert res.returncode == 2 and msg in res.stderr, (args, res.stderr)
    assert not (ROOT / "output" / job).exists()  # nothing started


def test_pretrain_dry_run_maps_arguments(job):
    res = run_sh(job, "pretrain_demo", "small", "0", "epochs=3", "--dry_run")
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout[res.stdout.index("\n") + 1:])  # first line echoes the command
    assert resolved["model"] == "MIM_vit_small_patch16"  # the demo recipe is LocalMIM and resolved["epochs"] == 3
    assert resolved["output_dir"] == f"output/{job}/pretrain_demo" and resolved["auto_resume"] is True
    assert resolved["input_size"] == 64  # from the recipe


def test_checkpoint_goes_to_finetune_for_transfer_tasks(job):
    res = run_sh(job, "linprobe", "vit_tiny_patch16", "0", "/some/ckpt.pth", "--dry_run")
    assert res.returncode == 0, res.stderr
    assert "--finetune /some/ckpt.pth" in res.stdout.splitlines()[0]


def test_a_chain_is_checked_before_anything_starts(job):
    """3 GPUs cannot keep the LocalMIM recipe's effective batch 2048 (256 per GPU): refused up front, even though
    the first task of the chain (the demo) would run."""
    res = run_sh(job, "pretrain_demo+pretrain_localmim_vit_base_100e", "base", "3")
    assert res.returncode == 2
    assert "effective batch 2048 is not a multiple of batch_size 256 x 3 processes" in res.stderr
    assert "task 'pretrain_localmim_vit_base_100e' does not resolve on 3 process(es)" in res.stderr
    assert "usage:" not in res.stderr  # the one line that matters, not argparse's usage block
    assert not (ROOT / "output" / job).exists()


def test_each_task_is_recorded(job):
    res = run_sh(job, "knn", "vit_tiny_patch16", "0", "--data_set", "demo", "--dry_run")
    assert res.returncode == 0, res.stderr
    (record,) = (ROOT / "output" / job / "knn" / "records").iterdir()
    command = (record / "command.txt").read_text()
    assert "command: python main_knn.py --config configs/knn/imagenet_vit_base.yaml" in command
    assert "exit status: 0" in command and "git: " in command
    assert yaml.safe_load((record / "output.log").read_text())["data_set"] == "demo"  # what it printed


def test_record_sh_keeps_command_output_and_exit_status(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "record.sh"), "GREETING=hello world", "sh", "-c",
                          "echo $GREETING; echo oops >&2; exit 3"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 3 and "hello world" in res.stdout
    (record,) = (tmp_path / "records").iterdir()
    assert (record / "output.log").read_text().split() == ["hello", "world", "oops"]  # stdout and stderr
    command = (record / "command.txt").read_text()
    assert "command: GREETING=hello\\ world sh -c" in command and "exit status: 3" in command
    assert "git: none" in command  # tmp_path is not a git checkout


@pytest.mark.parametrize("extra, env", [(["launcher=slurm", "--partition", "p"], {}), ([], {"NNODES": "2"})])
def test_slurm_goes_through_submitit_not_torchrun(job, extra, env):
    res = run_sh(job, "imagenet_finetune", "base", "4", *extra, "--dry_run", env=env)
    assert res.returncode == 0, res.stderr
    command = res.stdout.splitlines()[0]
    assert command.startswith("[run.sh] python main_finetune.py") and "torchrun" not in command
    resolved = yaml.safe_load(res.stdout[res.stdout.index("\n") + 1:])
    nodes = int(env.get("NNODES", 1))
    assert (resolved["launcher"], resolved["nodes"], resolved["ngpus"]) == ("slurm", nodes, 4)
    assert resolved["accum_iter"] == 1024 // (32 * 4 * nodes)  # the recipe's effective batch on nodes x 4 GPUs


def test_dbot_detection_seed_maps_mm_overrides(job):
    """dBOT's COCO command as written (seed 000), on CPU: the mm-style keys become our flags."""
    res = run_sh(job, "cascade_coco_det", "vit_base", "0", "dbot_base_pre/checkpoint-1600.pth",
                 "data.samples_per_gpu=2", "lr_config.step=8,11", "runner.max_epochs=12",
                 "optimizer.paramwise_cfg.layer_decay_rate=0.75", "--dry_run")
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout[res.stdout.index("\n") + 1:])
    assert resolved["model"] == "vit_base_patch16" and resolved["detector"] == "cascade_mask_rcnn"
    assert (resolved["batch_size"], resolved["lr_steps"], resolved["epochs"], resolved["layer_decay"]) == \
        (2, [8, 11], 12, 0.75)
    assert resolved["finetune"] == "dbot_base_pre/checkpoint-1600.pth"
    assert resolved["accum_iter"] == 8  # effective batch 16 = 2 x 8 GPUs, kept on one process


def test_segmentation_style_overrides_and_model_forms(job):
    res = run_sh(job, "mask_rcnn_coco_det", "large", "0", "optimizer_config.use_fp16=True", "optimizer.lr=3e-5",
                 "model.backbone.drop_path_rate=0.2", "--deterministic", "--dry_run")
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout[res.stdout.index("\n") + 1:])
    assert resolved["model"] == "vit_large_patch16" and resolved["amp"] == "fp16"
    assert resolved["lr"] == 3e-5 and resolved["drop_path"] == 0.2 and resolved["deterministic"] is True


def test_unknown_mm_override_is_an_error_naming_it(job):
    res = run_sh(job, "cascade_coco_det", "base", "0", "optimizer.momentum=0.9")
    assert res.returncode == 2 and "unknown override 'optimizer.momentum'" in res.stderr
    assert not (ROOT / "output" / job).exists()
