"""The users' own commands (seeds 000-004) run as written: FreezeOut flags, script names, DeiT spellings, splits.

Each seed command is copied here as a string; only its data and checkpoint paths are replaced (by a tiny folder in
tmp_path) and its sizes are shrunk by flags appended at the end. Detection and segmentation commands are left to
their own tests.
"""
from __future__ import annotations

import logging
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
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


def test_a_deit_command_keeps_deits_lr_rule(caplog):
    """MoCo v3's seed: DeiT's --lr 3e-4 at total batch 1024 is lr 6e-4 (x 1024 / 512) = our blr 1.5e-4 (x 1024 / 256),
    the value of configs/finetune/moco_v3_*.yaml; our own spelling keeps --lr absolute."""
    with caplog.at_level(logging.WARNING, logger="vitfreeze"):
        deit = parse_args(main_finetune.build_parser(), ["--batch-size", "128", "--lr", "3e-4", "--warmup-epochs", "3"])
    assert deit.blr == pytest.approx(1.5e-4) and deit.lr is None
    assert any("--blr" in r.getMessage() for r in caplog.records)
    ours = parse_args(main_finetune.build_parser(), ["--batch_size", "128", "--lr", "3e-4"])
    assert ours.lr == 3e-4


# ----------------------------------------------------------------------------------- (d) the seeds' commands
# Copied from /work/shared/seeds (000 dBOT, 001 MoCo v3, 002 ViT-Adapter, 003 ViTFreeze, 004 MAE medical) with
# their quirks: Windows '^' continuations, a '\ ' with a trailing space, lines that lost their '\'.
SEED_003 = [  # ViTFreeze (LocalMIM) commands: pretraining, fine-tuning, linear probe, k-NN
    r"""OMP_NUM_THREADS=1 python -m torch.distributed.launch --nproc_per_node=8 run_pretrain.py --batch_size 256 --model MIM_vit_base_patch16 --hog_nbins 9 --mask_ratio 0.75 --epochs 1600 --warmup_epochs 40 --blr 2e-4 --weight_decay 0.05 --data_path /path/to/imagenet/ --output_dir /output_dir/""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=4,5,6,7 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=4 --master_port=29501 run_pretrain.py \
--epochs 100 --batch_size 256 --warmup_epochs 10 \
--blr 2e-4 --world_size 4 --accum_iter 2 --model MIM_vit_base_patch16 \
--data_path /raid/utku/datasets/imagenet/classification/train/image_folders \
--output_dir pretrain/full_pretrain_out_freezeout_cubic_t0_85 --log_dir full_pretrain_out_freezeout_cubic_t0_85 \
--how_scale cubic --t_0 0.85""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=8 --master_port=29502 run_pretrain.py \
--epochs 100 --batch_size 256 --warmup_epochs 10 \
--blr 2e-4 --world_size 8 --accum_iter 1 --model MIM_vit_base_patch16 \
--data_path /raid/utku/datasets/imagenet/classification/train/image_folders \
--output_dir pretrain/full_pretrain_out_freezeout_cubic_t0_8_fast --log_dir full_pretrain_out_freezeout_cubic_t0_8_fast \
--how_scale cubic --t_0 0.8""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=5 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=1 --master_port=29505  run_pretrain.py \
--epochs 100 --batch_size 256 --warmup_epochs 10 \
--blr 2e-4 --world_size 1 --accum_iter 8 --model MIM_vit_base_patch16 \
--data_path /raid/utku/datasets/imagenet/classification/train/image_folders \
--output_dir pretrain/bench_3/full_pretrain_out_freezeout_cubic_t0_8_1gpu_save5 --log_dir bench_3/full_pretrain_out_freezeout_cubic_t0_8_1gpu_save5 \
--how_scale cubic --t_0 0.8""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=1 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=1 --master_port=29501  run_pretrain.py \
--epochs 100 --batch_size 256 --warmup_epochs 10 \
--blr 2e-4 --world_size 1 --accum_iter 8 --model MIM_vit_base_patch16 \
--data_path /raid/utku/datasets/imagenet/classification/train/image_folders \
--output_dir pretrain/non_scale_layerwise/freezeout_cubic_t0_8_1234_loss_scaler --log_dir pretrain/non_scale_layerwise/freezeout_cubic_t0_8_1234_loss_scaler \
--how_scale cubic --t_0 0.8 \
--not_scale_lr --non_layerwise_lr""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=5 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=1 --master_port=29505  run_pretrain.py \
--epochs 100 --batch_size 256 --warmup_epochs 10 \
--blr 2e-4 --world_size 1 --accum_iter 8 --model MIM_vit_base_patch16 \
--data_path /raid/utku/datasets/imagenet/classification/train/image_folders \
--output_dir pretrain/non_scale_layerwise/freezeout_cubic_t0_8_1overk_loss_scaler_all_stages --log_dir pretrain/non_scale_layerwise/freezeout_cubic_t0_8_1overk_loss_scaler_all_stages \
--how_scale cubic --t_0 0.8 \
--not_scale_lr --non_layerwise_lr --all_stages""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=7 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=1 --master_port=29507  run_pretrain.py \
--epochs 100 --batch_size 256 --warmup_epochs 10 \
--blr 2e-4 --world_size 1 --accum_iter 8 --model MIM_vit_base_patch16 \
--data_path /raid/utku/datasets/imagenet/classification/train/image_folders \
--output_dir pretrain/non_scale_layerwise/freezeout_cubic_t0_8_all_stages --log_dir pretrain/non_scale_layerwise/freezeout_cubic_t0_8_all_stages \
--how_scale cubic --t_0 0.8 \
--not_scale_lr --non_layerwise_lr --all_stages""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=1,2 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=2 --master_port=29502  run_pretrain.py \
--epochs 100 --batch_size 512 --warmup_epochs 10 \
--blr 2e-4 --world_size 2 --accum_iter 2 --model MIM_vit_base_patch16 \
--data_path /raid/utku/datasets/imagenet/classification/train/image_folders \
--output_dir pretrain/non_scale_layerwise/freezeout_cubic_t0_8_dont_freeze_pe --log_dir pretrain/non_scale_layerwise/freezeout_cubic_t0_8_dont_freeze_pe \
--how_scale cubic --t_0 0.8 \
--not_scale_lr --non_layerwise_lr --dont_freeze_pe""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=8 --master_port=29501 run_pretrain.py \
--epochs 9 --batch_size 32 --warmup_epochs 1 \
--blr 2e-4 --world_size 8 --accum_iter 1 --model MIM_vit_base_patch16 \
--data_path /raid/utku/datasets/imagenet/classification/train/demo_dataset \
--output_dir pretrain/debug --log_dir debug --debug \
--how_scale cubic --t_0 0.8""",
    r"""bash record.sh  CUDA_VISIBLE_DEVICES=4,5,6,7 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=4 --master_port=29502 run_pretrain.py \
--epochs 100 --batch_size 256 --warmup_epochs 10 \
--blr 2e-4 --world_size 4 --accum_iter 2 --weight_decay 0.05 \
--model MIM_vit_base_patch16 --hog_nbins 9 --mask_ratio 0.75 \
--data_path /raid/utku/datasets/imagenet/classification/train/image_folders \
--output_dir pretrain/full_pretrain_out --log_dir full_pretrain_out""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=8 --master_port=29502 run_pretrain.py \
--epochs 100 --batch_size 256 --warmup_epochs 10 \
--blr 2e-4 --world_size 8 --accum_iter 1 --weight_decay 0.05 \
--model MIM_vit_base_patch16 --hog_nbins 9 --mask_ratio 0.75 \
--data_path /raid/utku/datasets/imagenet/classification/train/image_folders \
--output_dir pretrain/full_pretrain_out_fast --log_dir full_pretrain_out_fast""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=7 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=1 --master_port=29501 run_pretrain.py \
--epochs 100 --batch_size 256 --warmup_epochs 10 \
--blr 2e-4 --world_size 1 --accum_iter 8 --weight_decay 0.05 \
--model MIM_vit_base_patch16 --hog_nbins 9 --mask_ratio 0.75 \
--data_path /raid/utku/datasets/imagenet/classification/train/image_folders \
--output_dir pretrain/full_pretrain_out_1gpu --log_dir full_pretrain_out_1gpu""",
    r"""OMP_NUM_THREADS=1 python -m torch.distributed.launch --nproc_per_node=8 run_finetune.py --batch_size 128 --model vit_base_patch16 --finetune /path/to/checkpoint.pth --epochs 100 --warmup_epochs 20 --lr 2e-3 --min_lr 1e-5 --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval --data_path /path/to/imagenet/ --output_dir /output_dir/""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=4,5,6,7 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=4 --master_port=29503 run_finetune.py \
--world_size 4 --accum_iter 2 \
--batch_size 128 --model vit_base_patch16 --finetune /raid/home_yedek/utku/ViTFreeze/ViT/full_pretrain_out_freezeout_cubic_t0_8_fast/checkpoint-99.pth \
--epochs 100 --warmup_epochs 20 --lr 4e-3 --min_lr 1e-6 --layer_decay 0.75 \
--weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval \
--data_path /raid/utku/datasets/imagenet/classification/ \
--output_dir finetune/full_finetune_out_freezeout_cubic_t0_8_fast/ --log_dir finetune/full_finetune_out_freezeout_cubic_t0_8_fast""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=8 --master_port=29500 run_finetune.py \
--world_size 8 --accum_iter 1 \
--batch_size 128 --model vit_base_patch16 --finetune /raid/home_yedek/utku/ViTFreeze/ViT/full_pretrain_out_freezeout_cubic_t0_8_fast/checkpoint-99.pth \
--epochs 100 --warmup_epochs 20 --lr 4e-3 --min_lr 1e-6 --layer_decay 0.75 \
--weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval \
--data_path /raid/utku/datasets/imagenet/classification/ \
--output_dir finetune/full_finetune_out_freezeout_cubic_t0_8_fast/ --log_dir finetune/full_finetune_out_freezeout_cubic_t0_8_fast""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=0,1 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=2 --master_port=29500 run_finetune.py \
--world_size 2 --accum_iter 4 \
--batch_size 128 --model vit_base_patch16 --finetune /raid/home_yedek/utku/ViTFreeze/ViT/full_pretrain_out_freezeout_cubic_t0_8_fast/checkpoint-99.pth \
--epochs 100 --warmup_epochs 20 --lr 4e-3 --min_lr 1e-6 --layer_decay 0.75 \
--weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval \
--data_path /raid/utku/datasets/imagenet/classification/ \
--output_dir finetune/full_finetune_out_freezeout_cubic_t0_8_fast/ --log_dir finetune/full_finetune_out_freezeout_cubic_t0_8_fast""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=2 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=1 --master_port=29502 run_finetune.py \
--world_size 1 --accum_iter 8 \
--batch_size 128 --model vit_base_patch16 --finetune /raid/home_yedek/utku/ViTFreeze/ViT_orig/full_pretrain_out_slow/checkpoint-90.pth \
--epochs 100 --warmup_epochs 20 --lr 4e-3 --min_lr 1e-6 --layer_decay 0.75 \
--weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval \
--data_path /raid/utku/datasets/imagenet/classification/ \
--output_dir finetune/full_pretrain_out_slow/checkpoint-90 --log_dir finetune/full_pretrain_out_slow/checkpoint-90""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=5 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=1 --master_port=29505 run_finetune.py \
--world_size 1 --accum_iter 8 \
--batch_size 128 --model vit_base_patch16 --finetune /raid/utku/ViTFreeze/ViT/pretrain/non_scale_layerwise_failed/freezeout_cubic_t0_8/checkpoint-59.pth \
--epochs 100 --warmup_epochs 20 --lr 4e-3 --min_lr 1e-6 --layer_decay 0.75 \
--weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval \
--data_path /raid/utku/datasets/imagenet/classification/ \
--output_dir finetune/non_scale_layerwise/freezeout_cubic_t0_8_checkpoint-59 --log_dir finetune/non_scale_layerwise/freezeout_cubic_t0_8_checkpoint-59""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=7 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=1 --master_port=29507 run_finetune.py 
--resume /raid/home_yedek/utku/ViTFreeze/ViT/finetune/bench_1/full_finetune_out_freezeout_cubic_t0_85/checkpoint-40.pth \
--world_size 1 --accum_iter 8 \
--batch_size 128 --model vit_base_patch16 \
--epochs 100 --warmup_epochs 20 --lr 4e-3 --min_lr 1e-6 --layer_decay 0.75 \
--weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval \
--data_path /raid/utku/datasets/imagenet/classification/ \
--output_dir finetune/bench_1/full_finetune_out_freezeout_cubic_t0_85 --log_dir finetune/bench_1/full_finetune_out_freezeout_cubic_t0_85""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=4,5,6,7 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=4 --master_port=29504 run_finetune.py \
--world_size 4 --accum_iter 2 \
--batch_size 128 --model vit_base_patch16 --finetune /raid/home_yedek/utku/ViTFreeze/ViT/full_pretrain_out/checkpoint-99.pth \
--epochs 100 --warmup_epochs 20 --lr 4e-3 --min_lr 1e-6 --layer_decay 0.75 \
--weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval \
--data_path /raid/utku/datasets/imagenet/classification/ \
--output_dir full_finetune_out/ --log_dir full_finetune_out""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=6 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=1 --master_port=29506 run_linprobe.py \
--world_size 1 --accum_iter 8 \
--batch_size 2048 --model vit_base_patch16 --finetune /raid/home_yedek/utku/ViTFreeze/ViT/pretrain/bench_1/full_pretrain_out_freezeout_cubic_t0_8_fast/checkpoint-99.pth \
--epochs 90 --warmup_epochs 10 --blr 0.1 \
--weight_decay 0.0 --dist_eval \
--data_path /raid/utku/datasets/imagenet/classification/ \
--output_dir linprob_out/bench_1 --log_dir linprob_out/bench_1""",
    r"""bash record.sh CUDA_VISIBLE_DEVICES=6 OMP_NUM_THREADS=1 \
python3 -m torch.distributed.launch --nproc_per_node=1 --master_port=29509 run_knn.py \
--world_size 1 \
--batch_size 128 --model vit_base_patch16 --finetune /raid/home_yedek/utku/ViTFreeze/ViT/pretrain/bench_3/full_pretrain_out_freezeout_cubic_t0_8_1gpu_not_scale_lr/checkpoint-99.pth \
--dist_eval \
--data_path /raid/utku/datasets/imagenet/classification/ \
--output_dir knn_out/bench_3/full_pretrain_out_freezeout_cubic_t0_8_1gpu_not_scale_lr_checkpoint-99 --log_dir knn_out/bench_3/full_pretrain_out_freezeout_cubic_t0_8_1gpu_not_scale_lr_checkpoint-99""",
]
SEED_001 = [  # MoCo v3 transfer: DeiT's main.py (our main_finetune.py takes its commands)
    r"""python -u -m torch.distributed.launch --nproc_per_node=8 --use_env main.py \
    --batch-size 128 --output_dir [your output dir path] --epochs 100 --lr 3e-4 --weight-decay 0.1 --eval-freq 10 \
    --no-pin-mem  --warmup-epochs 3 --data-set cifar10 --data-path [cifar-10 data path]  --no-repeated-aug \
    --reprob 0.0 --drop-path 0.1 --mixup 0.8 --cutmix 1""",
    r"""python -u -m torch.distributed.launch --nproc_per_node=8 --use_env main.py \
    --batch-size 128 --output_dir [your output dir path] --epochs 100 --lr 3e-4 --weight-decay 0.1 --eval-freq 10 \
    --no-pin-mem  --warmup-epochs 3 --data-set cifar10 --data-path [cifar-100 data path]  --no-repeated-aug \
    --reprob 0.0 --drop-path 0.1 --mixup 0.5 --cutmix 1""",
    r"""python -u -m torch.distributed.launch --nproc_per_node=8 --use_env main.py \
    --batch-size 128 --output_dir [your output dir path] --epochs 100 --lr 3e-4 --weight-decay 0.3 --eval-freq 10 \
    --no-pin-mem  --warmup-epochs 3 --data-set cifar10 --data-path [oxford-flowers data path]  --no-repeated-aug \
    --reprob 0.25 --drop-path 0.1 --mixup 0 --cutmix 0""",
    r"""python -u -m torch.distributed.launch --nproc_per_node=8 --use_env main.py \
    --batch-size 128 --output_dir [your output dir path] --epochs 100 --lr 3e-4 --weight-decay 0.1 --eval-freq 10 \
    --no-pin-mem  --warmup-epochs 3 --data-set cifar10 --data-path [oxford-pets data path]  --no-repeated-aug \
    --reprob 0 --drop-path 0 --mixup 0.8 --cutmix 0""",
]
SEED_004 = [  # MAE on GastroVision / HyperKvasir (Windows continuations) and MAE's submitit fine-tuning
    r"""python main_finetune_gastrovision.py
  --batch_size 50 ^
  --model vit_large_patch16 ^
  --finetune ${PRETRAINED_DIR} ^
  --epochs 50 ^
  --blr 1e-3 ^
  --smoothing 0 ^
  --num_workers 8 ^
  --data_path ${DATA_PATH} ^
  --output_dir ${OUTPUT_DIR}  ^
  --log_dir ${LOG_DIR} ^
  --nb_classes 22""",
    r"""python main_finetune_hyperkvasir.py ^
  --batch_size 50 ^
  --model vit_large_patch16 ^
  --finetune ${PRETRAINED_DIR} ^
  --epochs 50 ^
  --blr 1e-3 ^
  --smoothing 0 ^
  --num_workers 8 ^
  --data_path ${DATA_PATH} ^
  --output_dir ${OUTPUT_DIR} ^
  --log_dir ${LOG_DIR} ^
  --nb_classes 23""",
    r"""python main_finetune_hyperkvasir.py ^
  --batch_size 50 ^
  --model vit_large_patch16 ^
  --finetune ${PRETRAINED_DIR} ^
  --epochs 50 ^
  --blr 1e-3 ^
  --smoothing 0 ^
  --num_workers 8 ^
  --data_path ${DATA_PATH} ^
  --output_dir ${OUTPUT_DIR} ^
  --log_dir ${LOG_DIR} ^
  --nb_classes 16""",
    r"""python submitit_finetune.py \
    --job_dir ${JOB_DIR} \
    --nodes 4 \
    --batch_size 32 \
    --model vit_base_patch16 \
    --finetune ${PRETRAIN_CHKPT} \
    --epochs 100 \
    --blr 5e-4 --layer_decay 0.65 \
    --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 \
    --dist_eval --data_path ${IMAGENET_DIR}""",
    r"""python submitit_finetune.py \
    --job_dir ${JOB_DIR} \
    --nodes 4 --use_volta32 \
    --batch_size 32 \
    --model vit_large_patch16 \
    --finetune ${PRETRAIN_CHKPT} \
    --epochs 50 \
    --blr 1e-3 --layer_decay 0.75 \
    --weight_decay 0.05 --drop_path 0.2 --reprob 0.25 --mixup 0.8 --cutmix 1.0 \
    --dist_eval --data_path ${IMAGENET_DIR}""",
]
SEED_000 = [  # dBOT through run.sh ("on 4 nodes with 8 GPUs each" for ImageNet: NNODES=4)
    (r"""./run.sh dbot_base_finetune \
imagenet_finetune \
vit_base_patch16 \
8 \
dbot_base_pre/checkpoint-1600.pth \
--epochs 100 \
--blr 3e-4 \
--batch_size 32 \
--data_path './data/imagenet'""", 4),
    (r"""./run.sh dbot_large_finetune \
imagenet_finetune \
vit_large_patch16 \
8 \
dbot_large_pre/checkpoint-1600.pth \
--drop_path 0.25 \
--clip_grad 1.0 \
--blr 3e-4 \
--layer_decay 0.75 \
--epochs 50 \
--batch_size 32 \
--data_path './data/imagenet'""", 4),
    (r"""./run.sh dbot_huge_finetune_224 \
imagenet_finetune \
vit_huge_patch14 \
8 \
dbot_huge_pre/checkpoint-1600.pth \
--drop_path 0.3 \
--blr 3e-4 \
--layer_decay 0.75 \
--epochs 50 \
--batch_size 16 \
--accum_iter 2 \
--data_path './data/imagenet'""", 4),
    (r"""./run.sh dbot_huge_finetune_448 \
imagenet_finetune \
vit_huge_patch14 \
8 \
dbot_huge_finetune_224/checkpoint-best.pth \
--drop_path 0.4 \
--blr 7e-5 \
--layer_decay 0.9 \
--input_size 448 \ 
--batch_size 8 \
--accum_iter 4 \
--epochs 10 \
--warmup_epochs 2 \
--data_path './data/imagenet'""", 4),
    (r"""./run.sh dbot_base_transfer \
cifar10_cls+cifar_cls+cars_cls+flwrs_cls+inat_cls+inat19_cls 
vit_base 8 \
dbot_base_pre/checkpoint-1600.pth \
""", 1),
]
SCRIPT_OF = {"main.py": "main_finetune.py"}  # DeiT's trainer in MoCo v3's seed: our fine-tuning script takes it
PATH_FLAGS = {"--data_path": "data", "--data-path": "data", "--finetune": "ckpt", "--resume": "ckpt",
              "--output_dir": "out", "--log_dir": "out", "--job_dir": "out"}
