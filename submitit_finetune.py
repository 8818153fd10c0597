"""MAE's ``submitit_finetune.py`` (seed 004): ``main_finetune.py`` submitted to SLURM through submitit.

Takes MAE's options (``--job_dir --nodes --ngpus --timeout --partition --use_volta32 --comment``) and the
fine-tuning flags; equivalent to ``python main_finetune.py --launcher slurm ...`` (see ``util/launch.py``).
"""
import sys

from engine.train import NonFiniteLossError
from main_finetune import main as finetune_main
from util.runtime import run_cli


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    given = any(a == "--launcher" or a.startswith("--launcher=") for a in argv)
    return finetune_main(argv if given else ["--launcher", "slurm", *argv])


if __name__ == "__main__":
    run_cli(main, NonFiniteLossError)
