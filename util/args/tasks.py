"""Flag groups of the downstream tasks: the linear probe and k-NN (labelled data, a frozen backbone), fine-tuning
(MAE ``main_finetune.py``'s flags), and dense transfer (segmentation with UperNet, detection with Mask R-CNN /
Cascade Mask R-CNN, both on a ViT feature pyramid). Flags shared with other tasks come from ``util.args.groups``."""
from __future__ import annotations

import argparse
from typing import Sequence

from util.args.groups import (Container, add_amp_arg, add_batch_size_arg, add_data_path_arg, add_eval_only_arg,
                              add_loader_args, add_nb_classes_arg, add_pretrained_args, add_strict_data_arg,
                              add_tuning_args)
from util.args.types import closed_fraction, non_negative_float, non_negative_int, positive_float, positive_int


# ------------------------------------------------------------------------------------ evaluation (probe, k-NN)
def add_labelled_data_args(parser: argparse.ArgumentParser) -> None:
    """Labelled train/val data for linear probing and k-NN (MAE's ``--data_path`` + ``--nb_classes``)."""
    from util.data.transfer import DATASETS  # util -> util; the names live with the builders
    group = parser.add_argument_group("data")
    group.add_argument("--data_set", default="folder", choices=list(DATASETS),
                       help="'folder': <data_path>/train and <data_path>/val (ImageFolder); 'demo': built-in set")
    add_data_path_arg(group, default="", help="dataset root")
    add_nb_classes_arg(group, default=None, help="number of classes (default: from the dataset; an error if they "
                                                  "differ)")
    add_loader_args(group, num_workers=10)
    group.add_argument("--dist_eval", action="store_true",
                       help="accepted for MAE compatibility; evaluation is always sharded exactly over processes")


def add_backbone_args(parser: argparse.ArgumentParser, *, weights_aliases: Sequence[str] = ()) -> None:
    """A classification backbone (``models/vit.py``), the checkpoint it loads and the feature it gives."""
    group = parser.add_argument_group("backbone")
    add_pretrained_args(group, aliases=weights_aliases)
    group.add_argument("--global_pool", action="store_true", default=False,
                       help="feature = mean of patch tokens -> fc_norm (the default of fine-tuning, as MAE's)")
    group.add_argument("--cls_token", action="store_false", dest="global_pool",
                       help="feature = cls token after the final norm (the default of the linear probe and k-NN, "
                            "as MAE's probe)")


def add_linprobe_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("linear probe")
    group.add_argument("--cache_features", action="store_true",
                       help="embed train/val once without augmentation, then train the head(s) on the features")
    group.add_argument("--lr_grid", default=None, type=positive_float, nargs="+",
                       help="one head per absolute lr, trained side by side (needs --cache_features)")


def add_knn_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("k-NN")
    group.add_argument("--nb_knn", default=[10, 20, 100, 200], type=positive_int, nargs="+",
                       help="numbers of nearest neighbours, all evaluated in one pass")
    group.add_argument("--temperature", default=0.07, type=positive_float, help="vote weight exp(sim / T)")
    group.add_argument("--n_per_class", default=0, type=non_negative_int,
                       help="few-shot: bank of N training images per class (0: the whole training set)")
    group.add_argument("--n_tries", default=1, type=positive_int, help="few-shot banks drawn (mean and std)")
    group.add_argument("--save_features", "--dump_features", dest="save_features", default="",
                       help="folder to write the extracted features to (DINO's file names)")
    group.add_argument("--load_features", default="", help="folder to read features from instead of extracting")
    group.add_argument("--fp16_bank", action="store_true", help="keep the training bank in fp16 (half the memory)")
    group.add_argument("--knn_chunk_size", default=256, type=positive_int,
                       help="test rows per similarity block (memory: chunk x bank size)")


def add_extraction_args(parser: argparse.ArgumentParser) -> None:
    """Batch size and precision of a forward-only pass (k-NN feature extraction; DINO's ``--batch_size_per_gpu``)."""
    group = parser.add_argument_group("feature extraction")
    add_batch_size_arg(group, default=128, aliases=("--batch_size_per_gpu",))
    add_amp_arg(group)


