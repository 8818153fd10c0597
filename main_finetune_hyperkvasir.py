"""The medical seed's (004) HyperKvasir fine-tuning script: ``main_finetune.py``, same flags. The official 2-fold
split goes to ``--split_file official_splits/2_fold_split.csv`` (recipe: ``configs/finetune/mae_hyperkvasir.yaml``)."""
from engine.train import NonFiniteLossError
from main_finetune import main
from util.runtime import run_cli

if __name__ == "__main__":
    run_cli(main, NonFiniteLossError)
