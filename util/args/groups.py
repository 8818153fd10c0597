"""Flag groups that every entry script composes in its ``build_parser``, and the flags several groups share.

Each flag is defined once, in one function of this package; a script that takes the flag calls that function.
What differs between scripts (a default, the data a path points at) is a parameter of the function, never a
second definition. Flag names follow the official MAE (github.com/facebookresearch/mae ``main_pretrain.py``,
``main_finetune.py``) and LocalMIM (``run_pretrain.py``) scripts so that their commands paste unchanged.
"""
from __future__ import annotations

import argparse
from typing import Any, Sequence

from util.args.types import (closed_fraction, half_open_fraction, learning_rate, non_negative_float, non_negative_int,
                             open_fraction, positive_float, positive_int)
from util.runtime import available_cores  # loader workers beyond the cores only compete

# a parser or one of its argument groups: a shared flag lands in the group of the script that takes it
Container = argparse._ActionsContainer

CHECKPOINT_SOURCES = ["auto", "vitfreeze", "mae", "localmim", "moco_v3", "dinov2", "timm"]


# --------------------------------------------------------------------------------- flags shared by several groups
def add_data_path_arg(group: Container, *, default: Any, help: str) -> None:
    """``--data_path``: where the data lies (what it holds is the script's: ``help``)."""
    group.add_argument("--data_path", default=default, type=str, help=help)


def add_nb_classes_arg(group: Container, *, default: int | None, help: str) -> None:
    group.add_argument("--nb_classes", default=default, type=positive_int, help=help)


def add_loader_args(group: Container, *, num_workers: int) -> None:
    """``--num_workers`` (``num_workers``, at most the cores) and ``--pin_mem`` / ``--no_pin_mem`` (MAE's)."""
    group.add_argument("--num_workers", default=min(num_workers, available_cores()), type=non_negative_int,
                       help=f"data loader processes (default: {num_workers}, at most the cores)")
    group.add_argument("--pin_mem", action="store_true", default=True,
                       help="page-locked loader batches for faster copies to the GPU (the default)")
    group.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="turn --pin_mem off")


def add_batch_size_arg(group: Container, *, default: int, aliases: Sequence[str] = ()) -> None:
    group.add_argument("--batch_size", *aliases, dest="batch_size", default=default, type=positive_int,
                       help="per-process batch size: images per process and forward")


def add_amp_arg(group: Container) -> None:
    group.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                       help="mixed precision (autocast); auto = bf16 (or fp16) on CUDA, none (fp32) on CPU")


def add_pretrained_args(group: Container, *, aliases: Sequence[str] = ()) -> None:
    """``--finetune``: the pretrained ViT checkpoint a downstream task starts from, and its layout."""
    group.add_argument("--finetune", *aliases, dest="finetune", default="",
                       help="pretrained checkpoint (ours, MAE, LocalMIM/ViTFreeze, MoCo v3, DINOv2, timm) for the "
                            "ViT encoder; empty: random initialisation (a baseline)")
    group.add_argument("--checkpoint_source", default="auto", choices=CHECKPOINT_SOURCES,
                       help="layout of --finetune (auto: detected from its keys)")


def add_tuning_args(group: Container, *, layer_decay: float) -> None:
    """End-to-end tuning of a pretrained ViT (MAE ``main_finetune.py``, BEiT/ViTDet's dense recipes)."""
    group.add_argument("--layer_decay", default=layer_decay, type=positive_float,
                       help="layer-wise lr decay over the ViT blocks: lr_scale = layer_decay ** (depth + 1 - layer "
                            "id); 1 disables it; task heads keep scale 1")
    group.add_argument("--drop_path", default=0.1, type=closed_fraction,
                       help="stochastic depth rate of the ViT (last block)")


def add_eval_only_arg(group: Container) -> None:
    group.add_argument("--eval", action="store_true",
                       help="only evaluate the --resume checkpoint (or --auto_resume's) on the evaluation split(s)")


def add_seed_arg(group: Container, *, help: str | None = None) -> None:
    group.add_argument("--seed", default=0, type=int, help=help)