FREEZEOUT_SEEDS = [c for c in SEED_003 if "--how_scale" in c]
TINY_STEP = ["--model", "MIM_vit_tiny_patch16", "--input_size", "32", "--batch_size", "8", "--accum_iter", "1",
             "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--print_freq", "1"]


def shell_words(text: str) -> list[str]:
    """A seed command as the shell would split it, its continuations (``\\``, Windows ``^``) joined; a line that lost
    its ``\\`` is joined too (what its author meant). ``[placeholders with spaces]`` become one word."""
    text = re.sub(r"[\\^][ \t]*\n", " ", text).replace("\n", " ")
    text = re.sub(r"\[([^\]]*)\]", lambda m: "PLACEHOLDER_" + re.sub(r"\W", "_", m.group(1)), text)
    return shlex.split(text)


@pytest.fixture
def places(tmp_path):
    """A tiny ImageFolder (train/val, two classes) and an existing checkpoint file, for the seeds' paths."""
    data = tmp_path / "data"
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            for i in range(4):
                (data / split / cls).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (60 * c + 10 * i, 80, 200 - 40 * c)).save(data / split / cls / f"{i}.png")
    ckpt = tmp_path / "pretrained.pth"
    ckpt.write_bytes(b"")  # the dry run checks that it exists; nothing loads it
    return {"data": str(data), "ckpt": str(ckpt), "out": str(tmp_path / "out")}


