"""LocalMIM / ViTFreeze's name for ``main_linprobe.py`` (seed 003 calls it): same flags, same run."""
from main_linprobe import cli

if __name__ == "__main__":
    cli()
