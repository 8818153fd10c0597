"""The command line the users' commands rely on: any FreezeOut flag (or recipe key) turns FreezeOut on, DeiT's
hyphenated and no-op spellings, foreign flags stop with one line, unknown flags get a suggestion, and bad values and
paths are refused before anything runs."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

import main_finetune
import main_knn
import main_linprobe
import main_pretrain
from util.args import FREEZEOUT_FLAGS, parse_args

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("flags", [["--how_scale", "cubic"], ["--t_0", "0.8"], ["--all_stages"],
                                   ["--dont_freeze_pe"], ["--not_scale_lr"], ["--non_layerwise_lr"], ["--t_0=0.85"]])
def test_any_freezeout_flag_turns_freezeout_on(flags, caplog):
    with caplog.at_level(logging.WARNING, logger="vitfreeze"):
        args = parse_args(main_pretrain.build_parser(), flags)
    assert args.freezeout is True
    assert any("FreezeOut on" in r.getMessage() and flags[0].split("=")[0] in r.getMessage() for r in caplog.records)


def test_default_values_given_explicitly_still_count():
    """--how_scale cubic and --t_0 0.8 are the defaults: detection is by presence, not by comparing values."""
    args = parse_args(main_pretrain.build_parser(), ["--how_scale", "cubic", "--t_0", "0.8"])
    assert args.freezeout and args.t_0 == 0.8


def test_no_freezeout_flag_leaves_it_off(caplog):
    with caplog.at_level(logging.WARNING, logger="vitfreeze"):
        args = parse_args(main_pretrain.build_parser(),
                          ["--epochs", "3", "--warmup_epochs", "1", "--model", "MIM_vit_tiny_patch16"])
    assert args.freezeout is False and not any("FreezeOut" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("key", FREEZEOUT_FLAGS)
def test_freezeout_key_in_a_recipe_turns_it_on(key, tmp_path):
    value = {"how_scale": "linear", "t_0": 0.5}.get(key, True)
    (tmp_path / "r.yaml").write_text(f"{key}: {str(value).lower() if value is True else value}\n")
    args = parse_args(main_pretrain.build_parser(), ["--config", str(tmp_path / "r.yaml")])
    assert args.freezeout is True


def test_a_recipe_contradicting_itself_is_an_error(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("freezeout: false\nt_0: 0.5\n")
    with pytest.raises(SystemExit) as exc:
        parse_args(main_pretrain.build_parser(), ["--config", str(tmp_path / "r.yaml")])
    assert exc.value.code == 2 and "freezeout: false" in capsys.readouterr().err


def test_finetune_freezeout_flag_turns_it_on():
    args = parse_args(main_finetune.build_parser(), ["--how_scale", "linear"])
    assert args.freezeout is True



def test_hyphenated_spellings_are_ours():
    argv = "--batch-size 128 --weight-decay 0.1 --no-pin-mem --warmup-epochs 3 --data-set cifar100 --drop-path 0.2"
    args = parse_args(main_finetune.build_parser(), argv.split())
    assert (args.batch_size, args.weight_decay, args.pin_mem, args.warmup_epochs, args.data_set, args.drop_path) == \
        (128, 0.1, False, 3, "cifar100", 0.2)
    assert parse_args(main_finetune.build_parser(), ["--data-path=/x"]).data_path == "/x"


def test_deit_no_op_flags_are_accepted(caplog):
    with caplog.at_level(logging.WARNING, logger="vitfreeze"):
        args = parse_args(main_finetune.build_parser(), ["--no-repeated-aug", "--eval-freq", "10", "--epochs", "4",
                                                                 "--warmup-epochs", "1"])
    assert args.epochs == 4
    assert any("--eval-freq ignored" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("flag, words", [("--model-ema", "EMA"), ("--opt", "optimizer is fixed"),
                                         ("--teacher-model", "distillation"), ("--repeated-aug", "repeated")])
def test_foreign_flag_stops_with_one_line(flag, words, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(main_finetune.build_parser(), [flag, "x"] if flag in ("--opt", "--teacher-model") else [flag])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and flag in err and words in err


@pytest.mark.parametrize("flag, suggestion", [("--epoch", "--epochs"), ("--mask-ration", "--mask_ratio"),
                                              ("--warmup_epoch", "--warmup_epochs")])
def test_unknown_flag_gets_did_you_mean(flag, suggestion, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(main_pretrain.build_parser(), [flag, "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"unrecognized argument {flag}" in err and suggestion in err.split("did you mean")[1]



def error_of(script, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("script, argv, words", [
    (main_pretrain, ["--data_path", "demo", "--epochs", "3", "--warmup_epochs", "30"],
     "--warmup_epochs 30 is larger than --epochs 3"),
    (main_pretrain, ["--data_path", "demo", "--epochs", "3"],
     "--warmup_epochs 40 (the default) is larger than --epochs 3"),
    (main_finetune, ["--config", str(ROOT / "configs/finetune/mae_vit_base.yaml"), "--epochs", "3"],
     "--warmup_epochs 5 (from the recipe) is larger than --epochs 3"),
    (main_linprobe, ["--data_set", "demo", "--epochs", "2"],
     "--warmup_epochs 10 (the default) is larger than --epochs 2"),
])
def test_warmup_longer_than_the_run_is_said_in_the_flags_words(script, argv, words, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert words in error_of(script, argv, capsys)


def test_no_arguments_does_not_start_a_run(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    err = error_of(main_pretrain, [], capsys)
    assert "--data_path" in err and "configs/pretrain/demo.yaml" in err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("script, argv, words", [
    (main_pretrain, ["--data_path", "{tmp}/nope"], "--data_path {tmp}/nope does not exist"),
    (main_pretrain, ["--data_path", "demo", "--resume", "{tmp}/ck.pth"], "--resume {tmp}/ck.pth does not exist"),
    (main_pretrain, ["--data_path", "demo", "--model", "MIM_vit_bsae_patch16"], "did you mean MIM_vit_base_patch16"),
    (main_finetune, ["--data_path", "{tmp}", "--model", "mae_vit_base_patch16"], "not a registered model"),
    (main_finetune, ["--data_path", "{tmp}", "--finetune", "{tmp}/pre.pth"], "--finetune {tmp}/pre.pth does not exist"),
    (main_finetune, ["--data_path", "{tmp}", "--split_file", "s.csv"], "--split_file s.csv does not exist"),
    (main_knn, ["--data_path", "{tmp}/gone"], "--data_path {tmp}/gone does not exist"),
    (main_knn, [], "--data_path is required for --data_set folder"),
    (main_linprobe, ["--data_path", "{tmp}", "--finetune", "{tmp}/x.pth", "--model", "vit_hug_patch14"],
     "--model vit_hug_patch14 is not a registered model of this script (did you mean vit_huge_patch14"),
])
def test_dry_run_checks_paths_and_model(script, argv, words, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    err = error_of(script, [*argv, "--dry_run"], capsys)
    assert words.replace("{tmp}", str(tmp_path)) in err


def test_dry_run_passes_when_everything_exists_and_prints_once(capsys, monkeypatch, tmp_path):
    (tmp_path / "pre.pth").write_bytes(b"")
    argv = ["--data_path", str(tmp_path), "--finetune", str(tmp_path / "pre.pth"), "--dry_run=config"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main_finetune.main(argv) == {} and capsys.readouterr().out == ""  # rank 1 stays quiet
    monkeypatch.setenv("RANK", "0")
    assert main_finetune.main(argv) == {} and "finetune: " in capsys.readouterr().out


def test_a_deit_command_keeps_deits_lr_rule(caplog):
    """MoCo v3 transfer: DeiT's --lr 3e-4 at total batch 1024 is lr 6e-4 (x 1024 / 512) = our blr 1.5e-4 (x 1024 / 256),
    the value of configs/finetune/moco_v3_*.yaml; our own spelling keeps --lr absolute."""
    with caplog.at_level(logging.WARNING, logger="vitfreeze"):
        deit = parse_args(main_finetune.build_parser(), ["--batch-size", "128", "--lr", "3e-4", "--warmup-epochs", "3"])
    assert deit.blr == pytest.approx(1.5e-4) and deit.lr is None
    assert any("--blr" in r.getMessage() for r in caplog.records)
    ours = parse_args(main_finetune.build_parser(), ["--batch_size", "128", "--lr", "3e-4"])
    assert ours.lr == 3e-4

