"""Command-line arguments shared by the entry scripts, and YAML recipes layered under them.

Flag names follow the official MAE (github.com/facebookresearch/mae ``main_pretrain.py``) and LocalMIM
(``run_pretrain.py``) scripts so that their commands paste unchanged. A recipe (``--config FILE.yaml``) is a
delta over the parser defaults: its keys are flag names, unknown keys are an error, and the command line
always wins over the file (timm's two-stage parse, plus the unknown-key check timm lacks).

One module per job: ``types`` (value types), ``groups`` (the flag groups every script composes, and the flags
several of them share), ``tasks`` (the groups of the downstream tasks), ``config`` (YAML recipes, DeiT's
spellings), ``parse`` (the two-stage parse) and ``checks`` (what would stop a run; FreezeOut implied; gradient
accumulation). Every flag is defined once; this package re-exports the names the scripts use, so
``from util import args as cli`` and ``from util.args import parse_args`` keep working.
"""
from util.args.checks import (DEMO_RECIPE, FREEZEOUT_FLAGS, check_schedule, imply_freezeout, resolve_accum_iter,
                              run_problems)
from util.args.config import DEIT_SPELLINGS, FOREIGN_FLAGS, IGNORED_FLAGS, dump_args, load_config
from util.args.groups import (add_amp_arg, add_batch_size_arg, add_compute_args, add_config_args, add_data_args,
                              add_data_path_arg, add_decode_args, add_dist_args, add_eval_only_arg,
                              add_eval_output_args, add_freezeout_args, add_loader_args, add_mim_args,
                              add_model_args, add_nb_classes_arg, add_optim_args, add_output_args,
                              add_pretrained_args, add_run_folder_args, add_seed_arg, add_tuning_args)
from util.args.parse import explicit_dests, normalize_argv, parse_args
from util.args.tasks import (add_backbone_args, add_detection_args, add_detection_head_args, add_deterministic_arg,
                             add_extraction_args, add_finetune_args, add_knn_args, add_labelled_data_args,
                             add_linprobe_args, add_pyramid_args, add_segmentation_args, add_transfer_data_args,
                             add_warmup_iters_arg)
from util.args.types import (closed_fraction, half_open_fraction, non_negative_float, non_negative_int, open_fraction,
                             positive_float, positive_int)

__all__ = [
    "DEIT_SPELLINGS", "DEMO_RECIPE", "FOREIGN_FLAGS", "FREEZEOUT_FLAGS", "IGNORED_FLAGS",
    "add_amp_arg", "add_backbone_args", "add_batch_size_arg", "add_compute_args", "add_config_args", "add_data_args",
    "add_data_path_arg", "add_decode_args", "add_detection_args", "add_detection_head_args", "add_deterministic_arg",
    "add_dist_args", "add_eval_only_arg", "add_eval_output_args", "add_extraction_args", "add_finetune_args",
    "add_freezeout_args", "add_knn_args", "add_labelled_data_args", "add_linprobe_args", "add_loader_args",
    "add_mim_args",
    "add_model_args", "add_nb_classes_arg", "add_optim_args", "add_output_args", "add_pretrained_args",
    "add_pyramid_args", "add_run_folder_args", "add_seed_arg", "add_segmentation_args", "add_transfer_data_args",
    "add_tuning_args", "add_warmup_iters_arg",
    "check_schedule", "closed_fraction", "dump_args", "explicit_dests", "half_open_fraction", "imply_freezeout",
    "load_config", "non_negative_float", "non_negative_int", "normalize_argv", "open_fraction", "parse_args",
    "positive_float", "positive_int", "resolve_accum_iter", "run_problems",
]
