"""The MAE-on-HyperKvasir fine-tuning script: ``main_finetune.py`` with the same flags, on the
dataset's official 2-fold split (recipe: ``configs/finetune/mae_hyperkvasir.yaml``).

The published command names no split file: when ``--split_file`` is not given and HyperKvasir's own
``official_splits/2_fold_split.csv`` lies in ``--data_path`` or one of its two parents (the GitHub repository's
layout next to ``labeled-images/``), it is used, both folds run, and the log says so.
"""
import logging
import sys
from pathlib import Path

from main_finetune import cli, main as finetune_main

OFFICIAL_SPLIT = Path("official_splits") / "2_fold_split.csv"


def official_split(argv: list[str]) -> Path | None:
    """HyperKvasir's official split file near ``--data_path`` of ``argv``, or None (or when one is given)."""
    flags = [a.split("=", 1)[0].replace("-", "_") for a in argv]
    if "__split_file" in flags:
        return None
    for i, flag in enumerate(flags):
        if flag == "__data_path":
            root = Path(argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1]).expanduser()
            return next((base / OFFICIAL_SPLIT for base in (root, root.parent, root.parent.parent)
                         if (base / OFFICIAL_SPLIT).is_file()), None)
    return None


def with_official_split(argv: list[str]) -> list[str]:
    """``argv`` plus ``--split_file`` of :func:`official_split`, when there is one (and says so in the log)."""
    split = official_split(argv)
    if split is None:
        return list(argv)
    logging.getLogger("vitfreeze").warning("HyperKvasir: using the official split %s (both folds)", split)
    return [*argv, "--split_file", str(split)]


def main(argv: list[str] | None = None) -> dict:
    return finetune_main(with_official_split(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    cli(with_official_split(sys.argv[1:]))
