"""Value types of the flags: argparse ``type=`` callables that refuse a bad value in the flag's words
(``argparse.ArgumentTypeError`` becomes ``error: argument --epochs: must be an integer >= 1, got 0``)."""
from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


MAX_LEARNING_RATE = 1e30  # Adam's first step is lr / (1 - beta1) in float32, which overflows near 3.4e38


def learning_rate(text: str) -> float:
    """A positive learning rate below :data:`MAX_LEARNING_RATE` (a larger one fails inside the optimizer with "value
    cannot be converted to type float without overflow"; anything far below it already blows the weights up, which
    the epoch end reports in one line)."""
    value = positive_float(text)
    if value >= MAX_LEARNING_RATE:
        raise argparse.ArgumentTypeError(f"must be below {MAX_LEARNING_RATE:g} (the optimizer's float32 arithmetic "
                                         f"overflows), got {text}")
    return value


def closed_fraction(text: str) -> float:
    """A float in [0, 1] (e.g. a probability)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def open_fraction(text: str) -> float:
    """A float strictly between 0 and 1 (e.g. a mask ratio)."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value


def half_open_fraction(text: str) -> float:
    """A float in (0, 1] (e.g. FreezeOut's t_0, where 1 means no early freezing)."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value