def add_run_folder_args(group: Container, *, trains: bool) -> None:
    """``--output_dir``, ``--log_dir``, ``--overwrite``: the run's folder; what it holds differs between a training
    run (checkpoints) and an evaluation (results only)."""
    group.add_argument("--output_dir", default="./output_dir",
                       help="checkpoints, log.txt, pictures" if trains else "results, log.txt, args.yaml")
    group.add_argument("--log_dir", default=None,
                       help="TensorBoard folder (default: <output_dir>/tensorboard)" if trains else
                            "TensorBoard folder for the results (default: none)")
    group.add_argument("--overwrite", action="store_true",
                       help="start afresh in an output_dir that already holds checkpoints, replacing them" if trains
                            else "write into an output_dir that holds a training run's checkpoints (its args.yaml "
                                 "too)")


# ---------------------------------------------------------------------------------------------------------- groups
def add_config_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("recipe")
    group.add_argument("--config", default=None, help="YAML recipe whose keys are flag names (CLI overrides it)")
    group.add_argument("--dry_run", nargs="?", const="preflight", default=None, choices=("preflight", "config"),
                       help="check the run without training or writing anything: build its datasets, model (on the "
                            "meta device), checkpoint and schedule, and end with a 'dry run OK' line ('--dry_run "
                            "config': print the resolved configuration and check that its paths exist, nothing more)")


def add_model_args(parser: argparse.ArgumentParser, *, default_model: str) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model, type=str, help="registered model name")
    group.add_argument("--input_size", default=224, type=positive_int, help="image size in pixels")


def add_mim_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("masked image modeling")
    group.add_argument("--mask_ratio", default=0.75, type=open_fraction, help="fraction of patches removed")
    group.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalized pixel targets (MAE)")
    group.add_argument("--hog_nbins", default=9, type=positive_int, help="HOG orientation bins per channel")
    group.add_argument("--hog_compat", action="store_true",
                       help="LocalMIM's fp32 Sobel sums: its HOG targets bit for bit (default: exact fp64 sums; "
                            "flat cells 0 instead of a spurious unit vector, see README)")
    group.add_argument("--target", default=None, choices=["hog", "pixel"],
                       help="LocalMIM target (default: hog for MIM_* models, pixel for mae_*)")


