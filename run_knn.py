"""ViTFreeze's name for ``main_knn.py`` (the ViTFreeze commands call it): same flags, same run."""
from main_knn import cli

if __name__ == "__main__":
    cli()