def entry_point(words: list[str], places: dict) -> tuple[str, list[str], int]:
    """(script, its arguments with the data/checkpoint/output paths replaced, processes) of a seed command line:
    ``bash record.sh VAR=... python -m torch.distributed.launch --nproc_per_node=N [--use_env] script.py args``."""
    i, nproc, legacy = 0, 1, False
    while words[i] in ("bash", "record.sh") or re.fullmatch(r"[A-Z_]+=\S*", words[i]):
        i += 1
    assert words[i] in ("python", "python3"), words
    i += 1 + (words[i + 1] == "-u")
    if words[i] == "-m":
        assert words[i + 1] == "torch.distributed.launch"
        legacy, i = True, i + 2
        while not words[i].endswith(".py"):
            if words[i].startswith("--nproc_per_node"):
                nproc = int(words[i].split("=")[1])
            legacy &= words[i] != "--use_env"
            i += 1
    script, args = SCRIPT_OF.get(words[i], words[i]), words[i + 1:]
    for k, word in enumerate(args[:-1]):
        if word in PATH_FLAGS:
            args[k + 1] = places[PATH_FLAGS[word]]
    # torch.distributed.launch without --use_env passes --local-rank (torch >= 2: hyphenated) to each process
    return script, (["--local-rank=0"] if legacy else []) + args, nproc


