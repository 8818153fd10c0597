"""ViT-Adapter's ``convert_14to16.py`` (its DINOv2 detection README runs it) from the repository root: runs ``tools/convert_14to16.py``."""
import sys

from tools.convert_14to16 import main

if __name__ == "__main__":
    sys.exit(main())
