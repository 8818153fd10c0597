"""``--dry_run`` is a pre-flight (util/preflight.py): each entry script builds what its run builds (datasets, the
model on the meta device, the checkpoint loaded against it, the schedule), writes nothing, and either ends with one
``dry run OK`` line or fails with the error the run itself gives. Tiny data, tiny checkpoints, one process."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import engine.finetune
import main_detect
import main_finetune
import main_knn
import main_linprobe
import main_pretrain
import main_segment
import models
from util.data.scenes import write_ade20k, write_coco

CLASSIFIERS = {"finetune": main_finetune, "linprobe": main_linprobe, "knn": main_knn}
TINY = {"finetune": ["--input_size", "32", "--batch_size", "2", "--epochs", "2", "--warmup_epochs", "1",
                     "--num_workers", "0"],
        "linprobe": ["--input_size", "32", "--batch_size", "2", "--epochs", "2", "--warmup_epochs", "1",
                     "--num_workers", "0"],
        "knn": ["--input_size", "32", "--batch_size", "2", "--num_workers", "0", "--nb_knn", "2"]}


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """A 3-class ImageFolder (train/ and val/), an empty folder, and two ViT checkpoints: ViT-Ti and ViT-S."""
    root = tmp_path_factory.mktemp("dry_run")
    for split in ("train", "val"):
        for c in range(3):
            (root / "data" / split / f"c{c}").mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (70 * c, 40 * i, 90)).save(root / "data" / split / f"c{c}" / f"{i}.png")
    (root / "empty").mkdir()
    for name in ("vit_tiny_patch16", "vit_small_patch16"):
        with torch.device("meta"):
            shapes = models.create_model(name, img_size=32, num_classes=0).state_dict()
        torch.save({"model": {k: torch.zeros(v.shape) for k, v in shapes.items()}}, root / f"{name}.pth")
    write_ade20k(root / "ade", 4, 2, 32, seed=0, class_colours=True)
    write_coco(root / "coco", 4, 2, 64, seed=0, style="demo")
    return root


def outputs(root: Path) -> Path:
    out = root / "out"
    shutil.rmtree(out, ignore_errors=True)
    return out


def error_of(script, argv) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as caught:
        script.main(argv)
    return str(caught.value)


# --------------------------------------------------------------------------------- classification: the four cases
@pytest.mark.parametrize("task", CLASSIFIERS)
@pytest.mark.parametrize("argv, words", [
    pytest.param(["--data_path", "{root}"], "{root}/train' does not exist", id="no train folder"),
    pytest.param(["--data_path", "{root}/data", "--nb_classes", "1000"], "--nb_classes 1000 does not match the data",
                 id="more classes than the data"),
    pytest.param(["--data_path", "{root}/data", "--finetune", "{root}/vit_small_patch16.pth"],
                 "shapes differ from the model: the checkpoint holds a ViT of depth 12, width 384",
                 id="checkpoint of another ViT"),
    pytest.param(["--data_set", "cifar10", "--data_path", "{root}/empty"], "cifar10 folder not found",
                 id="empty CIFAR folder"),
])
def test_a_classification_dry_run_fails_as_the_run_fails(places, task, argv, words, one_thread):
    out = outputs(places)
    argv = [a.replace("{root}", str(places)) for a in argv] + TINY[task] + [
        "--model", "vit_tiny_patch16", "--output_dir", str(out)]
    said = error_of(CLASSIFIERS[task], [*argv, "--dry_run"])
    assert words.replace("{root}", str(places)) in said
    assert not out.exists()  # a dry run writes nothing
    assert error_of(CLASSIFIERS[task], argv) == said  # the run stops with the very same words


@pytest.mark.parametrize("task", CLASSIFIERS)
def test_a_classification_dry_run_that_passes_says_what_the_run_would_do(places, task, one_thread, caplog):
    out = outputs(places)
    facts = CLASSIFIERS[task].main(["--data_path", str(places / "data"), "--finetune",
                                    str(places / "vit_tiny_patch16.pth"), "--model", "vit_tiny_patch16",
                                    "--output_dir", str(out), *TINY[task], "--dry_run"])
    assert not out.exists()
    assert "train: 6 images, 3 classes" in facts["data"] and "val: 6 images, 3 classes" in facts["data"]
    assert facts["model"].startswith("vit_tiny_patch16 (")  # and its parameter count
    assert "vit_tiny_patch16.pth" in facts["checkpoint"]
    if task == "knn":
        assert facts["classes"] == 3
    else:  # 6 images / batch 2 = 3 steps an epoch, 2 epochs; lr = blr x 2 / 256
        blr = {"finetune": 1e-3, "linprobe": 0.1}[task]
        assert facts["steps"] == "6 (2 epochs of 3)"
        assert float(facts["lr" if task == "finetune" else "lrs"]) == pytest.approx(blr * 2 / 256, rel=1e-2)
        missing = "head.bias, head.weight" if task == "finetune" else "none"
        assert f"missing (kept initial, expected): {'fc_norm.bias, fc_norm.weight, ' * (task == 'finetune')}" \
               f"{missing}" in facts["checkpoint"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dry run OK: ")]
    assert len(lines) == 1 and f"model: {facts['model']}" in lines[0]


def test_the_models_are_built_on_the_meta_device(places, monkeypatch, one_thread):
    """A ViT-H of 632M parameters costs nothing: the dry run builds on the meta device."""
    seen = []
    real = engine.finetune.build_model
    monkeypatch.setattr(engine.finetune, "build_model", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    facts = main_finetune.main(["--data_path", str(places / "data"), "--model", "vit_huge_patch14",
                                "--output_dir", str(outputs(places)), *TINY["finetune"], "--input_size", "224",
                                "--dry_run"])
    width, depth, patch, tokens = 1280, 32, 14, (224 // 14) ** 2 + 1  # ViT-H/14 (Dosovitskiy et al., 2021)
    block = 4 * width * width + 4 * width + 2 * (4 * width * width) + 4 * width + width + 4 * width  # attn, MLP, norms
    params = depth * block + 3 * patch * patch * width + width + width + tokens * width + 2 * width + 3 * width + 3
    assert facts["model"] == f"vit_huge_patch14 ({params / 1e6:.2f}M parameters trained)"
    assert {p.device.type for p in seen[0].parameters()} == {"meta"}
    assert torch.empty(1).device.type == "cpu"  # the default device is back


# ------------------------------------------------------------------------------------------------------ pretraining
def pretrain_argv(places: Path, *extra: str) -> list[str]:
    return ["--model", "MIM_vit_tiny_patch16", "--input_size", "32", "--batch_size", "2", "--epochs", "2",
            "--warmup_epochs", "1", "--num_workers", "0", "--output_dir", str(outputs(places)), *extra]


def test_a_pretraining_dry_run_checks_data_and_resume_checkpoint(places, tmp_path, one_thread):
    said = error_of(main_pretrain, pretrain_argv(places, "--data_path", str(places / "empty"), "--dry_run"))
    assert "no image files found" in said
    with torch.device("meta"):  # a LocalMIM ViT-S checkpoint to resume a ViT-Ti run from
        shapes = models.create_model("MIM_vit_small_patch16", img_size=32).state_dict()
    torch.save({"model": {k: torch.zeros(v.shape) for k, v in shapes.items()}, "optimizer": {}, "epoch": 0},
               tmp_path / "small.pth")
    said = error_of(main_pretrain, pretrain_argv(places, "--data_path", str(places / "data"), "--resume",
                                                 str(tmp_path / "small.pth"), "--dry_run"))
    assert "does not match the model" in said and "width 384" in said
    facts = main_pretrain.main(pretrain_argv(places, "--data_path", str(places / "data"), "--dry_run"))
    assert facts["data"] == "/".join([str(places), "data", "train"]) + ": 6 images, 3 classes"
    assert facts["steps"] == "6 (2 epochs of 3)" and not (places / "out").exists()


# ------------------------------------------------------------------------------------------- segmentation, detection
def segment_argv(places: Path, data: Path, *extra: str) -> list[str]:
    return ["--config", "configs/segment/demo.yaml", "--data_path", str(data), "--input_size", "32",
            "--batch_size", "2", "--max_iters", "4", "--num_workers", "0", "--output_dir", str(outputs(places)),
            *extra]


def detect_argv(places: Path, data: Path, *extra: str) -> list[str]:
    return ["--config", "configs/detect/demo.yaml", "--data_path", str(data), "--input_size", "64",
            "--batch_size", "2", "--epochs", "2", "--num_workers", "0", "--output_dir", str(outputs(places)), *extra]


@pytest.mark.parametrize("script, argv, data", [(main_segment, segment_argv, "ade"),
                                                (main_detect, detect_argv, "coco")])
def test_a_dense_dry_run_checks_layout_and_checkpoint(places, script, argv, data, one_thread):
    missing = error_of(script, argv(places, places / "empty", "--dry_run"))
    assert ("expected the ADE20K layout" in missing) if script is main_segment else \
        ("instances_train2017.json" in missing)
    tiny = places / "vit_tiny_patch16.pth"
    wrong = error_of(script, argv(places, places / data, "--finetune", str(places / "vit_small_patch16.pth"),
                                  "--dry_run"))
    assert "vit_small_patch16.pth" in wrong and "384" in wrong
    assert error_of(script, argv(places, places / data, "--finetune", str(places / "vit_small_patch16.pth"))) == wrong
    facts = script.main(argv(places, places / data, "--finetune", str(tiny), "--dry_run"))
    assert str(tiny) in facts["checkpoint"] and not (places / "out").exists()
    assert facts["data"].count("images") == 2  # both splits


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_run_on_a_machine_without_cuda_is_one_line_and_its_dry_run_warns(places, caplog, one_thread):
    argv = pretrain_argv(places, "--data_path", str(places / "data"), "--device", "cuda")
    assert error_of(main_pretrain, argv).startswith("--device cuda: this machine has no usable CUDA device")
    facts = main_pretrain.main([*argv, "--dry_run"])  # a login node checks a GPU job: the rest is still checked
    assert facts["steps"] == "6 (2 epochs of 3)"
    assert any("the run needs one" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
