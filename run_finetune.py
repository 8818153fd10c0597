"""LocalMIM / ViTFreeze's name for ``main_finetune.py`` (the ViTFreeze commands call it): same flags, same run."""
from main_finetune import cli

if __name__ == "__main__":
    cli()