def add_strict_data_arg(group: Container) -> None:
    group.add_argument("--strict_data", action="store_true",
                       help="an unreadable image (or label map) is fatal instead of skipped with a warning")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Unlabelled images for pretraining."""
    group = parser.add_argument_group("data")
    add_data_path_arg(group, default=None,
                      help="ImageFolder root (uses <root>/train if present), a flat image folder, or 'demo' "
                           "(synthetic shapes); required")
    add_loader_args(group, num_workers=4)
    add_strict_data_arg(group)
    group.add_argument("--debug", action="store_true", help="small data subset for a quick end-to-end check")


def add_decode_args(parser: argparse.ArgumentParser, *, what: str) -> None:
    """``--decode``: where images are decoded and cropped (``util.data.decode``)."""
    parser.add_argument_group("input pipeline").add_argument(
        "--decode", default="cpu", choices=["pil", "cpu", "device"],
        help=f"{what}: 'pil' = PIL decode + torchvision transforms to float32 in the workers (the old path); "
             "'cpu' = workers decode only what the crop needs (JPEG DCT scaling) and send uint8, normalized on "
             "the device; 'device' = workers send file bytes, the batch is decoded, cropped and normalized on the "
             "device (nvJPEG on CUDA). Same crop box and flip on every path")


def add_compute_args(parser: argparse.ArgumentParser) -> None:
    """``--compile``: torch.compile of the model (recompiles once per FreezeOut event)."""
    group = parser.add_argument_group("compute")
    group.add_argument("--compile", action="store_true", help="torch.compile the model (in place; keys unchanged)")
    group.add_argument("--compile_backend", default="inductor",
                       help="torch.compile backend (inductor; aot_eager traces without generating code)")


def add_optim_args(parser: argparse.ArgumentParser, *, blr: float, weight_decay: float, epochs: int,
                   warmup_epochs: int, batch_size: int, min_lr: float = 0.0) -> None:
    group = parser.add_argument_group("optimization")
    add_batch_size_arg(group, default=batch_size)
    group.add_argument("--epochs", default=epochs, type=positive_int)
    group.add_argument("--warmup_epochs", default=warmup_epochs, type=non_negative_int)
    group.add_argument("--accum_iter", default=None, type=positive_int,
                       help="micro-batches per optimizer step (default: 1, or derived from --eff_batch_size)")
    group.add_argument("--eff_batch_size", default=None, type=positive_int,
                       help="effective batch (batch_size x accum_iter x world size) to keep whatever the number "
                            "of GPUs: accum_iter is derived from it")
    group.add_argument("--blr", default=blr, type=learning_rate, help="lr = blr * effective batch / 256")
    group.add_argument("--lr", default=None, type=learning_rate, help="absolute lr (overrides --blr)")
    group.add_argument("--min_lr", default=min_lr, type=non_negative_float, help="floor of the cosine schedule")
    group.add_argument("--weight_decay", default=weight_decay, type=non_negative_float)
    group.add_argument("--clip_grad", default=None, type=positive_float, help="clip the gradient 2-norm")
    add_amp_arg(group)
    group.add_argument("--max_skipped_steps", default=10, type=non_negative_int,
                       help="optimizer steps with a non-finite loss skipped before the run stops")


def add_freezeout_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("FreezeOut (progressive layer freezing)")
    group.add_argument("--freezeout", action="store_true", help="freeze leading units on per-unit cosine schedules")
    group.add_argument("--how_scale", default="cubic", choices=["linear", "squared", "cubic"],
                       help="t_i = scale(t_0 + (1 - t_0) i / N)")
    group.add_argument("--t_0", default=0.8, type=half_open_fraction,
                       help="freeze fraction of unit 0 before scaling (cubic 0.8; linear users pass 0.5)")
    group.add_argument("--not_scale_lr", action="store_true", help="peak lr of every unit is lr, not lr / t_i")
    group.add_argument("--non_layerwise_lr", action="store_true",
                       help="every unit follows the global schedule and is only cut at its freeze point")
    group.add_argument("--all_stages", action="store_true", help="LocalMIM: a decoder after every block (ViT-B)")
    group.add_argument("--dont_freeze_pe", action="store_true", help="the patch embedding never freezes")
    group.add_argument("--vitfreeze_compat", action="store_true",
                       help="reproduce the reference ViTFreeze: trainable cls token, lr jump at the end of warmup")


def add_dist_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed")
    group.add_argument("--world_size", default=1, type=positive_int, help="number of processes (set by torchrun)")
    group.add_argument("--local_rank", "--local-rank", default=-1, type=int, help="set by torch.distributed.launch")
    group.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--threads", default=None, type=positive_int,
                       help="intra-op CPU threads per process (default: chosen from the model size, cores and "
                            "loader workers, or OMP_NUM_THREADS; logged at start)")


def add_output_args(parser: argparse.ArgumentParser, *, save_every: int) -> None:
    """Output folder, checkpoints and resumption of a training run."""
    group = parser.add_argument_group("output")
    add_run_folder_args(group, trains=True)
    group.add_argument("--resume", default="", help="checkpoint to resume from")
    group.add_argument("--auto_resume", action="store_true", help="resume from the latest checkpoint in output_dir")
    group.add_argument("--start_epoch", default=0, type=non_negative_int, help="first epoch (resume overrides)")
    group.add_argument("--save_every", default=save_every, type=positive_int, help="keep checkpoint-<epoch>.pth")
    group.add_argument("--save_every_steps", default=0, type=non_negative_int,
                       help="also write checkpoint-last.pth every N optimizer steps inside an epoch (0: off)")
    group.add_argument("--vis_every", default=save_every, type=non_negative_int,  # on by default, as checkpoints
                       help="picture every N epochs (0: off)")
    group.add_argument("--print_freq", default=20, type=positive_int, help="log every N optimizer steps")
    add_seed_arg(group)


def add_eval_output_args(parser: argparse.ArgumentParser) -> None:
    """Output folder and seed of an evaluation that trains nothing."""
    group = parser.add_argument_group("output")
    add_run_folder_args(group, trains=False)
    add_seed_arg(group, help="seed of the few-shot draws")