def run_script(script: str, argv: list[str], monkeypatch, capsys, *, world: int) -> str:
    """Run ``script`` as ``python script argv`` does (its ``__main__``), as rank 0 of ``world`` processes."""
    if world > 1:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
    else:
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exc:
        assert not exc.code, capsys.readouterr().err
    return capsys.readouterr().out


def resolved(out: str) -> dict:
    return yaml.safe_load("\n".join(line for line in out.splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", line)))


def seed_id(command: str) -> str:
    return next(w for w in shell_words(command) if w.endswith(".py"))[:-3]


@pytest.mark.parametrize("command", SEED_003 + SEED_001 + SEED_004, ids=seed_id)
def test_seed_command_dry_runs(command, places, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # relative output folders stay in tmp_path
    script, argv, nproc = entry_point(shell_words(command), places)
    config = resolved(run_script(script, [*argv, "--dry_run"], monkeypatch, capsys, world=nproc))
    assert config["data_path"] == places["data"]
    assert config["freezeout"] is ("--how_scale" in command) if "freezeout" in config else True
    if "--all_stages" in command:
        assert config["all_stages"] and config["not_scale_lr"] and config["non_layerwise_lr"]
    if "main.py" in command:  # DeiT's lr rule: 3e-4 x 1024 / 512 = blr 1.5e-4 x 1024 / 256
        assert config["blr"] == pytest.approx(1.5e-4) and config["lr"] is None and config["pin_mem"] is False
    if "submitit_finetune" in command:
        assert (config["launcher"], config["nodes"], config["ngpus"]) == ("slurm", 4, 8)
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


@pytest.mark.parametrize("command", list(dict.fromkeys(FREEZEOUT_SEEDS)),
                         ids=lambda c: re.sub(r"\W+", "_", c.split("--how_scale ")[1]).strip("_"))
def test_freezeout_seed_command_takes_a_real_step(command, places, monkeypatch, capsys, tmp_path, caplog):
    """The ViTFreeze commands never pass --freezeout: their FreezeOut flags must turn it on (one step, tiny model)."""
    monkeypatch.chdir(tmp_path)
    script, argv, _ = entry_point(shell_words(command), places)
    argv = [a for a in argv if not a.startswith("--local-rank")]  # one process here
    with caplog.at_level(logging.INFO, logger="vitfreeze"):
        run_script(script, [*argv, *TINY_STEP], monkeypatch, capsys, world=1)
    out = Path(places["out"])
    recorded = yaml.safe_load((out / "args.yaml").read_text())
    assert recorded["freezeout"] is True and recorded["t_0"] == float(command.split("--t_0 ")[1].split()[0])
    assert (out / "freezeout_schedule.png").exists() and (out / "checkpoint-last.pth").exists()
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("FreezeOut on: --how_scale, --t_0") for m in messages)


def test_dbot_commands_through_run_sh(places, tmp_path, monkeypatch, capsys):
    """run.sh maps the dBOT commands (MODEL vit_base / vit_huge_patch14, a checkpoint, extras) onto our scripts; the
    commands it would start are recorded by stand-in python/torchrun executables, then dry-run here."""
    log = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "torchrun"):
        stub = bin_dir / name
        record = f'{{ printf "%s\\0" "{name}" "${{WORLD_SIZE:-}}" "$@"; printf "\\n\\0"; }} >> {log}'
        stub.write_text(f"#!/bin/sh\n{record}\n")
        stub.chmod(0o755)
    repo = tmp_path / "repo"  # run.sh writes output/JOB/ beside itself: a copy keeps the checkout clean
    repo.mkdir()
    for name in ("run.sh", "record.sh"):
        shutil.copy2(ROOT / name, repo / name)
    shutil.copytree(ROOT / "configs", repo / "configs")
    for command, nodes in SEED_000:
        words = shell_words(command)
        words = [places["ckpt"] if w.endswith(".pth") else w for w in words]
        words = [places["data"] if w == "./data/imagenet" else w for w in words]
        if "--data_path" not in words:  # the transfer chain names no data: dBOT's run.sh had them built in
            words.append(f"data_path={places['data']}")
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "NNODES": str(nodes)}
        res = subprocess.run(["bash", str(repo / "run.sh"), *words[1:]], capture_output=True, text=True, timeout=120,
                             env=env)
        assert res.returncode == 0, res.stderr
    monkeypatch.chdir(repo)  # the recipes' paths are relative to run.sh's folder
    calls = [c.split("\0")[:-1] for c in log.read_text().split("\n\0") if c.strip("\0")]
    checks = [c for c in calls if c[-1] == "--dry_run"]  # run.sh resolves every task before starting any
    assert len(checks) == 4 + 6
    configs = [resolved(run_script(script, argv, monkeypatch, capsys, world=int(world)))
               for name, world, script, *argv in checks]
    assert [c["model"] for c in configs] == ["vit_base_patch16", "vit_large_patch16"] + ["vit_huge_patch14"] * 2 + \
        ["vit_base_patch16"] * 6  # MODEL vit_base completed from the transfer recipes
    assert [c["data_set"] for c in configs[4:]] == ["cifar10", "cifar100", "cars", "flowers", "inat18", "inat19"]
    assert [c["accum_iter"] for c in configs[:4]] == [1, 1, 2, 4]  # 1024 = batch x accum x 32 GPUs, as dBOT says
    assert all(c["finetune"] == places["ckpt"] for c in configs) and configs[3]["input_size"] == 448
    started = [c for c in calls if c[0] == "torchrun"]  # the transfer chain on one 8-GPU node
    assert len(started) == 6 and all(c[2] == "--nproc_per_node=8" for c in started)
    slurm = [c for c in calls if c[0] == "python" and c[-1] != "--dry_run"]  # ImageNet on 4 nodes: submitit
    assert len(slurm) == 4 and all(c[c.index("--launcher") + 1] == "slurm" and c[c.index("--nodes") + 1] == "4"
                                   for c in slurm)


