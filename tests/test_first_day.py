"""A new user's first commands: an error is one line, said once per job; a checkpoint of another model says which
model it holds; SLURM missing says how to run locally; ``--help`` shows the defaults."""
import logging

import pytest
import torch

import main_finetune
import main_pretrain
import submitit_finetune
import models
from models.backbone import load_pretrained
from models.registry import checkpoint_vs_model, describe_checkpoint
from util import runtime
from util.checkpoint import load_model_state
from conftest import tiny_pretrain

TINY = tiny_pretrain()


def exit_of(fn, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exc:
        fn()
    return exc.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("argv, words", [
    (["--epochs", "3"], "--warmup_epochs 40 (the default) is larger than --epochs 3"),  # a bad value
    (["--resume", "{tmp}/gone.pth", "--dry_run"], "--resume {tmp}/gone.pth does not exist"),  # a wrong path
    (["--config", "{tmp}/nope.yaml"], "config file not found: {tmp}/nope.yaml"),  # a missing recipe
    (["--config", "{tmp}/typo.yaml"], "unknown key 'epoch' in {tmp}/typo.yaml (did you mean epochs"),
])
def test_an_error_after_parsing_is_one_line_without_the_usage_block(argv, words, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("RANK", raising=False)
    (tmp_path / "typo.yaml").write_text("epoch: 3\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, lines = exit_of(lambda: main_pretrain.main([*TINY, *argv]), capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")  # no usage block above it
    assert words.replace("{tmp}", str(tmp_path)) in lines[0]


def test_under_torchrun_only_rank_0_says_the_error(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    said = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        said[rank] = exit_of(lambda: main_pretrain.main([*TINY, "--epochs", "3"]), capsys)
    assert said["0"][0] == said["1"][0] == 2
    assert len(said["0"][1]) == 1 and said["1"][1] == []


def test_run_cli_logs_a_run_error_on_rank_0_only(caplog, monkeypatch):
    def failing():
        raise ValueError("--output_dir x is a file")
    for rank, logged in (("0", True), ("3", False)):
        monkeypatch.setenv("RANK", rank)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="vitfreeze"), pytest.raises(SystemExit) as exc:
            runtime.run_cli(failing)
        assert exc.value.code == 1
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert bool(errors) == logged and any("is a file" in r.getMessage() for r in caplog.records)


def test_an_unknown_model_stops_before_the_data_is_read(capsys, monkeypatch, tmp_path):
    def started(*args, **kwargs):
        raise AssertionError("the run started before the model name was checked")
    monkeypatch.setattr(main_finetune, "setup_run", started)
    code, lines = exit_of(lambda: main_finetune.main(["--data_path", str(tmp_path), "--model", "vit_bsae_patch16"]),
                          capsys)
    assert code == 2 and len(lines) == 1 and "did you mean vit_base_patch16" in lines[0]


# MAE's models_vit.py: (depth, width, patch) of ViT-B/16, ViT-L/16, ViT-H/14 (github.com/facebookresearch/mae)
@pytest.mark.parametrize("name, img, words", [
    ("vit_base_patch16", 224, "a ViT of depth 12, width 768, patch 16, image 224 (vit_base_patch16)"),
    ("vit_large_patch16", 224, "a ViT of depth 24, width 1024, patch 16, image 224 (vit_large_patch16)"),
    ("vit_huge_patch14", 448, "a ViT of depth 32, width 1280, patch 14, image 448 (vit_huge_patch14)"),
    ("mae_vit_base_patch16", 224, "a ViT of depth 12, width 768, patch 16, image 224 (vit_base_patch16)"),
])
def test_describe_checkpoint_reads_the_architecture_from_the_tensors(name, img, words):
    with torch.device("meta"):
        state = models.create_model(name, img_size=img).state_dict()
    assert describe_checkpoint({f"module.{k}": v for k, v in state.items()}) == words
    assert describe_checkpoint({"fc.weight": torch.zeros(2, 2)}).startswith("no ViT")


def test_a_checkpoint_of_another_model_is_one_line_naming_it():
    tiny = models.create_model("vit_tiny_patch16", img_size=32).state_dict()
    small = models.create_model("vit_small_patch16", img_size=32)
    for load in (lambda: load_pretrained(small, tiny, source="pre.pth"),
                 lambda: load_model_state(small, tiny, source="pre.pth", describe=checkpoint_vs_model)):
        with pytest.raises(ValueError) as err:
            load()
        message = str(err.value)
        assert "\n" not in message and len(message) < 700
        assert "holds a ViT of depth 12, width 192, patch 16, image 32 (vit_tiny_patch16)" in message
        assert "the model is a ViT of depth 12, width 384" in message and "(+148 more)" in message


def test_slurm_missing_is_one_line_that_says_how_to_run_here(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    monkeypatch.delenv("RANK", raising=False)
    code, lines = exit_of(lambda: runtime.run_cli(lambda: submitit_finetune.main(
        ["--data_path", str(tmp_path), "--model", "vit_tiny_patch16", "--output_dir", str(tmp_path / "o")])), capsys)
    assert code == 2 and len(lines) == 1
    assert "SLURM was not found (no sbatch on PATH)" in lines[0] and "--launcher local" in lines[0]
    assert "torchrun" in lines[0]


def test_help_shows_each_default_once():
    text = " ".join(main_pretrain.build_parser().format_help().split())
    assert "--epochs EPOCHS default: 400" in text  # a flag without help text
    assert "lr = blr * effective batch / 256 (default: 0.00015)" in text
    assert "(default: <output_dir>/tensorboard)" in text and "<output_dir>/tensorboard) (default" not in text
    assert "--auto_resume resume from the latest checkpoint in output_dir " in text  # a switch: nothing added


def test_a_64px_export_keeps_the_umask_and_says_its_img_size(tmp_path, capsys):
    import importlib
    import os

    import timm
    from safetensors import safe_open

    export_timm = importlib.import_module("tools.export_timm")  # tools/ is a folder of scripts, not a package
    model = models.create_model("vit_tiny_patch16", img_size=64, depth=1)
    torch.save({"model": model.state_dict()}, tmp_path / "ck.pth")
    old = os.umask(0o027)
    try:
        assert export_timm.main(["--input", str(tmp_path / "ck.pth"), "--output", str(tmp_path / "v.safetensors"),
                                 "--no_head"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "v.safetensors").stat().st_mode & 0o777 == 0o640  # 0o666 less the umask, as other outputs
    with safe_open(str(tmp_path / "v.safetensors"), framework="pt") as handle:
        img_size = int(handle.metadata()["img_size"])
    assert img_size == 64 and "img_size=64" in capsys.readouterr().out
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1, img_size=img_size)
    timm.models.load_checkpoint(timm_model, str(tmp_path / "v.safetensors"), strict=True)


def test_pictures_are_on_by_default_with_the_checkpoints():
    from util.args import parse_args
    pretrain = parse_args(main_pretrain.build_parser(), ["--data_path", "demo"])
    assert pretrain.vis_every == pretrain.save_every == 20  # a reconstruction every 20 epochs (and after the last)
    import main_detect
    assert parse_args(main_detect.build_parser(), []).vis_every == 4  # detections with each kept checkpoint


def test_argparse_errors_are_said_by_rank_0_only(capsys, monkeypatch):
    from util.args import parse_args
    monkeypatch.setenv("WORLD_SIZE", "2")
    said = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        said[rank] = exit_of(lambda: parse_args(main_pretrain.build_parser(), ["--batch_size", "0"]), capsys)
    assert said["0"][0] == said["1"][0] == 2
    assert "--batch_size" in said["0"][1][-1] and said["1"][1] == []
