"""The users' own commands (seeds 000-004) run as written: FreezeOut flags, script names, DeiT spellings, splits.

Each seed command is copied here as a string; only its data and checkpoint paths are replaced (by a tiny folder in
tmp_path) and its sizes are shrunk by flags appended at the end. Detection and segmentation commands are left to
their own tests.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

import main_finetune
import main_knn
import main_linprobe
import main_pretrain
from util.args import FREEZEOUT_FLAGS, parse_args
from util.data.transfer import build_dataset, csv_folds


# ------------------------------------------------------------------------------------------------ (a) FreezeOut
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
        args = parse_args(main_pretrain.build_parser(), ["--epochs", "3", "--warmup_epochs", "1", "--model", "MIM_vit_tiny_patch16"])
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


# ------------------------------------------------------------------------------ (c) HyperKvasir's official split
def hyperkvasir_tree(root: Path) -> Path:
    """labeled-images/<tract>/<category>/<class>/<name>.jpg and official_splits/2_fold_split.csv as the dataset
    ships it (';'-separated, bare file names); the same name in two classes tests the class-folder tie-break."""
    rows = [("a1.jpg", "cecum", "lower-gi-tract/anatomical-landmarks", 0),
            ("a2.jpg", "cecum", "lower-gi-tract/anatomical-landmarks", 1),
            ("same.jpg", "polyps", "lower-gi-tract/pathological-findings", 0),
            ("same.jpg", "barretts", "upper-gi-tract/pathological-findings", 1),
            ("b3.jpg", "barretts", "upper-gi-tract/pathological-findings", 1)]
    for i, (name, cls, where, _) in enumerate(rows):
        path = root / "labeled-images" / where / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(path)
    split = root / "official_splits" / "2_fold_split.csv"
    split.parent.mkdir()
    split.write_text("file-name;class-name;split-index\n" + "".join(f"{n};{c};{k}\n" for n, c, _, k in rows))
    return split


def test_hyperkvasir_official_split_is_read_as_it_is(tmp_path):
    split = hyperkvasir_tree(tmp_path)
    root = str(tmp_path / "labeled-images")
    assert csv_folds(root, str(split)) == [0, 1]
    train = build_dataset("folder", root, "train", None, split_file=str(split), fold=1)  # rows of fold 0
    val = build_dataset("folder", root, "val", None, split_file=str(split), fold=1)
    assert train.classes == val.classes == ["barretts", "cecum", "polyps"]
    names = lambda ds: sorted((Path(f).parent.name, Path(f).name, ds.classes[y]) for f, y in ds.samples)
    assert names(train) == [("cecum", "a1.jpg", "cecum"), ("polyps", "same.jpg", "polyps")]
    assert names(val) == [("barretts", "b3.jpg", "barretts"), ("barretts", "same.jpg", "barretts"),
                          ("cecum", "a2.jpg", "cecum")]
    img, label = val[0]
    assert img.size == (8, 8) and isinstance(label, int)


def test_official_split_names_missing_files(tmp_path):
    split = hyperkvasir_tree(tmp_path)
    (tmp_path / "labeled-images" / "lower-gi-tract" / "anatomical-landmarks" / "cecum" / "a2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 5 files .* a2\.jpg"):
        build_dataset("folder", str(tmp_path / "labeled-images"), "val", None, split_file=str(split), fold=1)


def test_project_split_format_still_works(tmp_path):
    (tmp_path / "x").mkdir()
    for name in ("p.png", "q.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / "x" / name)
    (tmp_path / "s.csv").write_text("file,label,fold\nx/p.png,a,0\nx/q.png,b,1\n")
    val = build_dataset("folder", str(tmp_path), "val", None, split_file="s.csv", fold=1)
    assert [(Path(f).name, val.classes[y]) for f, y in val.samples] == [("q.png", "b")]


# ------------------------------------------------------------------------------ (e) validation before anything
ROOT = Path(__file__).resolve().parent.parent


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
    argv = ["--data_path", str(tmp_path), "--finetune", str(tmp_path / "pre.pth"), "--dry_run"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main_finetune.main(argv) == {} and capsys.readouterr().out == ""  # rank 1 stays quiet
    monkeypatch.setenv("RANK", "0")
    assert main_finetune.main(argv) == {} and "finetune: " in capsys.readouterr().out