SEED_002 = [f"python convert_14to16.py pretrained/dinov2_vit{size}14_pretrain.pth" for size in "sblg"]  # ViT-Adapter
SEED_001_CONVERT = r"""python convert_to_deit.py \
  --input [your checkpoint path]/[your checkpoint file].pth.tar \
  --output [target checkpoint file].pth"""


def test_conversion_commands_run_from_the_root(tmp_path, monkeypatch, capsys):
    """MoCo v3's convert_to_deit.py and ViT-Adapter's convert_14to16.py, as typed, on tiny fake checkpoints."""
    import torch
    from test_convert import fake_dinov2, fake_moco

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrained").mkdir()
    for command in SEED_002:
        src = tmp_path / shell_words(command)[2]
        torch.save(fake_dinov2(), src)
        run_script("convert_14to16.py", shell_words(command)[2:], monkeypatch, capsys, world=1)
        out = src.with_name(src.stem + "_14to16.pth")
        assert torch.load(out, weights_only=True)["patch_embed.proj.weight"].shape[-2:] == (16, 16)
    words = shell_words(SEED_001_CONVERT)
    moco, base = fake_moco()
    src = Path(words[3])
    src.parent.mkdir(parents=True)
    torch.save(moco, src)
    run_script("convert_to_deit.py", words[2:], monkeypatch, capsys, world=1)
    converted = torch.load(words[5], weights_only=True)["model"]
    assert converted.keys() == base.keys() and all(torch.equal(converted[k], base[k]) for k in base)




