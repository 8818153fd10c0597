"""A flag means the same in every entry script that takes it: defined once (in ``util.args`` or
``util.launch``), with the same type, choices, action, nargs and destination everywhere, the same companion flags
(``--pin_mem`` / ``--no_pin_mem``), and the same default unless the default is a deliberate per-script choice
listed below."""
import argparse
import ast
import importlib
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("main_pretrain", "main_finetune", "main_linprobe", "main_knn", "main_segment", "main_detect")

# Flags whose default is a per-script parameter of the group function that defines them, and why.
PER_SCRIPT_DEFAULTS = {
    "--model": "each task's architecture (MAE's mae_vit_base_patch16 for pretraining, vit_base_patch16 after)",
    "--input_size": "detection trains on ViTDet's 1024 px large-scale-jitter canvas",
    "--batch_size": "each recipe's batch (MAE main_pretrain 64, main_linprobe 512; DINO eval_knn 128; mmdet 2)",
    "--epochs": "each recipe's length",
    "--warmup_epochs": "each recipe's warmup",
    "--blr": "each recipe's base lr (MAE 1.5e-4 pretraining, 1e-3 fine-tuning, 0.1 probing)",
    "--min_lr": "MAE's fine-tuning floors the cosine at 1e-6",
    "--weight_decay": "each recipe's (0 for MAE's linear probe, 0.1 for ViTDet)",
    "--save_every": "how often each run keeps a numbered checkpoint",
    "--vis_every": "pictures on by default, as often as the numbered checkpoints (--save_every)",
    "--num_workers": "MAE's 10 loader workers for probing, 4 elsewhere (capped to the cores)",
    "--data_path": "what each task reads (an image folder, ADE20K, COCO, or a built-in demo set)",
    "--nb_classes": "ADE20K's 150 classes for segmentation; from the dataset for classification",
    "--layer_decay": "BEiT/MAE's 0.65 for ADE20K segmentation, 0.75 for fine-tuning and ViTDet",
    "--global_blocks": "ViTDet's global blocks 2 5 8 11 for detection; segmentation windows nothing by default",
    "--out_channels": "ViTDet's 256 for detection; segmentation's beit neck keeps the ViT width",
    "--warmup_iters": "mmdet's 500 steps for detection; segmentation warms up over --warmup_epochs",
    "--global_pool": "MAE fine-tunes on the mean patch token, its linear probe on the cls token",
    "--cls_token": "the same choice, seen from the flag that turns --global_pool off",
}
# Spellings one script accepts besides ours, for the command it stands in for.
SCRIPT_ALIASES = {
    "--pretrained_weights": "DINO eval_knn.py's name of --finetune (k-NN)",
    "--batch_size_per_gpu": "DINO eval_knn.py's name of --batch_size (k-NN)",
}


def signature(action: argparse.Action) -> dict:
    return {"action": type(action).__name__, "dest": action.dest, "type": action.type,
            "choices": None if action.choices is None else list(action.choices), "nargs": action.nargs}


def flag_table(parsers: dict[str, argparse.ArgumentParser]) -> dict[str, dict[str, argparse.Action]]:
    """flag -> {script: its action} over every long option of every parser."""
    table: dict[str, dict[str, argparse.Action]] = defaultdict(dict)
    for script, parser in parsers.items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    table[flag][script] = action
    return table


def companions(parser: argparse.ArgumentParser, action: argparse.Action) -> set[str]:
    """Every flag of ``parser`` that writes ``action``'s destination (``--pin_mem`` and ``--no_pin_mem``), less the
    aliases one script keeps for a foreign command."""
    return {flag for other in parser._actions if other.dest == action.dest for flag in other.option_strings
            if flag not in SCRIPT_ALIASES}


