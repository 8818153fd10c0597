"""The two-stage parse of every entry script: flags brought to this parser's spelling, ``--config`` recipe as
defaults, the command line over it, then the checks that need both (FreezeOut implied, warmup within the run)."""
from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any, Sequence

from util.args.checks import check_schedule, imply_freezeout
from util.args.config import (DEIT_SPELLINGS, FOREIGN_FLAGS, IGNORED_FLAGS, deit_lr, flag_of, load_config,
                              warn_once)
from util.runtime import command_line_error, quiet_on_other_ranks


def normalize_argv(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` in this parser's spelling: hyphenated flags (DeiT's ``--batch-size``, ``--data-set``) become ours
    (``--batch_size``), DeiT's no-op flags are dropped, and an option of no meaning here, or an unknown one, stops
    with one line that names it and says what to use instead (or the nearest flags).

    Raises:
        SystemExit: through ``parser.error`` (exit status 2), for a foreign or unknown flag.
    """
    options = {opt for action in parser._actions for opt in action.option_strings}
    out: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token, flag = tokens[i], flag_of(tokens[i])
        i += 1
        if flag is None or flag in options:
            out.append(token)
            continue
        spelled = "--" + flag[2:].replace("-", "_")
        if spelled in options:
            out.append(spelled + token[len(flag):])
        elif spelled in IGNORED_FLAGS:
            takes, note = IGNORED_FLAGS[spelled]
            i += takes if "=" not in token else 0
            if note:
                warn_once("%s ignored: %s", flag, note)
        elif spelled in FOREIGN_FLAGS:
            parser.error(f"{flag} has no meaning here: {FOREIGN_FLAGS[spelled]}")
        else:
            names = sorted(o for o in options if o.startswith("--"))
            close = difflib.get_close_matches(spelled, names, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (--help lists the flags)"
            parser.error(f"unrecognized argument {flag}{hint}")
    if "--blr" in options and any(flag_of(t) in DEIT_SPELLINGS for t in tokens):
        out = deit_lr(out)
    return out


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the options that ``argv`` (already normalised) gives explicitly."""
    by_flag = {opt: action.dest for action in parser._actions for opt in action.option_strings}
    return {by_flag[flag] for token in argv if (flag := flag_of(token)) in by_flag}


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Two-stage parse: ``--config`` sets defaults, the command line overrides them.

    Flags are first brought to this parser's spelling (:func:`normalize_argv`). Errors in the recipe are reported
    in one line without the usage block (exit status 2, as argparse's). Any FreezeOut flag given explicitly (on the
    command line or in the recipe, whatever its value) turns ``--freezeout`` on, with one line that says so.
    """
    argv = normalize_argv(quiet_on_other_ranks(parser), sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    recipe: dict[str, Any] = {}
    if pre.config:
        try:
            recipe = load_config(pre.config, parser)
        except (FileNotFoundError, ValueError) as err:
            command_line_error(str(err))
        parser.set_defaults(**recipe)
    args = parser.parse_args(argv)
    given = explicit_dests(parser, argv)
    if hasattr(args, "freezeout"):
        imply_freezeout(args, parser, given, recipe)
    check_schedule(args, parser, given, recipe)
    return args
