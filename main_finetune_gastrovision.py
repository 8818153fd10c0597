"""The medical seed's (004) GastroVision fine-tuning script: ``main_finetune.py``, same flags
(its recipe: ``configs/finetune/mae_gastrovision.yaml``)."""
from engine.train import NonFiniteLossError
from main_finetune import main
from util.runtime import run_cli

if __name__ == "__main__":
    run_cli(main, NonFiniteLossError)
