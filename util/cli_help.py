"""``--help`` that shows every flag's default, as ``argparse.ArgumentDefaultsHelpFormatter`` does, but quietly for
flags where a default says nothing (switches, None, empty) or whose help text already spells its default."""
from __future__ import annotations

import argparse
import copy


def _says_nothing(action: argparse.Action) -> bool:
    return (action.default in (None, False, "", argparse.SUPPRESS) or action.nargs == 0
            or not action.option_strings)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after each flag's help; flags without help get ``default: X`` as their help."""

    def add_argument(self, action: argparse.Action) -> None:
        if action.help is None and not _says_nothing(action):
            action = copy.copy(action)  # the parser's own action keeps help=None
            action.help = "default: %(default)s"
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _says_nothing(action) or "default" in text.lower():
            return text
        return super()._get_help_string(action)
