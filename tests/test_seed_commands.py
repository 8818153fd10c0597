"""The users' own commands (seeds 000-004) run as written: FreezeOut flags, script names, DeiT spellings, splits.

Each seed command is copied here as a string; only its data and checkpoint paths are replaced (by a tiny folder in
tmp_path) and its sizes are shrunk by flags appended at the end. Detection and segmentation commands are left to
their own tests.
"""
from __future__ import annotations

import logging

import pytest

import main_finetune
import main_pretrain
from util.args import FREEZEOUT_FLAGS, parse_args


# ------------------------------------------------------------------------------------------------ (a) FreezeOut
@pytest.mark.parametrize("flags", [["--how_scale", "cubic"], ["--t_0", "0.8"], ["--all_stages"], ["--dont_freeze_pe"],
                                   ["--not_scale_lr"], ["--non_layerwise_lr"], ["--t_0=0.85"]])
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
        args = parse_args(main_pretrain.build_parser(), ["--epochs", "3", "--model", "MIM_vit_tiny_patch16"])
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


# ------------------------------------------------------------------------------------------- (b) flag spellings
def test_hyphenated_spellings_are_ours():
    argv = "--batch-size 128 --weight-decay 0.1 --no-pin-mem --warmup-epochs 3 --data-set cifar100 --drop-path 0.2"
    args = parse_args(main_finetune.build_parser(), argv.split())
    assert (args.batch_size, args.weight_decay, args.pin_mem, args.warmup_epochs, args.data_set, args.drop_path) == \
        (128, 0.1, False, 3, "cifar100", 0.2)
    assert parse_args(main_finetune.build_parser(), ["--data-path=/x"]).data_path == "/x"


def test_deit_no_op_flags_are_accepted(caplog):
    with caplog.at_level(logging.WARNING, logger="vitfreeze"):
        args = parse_args(main_finetune.build_parser(), ["--no-repeated-aug", "--eval-freq", "10", "--epochs", "4"])
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
