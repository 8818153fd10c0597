"""Argument parsing: YAML recipes under the command line, validation, and the flag names users paste."""
import pytest

import main_pretrain
from util.args import load_config, parse_args

# flags of the official MAE / LocalMIM / ViTFreeze pretraining commands (ViTFreeze's README/DETAILS, MAE PRETRAIN.md)
SEED_FLAGS = ["--model", "--batch_size", "--epochs", "--warmup_epochs", "--blr", "--lr", "--min_lr", "--weight_decay",
              "--accum_iter", "--mask_ratio", "--hog_nbins", "--norm_pix_loss", "--input_size", "--data_path",
              "--output_dir", "--log_dir", "--resume", "--start_epoch", "--num_workers", "--seed", "--world_size",
              "--dist_url", "--local_rank", "--debug", "--config", "--amp", "--max_skipped_steps", "--auto_resume",
              "--save_every", "--vis_every", "--strict_data", "--pin_mem", "--no_pin_mem"]


def test_seed_flags_exist():
    options = {opt for action in main_pretrain.build_parser()._actions for opt in action.option_strings}
    assert not [flag for flag in SEED_FLAGS if flag not in options]


def test_seed_command_parses():
    argv = ("--epochs 100 --batch_size 256 --warmup_epochs 10 --blr 2e-4 --world_size 4 --accum_iter 2 "
            "--model MIM_vit_base_patch16 --data_path /x --output_dir o --log_dir l --local_rank=0").split()
    args = parse_args(main_pretrain.build_parser(), argv)
    assert (args.epochs, args.batch_size, args.blr, args.accum_iter, args.model) == (100, 256, 2e-4, 2,
                                                                                     "MIM_vit_base_patch16")


def test_yaml_sets_defaults_and_cli_wins(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("epochs: 7\nwarmup_epochs: 1\nblr: 0.001\nnorm_pix_loss: true\nmodel: mae_vit_tiny_patch16\n")
    args = parse_args(main_pretrain.build_parser(), ["--config", str(cfg), "--epochs", "3"])
    assert args.epochs == 3 and args.blr == 1e-3 and args.norm_pix_loss is True
    assert args.model == "mae_vit_tiny_patch16" and args.batch_size == 64  # untouched default


def test_unknown_key_is_an_error_with_suggestion(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("epoch: 7\n")
    with pytest.raises(ValueError, match=r"unknown key 'epoch'.*did you mean.*epochs"):
        load_config(cfg, main_pretrain.build_parser())
    with pytest.raises(SystemExit) as exc:
        parse_args(main_pretrain.build_parser(), ["--config", str(cfg)])
    assert exc.value.code == 2


@pytest.mark.parametrize("text, match", [("mask_ratio: 1.5\n", "mask_ratio"), ("batch_size: 0\n", "batch_size"),
                                         ("norm_pix_loss: 3\n", "true or false"), ("amp: fp8\n", "amp")])
def test_yaml_values_are_validated(tmp_path, text, match):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(cfg, main_pretrain.build_parser())


@pytest.mark.parametrize("argv", [["--mask_ratio", "0"], ["--mask_ratio", "1.0"], ["--batch_size", "0"],
                                  ["--epochs", "-1"], ["--blr", "nan"], ["--accum_iter", "0"], ["--amp", "fp8"]])
def test_invalid_values_rejected_by_parser(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(main_pretrain.build_parser(), argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(main_pretrain.build_parser(), ["--config", str(tmp_path / "nope.yaml")])
    assert "nope.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("text, where", [("model: x\n  bad: [1, 2\n", "line 2, column 6"),
                                         ("epochs: [1, 2\n", "line 2"), ("a: 'open\n", "line")])
def test_malformed_yaml_is_one_line_and_exit_2(tmp_path, capsys, text, where):
    """A YAML syntax error names the file and the place (exit 2 like other config errors), not a traceback."""
    cfg = tmp_path / "broken.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as exc:
        parse_args(main_pretrain.build_parser(), ["--config", str(cfg)])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "broken.yaml is not valid YAML" in last and where in last and "Traceback" not in last