# ----------------------------------------------------------------------------------------------------- fine-tuning
def add_finetune_args(parser: argparse.ArgumentParser) -> None:
    """MAE ``main_finetune.py``'s model, augmentation and mixup flags and ``--eval``."""
    group = parser.add_argument_group("fine-tuning")
    add_tuning_args(group, layer_decay=0.75)
    group.add_argument("--head_init_std", default=2e-5, type=positive_float,
                       help="trunc_normal std of the new head (MAE 2e-5; dBOT 0.01)")
    add_eval_only_arg(group)
    aug = parser.add_argument_group("augmentation and regularisation")
    aug.add_argument("--smoothing", default=0.1, type=closed_fraction, help="label smoothing")
    aug.add_argument("--aa", default="rand-m9-mstd0.5-inc1", type=str,
                     help="timm auto-augment policy (MAE: rand-m9-mstd0.5-inc1); 'none' disables it")
    aug.add_argument("--color_jitter", default=None, type=non_negative_float,
                     help="colour jitter factor, used only when --aa is none (timm's rule)")
    aug.add_argument("--reprob", default=0.25, type=closed_fraction, help="RandomErasing probability")
    aug.add_argument("--remode", default="pixel", choices=["pixel", "rand", "const"], help="RandomErasing fill")
    aug.add_argument("--recount", default=1, type=positive_int, help="RandomErasing boxes per image")
    aug.add_argument("--mixup", default=0.0, type=non_negative_float, help="mixup alpha (0: off)")
    aug.add_argument("--cutmix", default=0.0, type=non_negative_float, help="cutmix alpha (0: off)")
    aug.add_argument("--cutmix_minmax", default=None, type=closed_fraction, nargs=2,
                     help="cutmix box-size ratio bounds (overrides --cutmix alpha)")
    aug.add_argument("--mixup_prob", default=1.0, type=closed_fraction, help="chance a batch is mixed at all")
    aug.add_argument("--mixup_switch_prob", default=0.5, type=closed_fraction,
                     help="chance of cutmix instead of mixup when both are on")
    aug.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"],
                     help="one mixing per batch, per pair or per element")


def add_transfer_data_args(parser: argparse.ArgumentParser) -> None:
    """Cross-validation folds from a CSV (HyperKvasir / GastroVision protocols), opt-in downloads, few labels."""
    group = parser.add_argument_group("transfer data")
    group.add_argument("--split_file", default=None,
                       help="CSV with columns file,label,fold (file relative to --data_path), or HyperKvasir's "
                            "official_splits/2_fold_split.csv as it is; needs --data_set folder")
    group.add_argument("--fold", default=None, type=int, nargs="+",
                       help="held-out fold(s) of --split_file, one run each (mean and std reported over several); "
                            "default: every fold in the file")
    group.add_argument("--download", action="store_true",
                       help="fetch CIFAR / Flowers / Pets with torchvision when missing (never done otherwise)")
    group.add_argument("--train_per_class", default=0, type=non_negative_int,
                       help="train on N labelled images per class, drawn with --seed (few labels; 0: all of them)")


# ------------------------------------------------------------------------- dense transfer: the parts both share
def add_pyramid_args(group: Container, *, out_channels: int | None, global_blocks: list[int]) -> None:
    """The ViT under a feature pyramid (``models/pyramid.py``, ``models/adapter.py``): ViTDet's window attention,
    activation checkpointing, and the pyramid's channels."""
    group.add_argument("--window_size", default=0, type=non_negative_int,
                       help="window attention in the ViT blocks outside --global_blocks (ViTDet: 14); 0: global")
    group.add_argument("--global_blocks", default=global_blocks, type=int, nargs="*",
                       help="blocks that keep global attention under --window_size")
    group.add_argument("--grad_checkpointing", action="store_true", help="recompute ViT blocks in backward")
    group.add_argument("--use_rel_pos", action="store_true",
                       help="ViTDet's decomposed relative position in every block of the pyramid's ViT (detectron2 "
                            "use_rel_pos; zero-initialised tables, the pretrained checkpoint has none)")
    group.add_argument("--out_channels", default=out_channels, type=positive_int,
                       help="channels of the feature pyramid (none: 256, or the ViT width for segmentation's "
                            "'beit' neck)")


def add_warmup_iters_arg(group: Container, *, default: int | None, help: str) -> None:
    group.add_argument("--warmup_iters", default=default, type=non_negative_int, help=help)


def add_deterministic_arg(group: Container) -> None:
    group.add_argument("--deterministic", action="store_true",
                       help="deterministic kernels (mmdet's / mmseg's --deterministic); slower")


