"""LocalMIM / ViTFreeze's name for ``main_finetune.py`` (seed 003 calls it): same flags, same run."""
from main_finetune import cli

if __name__ == "__main__":
    cli()