def disagreements(parsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """One line per flag that two scripts define differently."""
    bad = []
    for flag, by_script in sorted(flag_table(parsers).items()):
        first, reference = next(iter(by_script.items()))
        for script, action in by_script.items():
            if signature(action) != signature(reference):
                bad.append(f"{flag}: {first} {signature(reference)} but {script} {signature(action)}")
            default, expected = parsers[script].get_default(action.dest), parsers[first].get_default(reference.dest)
            if flag not in PER_SCRIPT_DEFAULTS and default != expected:
                bad.append(f"{flag}: default {expected!r} in {first} but {default!r} in {script}")
            if companions(parsers[script], action) != companions(parsers[first], reference):
                bad.append(f"{flag}: {first} has {sorted(companions(parsers[first], reference))} but {script} has "
                           f"{sorted(companions(parsers[script], action))}")
    return bad


def defined_flags(path: Path) -> list[str]:
    """The long options of every ``add_argument(...)`` call written in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            found += [arg.value for arg in node.args
                      if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--")]
    return found


@pytest.fixture(scope="module")
def parsers():
    return {script: importlib.import_module(script).build_parser() for script in SCRIPTS}


def test_no_two_scripts_define_a_flag_differently(parsers):
    assert disagreements(parsers) == []


def test_per_script_defaults_are_real(parsers):
    """Every listed flag exists and really differs somewhere (a stale entry would hide nothing but mislead)."""
    table = flag_table(parsers)
    assert set(PER_SCRIPT_DEFAULTS) <= set(table)
    same = [f for f in PER_SCRIPT_DEFAULTS if f != "--num_workers"  # capped to the cores: equal on a small machine
            and len({repr(parsers[script].get_default(a.dest)) for script, a in table[f].items()}) == 1]
    assert same == []


def test_every_flag_is_written_once():
    """Each long option appears in exactly one ``add_argument`` call of the entry scripts and the modules that
    build their parsers: a script takes a shared flag by calling the function that defines it."""
    sources = sorted(ROOT.glob("main_*.py")) + sorted((ROOT / "util" / "args").glob("*.py")) + [ROOT / "util" /
                                                                                                "launch.py"]
    where = defaultdict(list)
    for path in sources:
        for flag in defined_flags(path):
            where[flag].append(path.relative_to(ROOT).as_posix())
    assert {flag: places for flag, places in where.items() if len(places) > 1} == {}
    assert len(where) > 120  # the scan sees the definitions


def test_the_check_sees_a_flag_defined_differently():
    """The comparison above can fail: a script whose --pin_mem has no --no_pin_mem, whose --drop_path takes
    another type, or whose --eval is an option with a value (main_segment's own definitions once were like it)."""
    def parser(*, segment: bool) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        p.add_argument("--pin_mem", action="store_true", default=True)
        p.add_argument("--drop_path", default=0.1, type=str if segment else float)
        p.add_argument("--eval", action="store" if segment else "store_true")
        if not segment:
            p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
        return p

    bad = disagreements({"main_finetune": parser(segment=False), "main_segment": parser(segment=True)})
    assert any(line.startswith("--pin_mem:") and "--no_pin_mem" in line for line in bad)
    assert any(line.startswith("--drop_path:") and "'type'" in line for line in bad)
    assert any(line.startswith("--eval:") and "_StoreAction" in line for line in bad)
    assert disagreements({"main_finetune": parser(segment=False), "main_knn": parser(segment=False)}) == []


def test_detection_choices_are_the_models_choices(parsers):
    """util/ does not import models/, so util/args writes the detector's choices out: they must be the ones
    ``models.detectors.build_detector`` accepts (and ``util.data.det_transforms`` the augmentations)."""
    from models import detectors
    from util.data.det_transforms import TRAIN_AUGMENTATIONS
    expected = {"--detector": detectors.DETECTORS, "--box_loss": detectors.BOX_LOSSES,
                "--box_head": detectors.BOX_HEADS, "--box_head_norm": detectors.HEAD_NORMS,
                "--mask_head_norm": detectors.MASK_HEAD_NORMS, "--train_aug": TRAIN_AUGMENTATIONS}
    actions = flag_table({"main_detect": parsers["main_detect"]})
    assert {flag: list(actions[flag]["main_detect"].choices) for flag in expected} == \
           {flag: list(choices) for flag, choices in expected.items()}
