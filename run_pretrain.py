"""LocalMIM / ViTFreeze's name for ``main_pretrain.py`` (seed 003 calls it): same flags, same run."""
from engine.train import NonFiniteLossError
from main_pretrain import main
from util.runtime import run_cli

if __name__ == "__main__":
    run_cli(main, NonFiniteLossError)
