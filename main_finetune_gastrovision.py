"""The MAE-on-GastroVision fine-tuning script: ``main_finetune.py``, same flags
(its recipe: ``configs/finetune/mae_gastrovision.yaml``)."""
from main_finetune import cli

if __name__ == "__main__":
    cli()
