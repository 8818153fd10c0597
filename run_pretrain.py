"""LocalMIM / ViTFreeze's name for ``main_pretrain.py`` (the ViTFreeze commands call it): same flags, same run."""
from main_pretrain import cli

if __name__ == "__main__":
    cli()