# ---------------------------------------------------------------------------------------- semantic segmentation
def add_segmentation_args(parser: argparse.ArgumentParser) -> None:
    """UperNet on the ViT pyramid (``main_segment.py``): ADE20K data, model and schedule (mmseg's
    ``configs/_base_/datasets/ade20k.py``, BEiT/MAE's ``upernet`` ADE20K recipes)."""
    g = parser.add_argument_group("segmentation")
    add_data_path_arg(g, default="demo", help="ADE20K-layout root, or 'demo' (synthetic scenes)")
    add_nb_classes_arg(g, default=150, help="classes after reduce_zero_label")
    g.add_argument("--no_reduce_zero_label", action="store_false", dest="reduce_zero_label",
                   help="label 0 is a class (default: ADE20K's 0 = ignore, k -> k - 1)")
    add_loader_args(g, num_workers=4)
    add_strict_data_arg(g)
    g.add_argument("--ratio_range", default=[0.5, 2.0], type=positive_float, nargs=2, help="train resize ratios")
    g.add_argument("--cat_max_ratio", default=0.75, type=closed_fraction, help="random crop: largest class share")
    g.add_argument("--slide_stride", default=None, type=positive_int,
                   help="sliding-window stride at evaluation (default: 2/3 of input_size, mmseg's 341 for 512)")
    g.add_argument("--max_iters", default=None, type=positive_int,
                   help="training length in optimizer steps (overrides --epochs; BEiT/MAE's ADE20K recipes: 160k)")
    add_warmup_iters_arg(g, default=None, help="linear warmup steps (mmseg: 1500; default: from --warmup_epochs)")
    g.add_argument("--poly_power", default=1.0, type=positive_float)
    g.add_argument("--eval_interval", default=0, type=non_negative_int,
                   help="evaluate after the epoch in which the step passes a multiple of this (0: every epoch)")
    add_tuning_args(g, layer_decay=0.65)
    g.add_argument("--neck", default="beit", choices=["beit", "simple"],
                   help="beit: BEiT/MAE's deconv/pool neck at the ViT width; simple: ViTDet's, + 1x1/3x3 convs")
    add_pyramid_args(g, out_channels=None, global_blocks=[])
    g.add_argument("--channels", default=None, type=positive_int, help="UperNet channels (default: ViT width)")
    g.add_argument("--aux_channels", default=256, type=non_negative_int, help="auxiliary FCN channels (0: none)")
    g.add_argument("--aux_weight", default=0.4, type=float)
    g.add_argument("--tap_blocks", default=None, type=int, nargs="*",
                   help="blocks feeding the 4 levels (default: BEiT/MAE's 3 5 7 11 for depth 12, 7 11 15 23 for "
                        "24, else evenly spaced); empty: all from the last block (ViTDet)")
    g.add_argument("--rel_pos_bias", action="store_true",
                   help="BEiT's relative position bias in every block, as MAE's / BEiT's ADE20K backbone "
                        "(use_rel_pos_bias=True; zero-initialised, added to the pretrained absolute embedding)")
    g.add_argument("--layer_scale_init_value", default=None, type=positive_float,
                   help="LayerScale in every block starting at this value (MAE's ADE20K backbone: init_values=1.0, "
                        "which leaves the pretrained function unchanged); default: none")
    g.add_argument("--vis_images", default=4, type=non_negative_int, help="validation pictures per evaluation")
    add_deterministic_arg(g)
    add_eval_only_arg(g)


# ------------------------------------------------------------------------------- detection / instance segmentation
def add_detection_args(parser: argparse.ArgumentParser) -> None:
    """Mask R-CNN / Cascade Mask R-CNN on the ViT pyramid (``main_detect.py``): model, data, schedule."""
    group = parser.add_argument_group("detection")
    group.add_argument("--detector", default="mask_rcnn", choices=["mask_rcnn", "cascade_mask_rcnn"],
                       help="models.detectors.DETECTORS")
    add_pretrained_args(group)
    add_tuning_args(group, layer_decay=0.75)
    group.add_argument("--lr_steps", default=[8, 11], type=positive_int, nargs="+",
                       help="epochs after which the lr is multiplied by 0.1 (mmdet's lr_config.step)")
    add_warmup_iters_arg(group, default=500,
                         help="linear warmup from 0.001 x lr over this many optimizer steps (mmdet)")
    group.add_argument("--anchor_sizes", default=[32, 64, 128, 256, 512], type=positive_int, nargs=5,
                       help="RPN anchor size of each level (strides 4, 8, 16, 32, 64)")
    group.add_argument("--rois_per_image", default=512, type=positive_int,
                       help="RoIs sampled per image (and cascade stage) to train the box head")
    group.add_argument("--proposals_per_image", default=2000, type=positive_int,
                       help="RPN proposals per image after NMS in training (half of it at test time)")
    group.add_argument("--box_fc", default=1024, type=positive_int, help="width of the box head's FC layer")
    add_pyramid_args(group, out_channels=256, global_blocks=[2, 5, 8, 11])
    group.add_argument("--scale_range", default=[0.1, 2.0], type=positive_float, nargs=2,
                       help="large-scale jitter: random resize range around --input_size (ViTDet 0.1 2.0)")
    group.add_argument("--max_dets", default=100, type=positive_int, help="detections per image (COCO: 100)")
    add_eval_only_arg(group)
    group.add_argument("--eval_every", default=1, type=positive_int, help="evaluate every N epochs (and the last)")
    add_deterministic_arg(group)
    data = parser.add_argument_group("data")
    add_data_path_arg(data, default="scenes",
                      help="COCO root (annotations/instances_{train,val}2017.json, {train,val}2017/), or 'scenes': "
                           "synthetic scenes written into <output_dir>/scenes")
    data.add_argument("--scene_images", default=[64, 16], type=positive_int, nargs=2,
                      help="train / val images of the synthetic scenes (their side is --input_size)")
    add_loader_args(data, num_workers=4)
    add_strict_data_arg(data)


