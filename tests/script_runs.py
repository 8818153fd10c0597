"""Helper of the end-to-end tests of the five training scripts (imported by test modules, like spawn_ranks.py): tiny
runs of each (:data:`SCRIPTS`: argv, optimizer steps per epoch, the fixture that makes its data) and a hook into the
run driver that acts at a chosen optimizer step (:func:`at_step`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import engine.finetune
import engine.run
import main_detect
import main_finetune
import main_linprobe
import main_pretrain
import main_segment
from conftest import tiny_demo_eval, tiny_finetune, tiny_pretrain


@dataclasses.dataclass(frozen=True)
class Script:
    module: object
    steps_per_epoch: int
    argv: object  # argv(data, out, *extra)
    data: str = ""  # the fixture that makes its data, if any
    runs_in: object = None  # the module whose ``fit`` the run calls, when not ``module`` (fine-tuning's folds)

    @property
    def name(self) -> str:
        return self.module.__name__


def pretrain_argv(data, out, *extra):
    # demo --debug: 64 images, batch 16 -> 4 steps an epoch, 4 epochs; FreezeOut (linear t_0 0.5): units freeze
    # from step 10 on, so the epoch-3 cuts resume mid-freezing
    return tiny_pretrain("--epochs", "4", "--warmup_epochs", "1", "--blr", "1e-2", "--seed", "3", "--print_freq", "1",
                         "--freezeout", "--how_scale", "linear", "--t_0", "0.5", "--output_dir", str(out), *extra,
                         model="MIM_vit_tiny_patch16")


def finetune_argv(data, out, *extra):
    # 32 train images, batch 8 -> 4 steps an epoch; 3 epochs; numbered checkpoints every 2 epochs and at the end;
    # mixup / cutmix and drop path draw from the per-rank random state
    return tiny_finetune(data, out, "--batch_size", "8", "--print_freq", "1", "--warmup_epochs", "1", "--epochs", "3",
                         "--save_every", "2", "--blr", "5e-3", "--seed", "1", "--mixup", "0.8", "--cutmix", "1.0",
                         "--drop_path", "0.1", *extra)


def linprobe_argv(data, out, *extra):
    # the demo set at 32 px (small_demo: 128 images), batch 32 -> 4 steps an epoch; cached features
    return tiny_demo_eval("--batch_size", "32", "--epochs", "3", "--warmup_epochs", "1", "--print_freq", "1",
                          "--cache_features", "--save_every", "1", "--output_dir", str(out), *extra)


def segment_argv(data, out, *extra):
    # 16 images / batch 4 = 4 steps an epoch; --max_iters 10: epochs of 4, 4 and 2 steps (the last one cut short)
    return ["--config", "configs/segment/demo.yaml", "--data_path", str(data), "--output_dir", str(out),
            "--batch_size", "4", "--max_iters", "10", "--warmup_iters", "3", "--eval_interval", "100",
            "--vis_images", "0", "--print_freq", "1", "--drop_path", "0.1", "--seed", "3", *extra]


def detect_argv(data, out, *extra):
    # 8 scenes / batch 2 = 4 steps an epoch, 2 epochs; evaluation only after the last epoch
    return ["--config", "configs/detect/demo.yaml", "--output_dir", str(out), "--input_size", "64",
            "--scene_images", "8", "2", "--epochs", "2", "--batch_size", "2", "--rois_per_image", "32",
            "--proposals_per_image", "100", "--anchor_sizes", "4", "8", "16", "32", "64", "--eval_every", "2",
            "--vis_every", "0", "--print_freq", "1", "--lr_steps", "1", "--warmup_iters", "2", *extra]


SCRIPTS = {
    "pretrain": Script(main_pretrain, 4, pretrain_argv),
    "finetune": Script(main_finetune, 4, finetune_argv, data="ft_folder", runs_in=engine.finetune),
    "linprobe": Script(main_linprobe, 4, linprobe_argv),
    "segment": Script(main_segment, 4, segment_argv, data="seg_scenes"),
    "detect": Script(main_detect, 4, detect_argv),
}


def at_step(monkeypatch, script: Script, step: int, action: Callable[..., Any]) -> None:
    """``action(model)`` runs at optimizer step ``step`` of ``script``'s next run, just before that step's forward
    (the script's step function is wrapped inside ``engine.run.fit``); ``model`` is what its checkpoints hold."""
    def fit(task, *args, **kwargs):
        def wrapped(batch, index):
            if index == step:
                action(kwargs["model"])
            return task.step(batch, index)
        return engine.run.fit(dataclasses.replace(task, step=wrapped), *args, **kwargs)
    monkeypatch.setattr(script.runs_in or script.module, "fit", fit)


def after_step(monkeypatch, script: Script, first: int, change: Callable[..., Any]) -> None:
    """``change(model, output)`` runs after the forward of every optimizer step from ``first`` on (it may change
    the step's output, e.g. make the loss NaN, or the weights)."""
    def fit(task, *args, **kwargs):
        def wrapped(batch, index):
            output = task.step(batch, index)
            if index >= first:
                change(kwargs["model"], output)
            return output
        return engine.run.fit(dataclasses.replace(task, step=wrapped), *args, **kwargs)
    monkeypatch.setattr(script.runs_in or script.module, "fit", fit)
