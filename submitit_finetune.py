"""MAE's ``submitit_finetune.py`` (the MAE-on-GastroVision / HyperKvasir commands call it): ``main_finetune.py`` submitted to SLURM through submitit.

Takes MAE's options (``--job_dir --nodes --ngpus --timeout --partition --use_volta32 --comment``) and the
fine-tuning flags; equivalent to ``python main_finetune.py --launcher slurm ...`` (see ``util/launch.py``).
"""
import sys

from main_finetune import cli, main as finetune_main


def with_slurm(argv: list[str]) -> list[str]:
    """``argv`` with ``--launcher slurm`` first, unless it names a ``--launcher``."""
    given = any(a == "--launcher" or a.startswith("--launcher=") for a in argv)
    return list(argv) if given else ["--launcher", "slurm", *argv]


def main(argv: list[str] | None = None) -> dict:
    return finetune_main(with_slurm(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    cli(with_slurm(sys.argv[1:]))