def add_detection_head_args(parser: argparse.ArgumentParser) -> None:
    """RoI pooling, losses, box / mask heads and training augmentation (models/detectors.py,
    util/data/det_transforms.py); defaults are mmdet's / detectron2's, the recipes set their reference's. The choices
    are those of ``models.detectors`` (``BOX_LOSSES``, ``BOX_HEADS``, ``HEAD_NORMS``, ``MASK_HEAD_NORMS``), written
    out here because util/ does not import models/ (tests/test_flags_once.py checks that they agree)."""
    from util.data.det_transforms import TRAIN_AUGMENTATIONS  # util -> util; the names live with the transforms
    group = parser.add_argument_group("detection heads and augmentation")
    group.add_argument("--train_aug", default="detr_ms", choices=TRAIN_AUGMENTATIONS,
                       help="training augmentation: detr_ms = DETR's multi-scale resize and crop (mmdet configs of "
                            "ViT-Adapter and dBOT, '3x+MS'); lsj = ViTDet's large-scale jitter onto --input_size")
    group.add_argument("--train_crop", default=0, type=non_negative_int,
                       help="detr_ms: final random crop of at most this side (ViT-Adapter 1024); 0: none (dBOT)")
    group.add_argument("--test_size", default=None, type=positive_int, nargs=2, metavar=("SHORT", "LONG"),
                       help="test images resized to fit SHORT x LONG (mmdet: 800 1333); default: --input_size on "
                            "the longer side")
    group.add_argument("--roi_align", default="aligned", choices=["aligned", "legacy"],
                       help="aligned: RoIAlign with the half-pixel offset (mmcv, detectron2); legacy: "
                            "torchvision's MultiScaleRoIAlign")
    group.add_argument("--rpn_smooth_l1_beta", default=0.0, type=non_negative_float,
                       help="RPN box loss: smooth L1 beta (0 = L1: mmdet Mask R-CNN, ViTDet; iBOT/dBOT 0.111)")
    group.add_argument("--box_loss", default="smooth_l1", choices=["smooth_l1", "giou"],
                       help="RoI box loss: smooth_l1 (with --box_smooth_l1_beta) or giou on decoded boxes (dBOT)")
    group.add_argument("--box_smooth_l1_beta", default=0.0, type=non_negative_float,
                       help="RoI box loss smooth L1 beta (0 = L1: mmdet Mask R-CNN, ViTDet)")
    group.add_argument("--box_loss_weight", default=1.0, type=positive_float,
                       help="RoI box loss weight (dBOT's GIoU: 10)")
    group.add_argument("--class_specific_cascade", action="store_true",
                       help="cascade stages regress one box per class (dBOT, reg_class_agnostic=False); default one "
                            "box per RoI (ViTDet, mmdet cascade_mask_rcnn_r50_fpn)")
    group.add_argument("--box_head", default="4conv1fc", choices=["4conv1fc", "2fc"],
                       help="4conv1fc (ViTDet, dBOT) or 2fc (mmdet Shared2FCBBoxHead)")
    group.add_argument("--box_head_norm", default="gn", choices=["gn", "ln", "bn", "none"],
                       help="norm of the 4conv1fc box head: gn (GroupNorm 32), ln (LayerNorm, ViTDet), bn (SyncBN "
                            "when distributed on CUDA: dBOT's norm_cfg=SyncBN), none")
    group.add_argument("--mask_head_norm", default="gn", choices=["gn", "ln", "none"],
                       help="norm of the mask head's 4 convolutions: gn, ln (ViTDet), none (mmdet FCNMaskHead)")
