"""MoCo v3's ``convert_to_deit.py`` (its transfer README runs it) from the repository root: runs ``tools/convert_to_deit.py``."""
import sys

from tools.convert_to_deit import main

if __name__ == "__main__":
    sys.exit(main())