# ------------------------------------------------------------------------------------------------ (f) CPU threads
@pytest.fixture
def keep_threads():
    import torch
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("argv, env, cores, world, expected", [
    (["--model", "MIM_vit_tiny_patch16"], None, 8, 1, 1),                    # tiny: one thread
    (["--model", "MIM_vit_base_patch16", "--input_size", "64"], None, 8, 1, 1),   # tiny inputs too
    (["--model", "MIM_vit_base_patch16", "--num_workers", "3"], None, 8, 1, 2),   # 8 // (3 + 1)
    (["--model", "MIM_vit_base_patch16", "--num_workers", "0"], None, 8, 2, 4),   # 8 cores / 2 processes
    (["--model", "MIM_vit_base_patch16", "--num_workers", "4"], None, 2, 1, 1),   # never 0
    (["--model", "MIM_vit_tiny_patch16"], "3", 8, 1, 3),                      # OMP_NUM_THREADS is respected
    (["--model", "MIM_vit_tiny_patch16", "--threads", "2"], "3", 8, 1, 2),    # --threads wins
])
def test_cpu_threads_are_chosen_and_logged(argv, env, cores, world, expected, monkeypatch, caplog, keep_threads):
    import torch
    import util.runtime as runtime
    from util.distributed import DistInfo

    monkeypatch.setattr(runtime, "available_cores", lambda: cores)
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    args = parse_args(main_pretrain.build_parser(), ["--data_path", "demo", "--warmup_epochs", "0", *argv])
    with caplog.at_level(logging.INFO, logger="vitfreeze"):
        assert runtime.choose_threads(args, DistInfo(world_size=world)) == expected
    assert torch.get_num_threads() == expected
    assert any(r.getMessage().startswith(f"CPU threads: {expected} per process") for r in caplog.records)


