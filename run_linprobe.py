"""LocalMIM / ViTFreeze's name for ``main_linprobe.py`` (the ViTFreeze commands call it): same flags, same run."""
from main_linprobe import cli

if __name__ == "__main__":
    cli()