def test_cuda_keeps_torch_threads_unless_asked(monkeypatch, keep_threads):
    import torch
    from util.distributed import DistInfo
    from util.runtime import choose_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    args = parse_args(main_pretrain.build_parser(), ["--data_path", "demo", "--model", "MIM_vit_tiny_patch16"])
    assert choose_threads(args, DistInfo(device=torch.device("cuda", 0))) == 2


def test_default_loader_workers_are_capped_to_the_cores(monkeypatch):
    from util.args import groups

    monkeypatch.setattr(groups, "available_cores", lambda: 2)
    assert main_knn.build_parser().get_default("num_workers") == 2  # 10 workers on 2 cores: DataLoader warns
    assert main_pretrain.build_parser().get_default("num_workers") == 2
    monkeypatch.setattr(groups, "available_cores", lambda: 64)
    assert main_knn.build_parser().get_default("num_workers") == 10


def test_hyperkvasir_script_finds_the_official_split(tmp_path, monkeypatch, capsys):
    """Seed 004's HyperKvasir command names no split: the dataset's own official split next to it is used."""
    split = hyperkvasir_tree(tmp_path)
    command = SEED_004[1].replace("${DATA_PATH}", str(tmp_path / "labeled-images"))
    script, argv, _ = entry_point(shell_words(command), {"data": str(tmp_path / "labeled-images"),
                                                         "ckpt": str(split), "out": str(tmp_path / "out")})
    config = resolved(run_script(script, [*argv, "--dry_run"], monkeypatch, capsys, world=1))
    assert config["split_file"] == str(split) and config["nb_classes"] == 23
    elsewhere = tmp_path / "a" / "b" / "c"  # no official split within two parents
    elsewhere.mkdir(parents=True)
    argv = [str(elsewhere) if a == str(tmp_path / "labeled-images") else a for a in argv]
    assert resolved(run_script(script, [*argv, "--dry_run"], monkeypatch, capsys, world=1))["split_file"] is None
