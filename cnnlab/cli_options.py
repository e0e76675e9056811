"""Options of the ``cnnlab`` grammar that check their own values: numbers in a range, and on/off
switches that leave the default to the config or the preset. Nothing here imports torch."""
from __future__ import annotations

import argparse
import math


def number(g, flag: str, kind, low=None, metavar=None, **kw) -> None:
    """A number option, a bad value a parse error: at least ``low`` (above it if ``above``), below ``below``."""
    above, below, words = kw.pop("above", False), kw.pop("below", None), kw.pop("words", ())

    def parse(text):
        if text in words:  # a word the option takes besides numbers (--lr auto)
            return text
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {'an integer' if kind is int else 'a number'}"
                                             f"{''.join(f' or {w}' for w in words)}, not '{text}'") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{flag} must be a finite number, not '{text}'")
        if low is not None and (value < low or (above and value == low)):
            raise argparse.ArgumentTypeError(f"{flag} must be {'above' if above else 'at least'} {low:g}, got {text}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"{flag} must be below {below:g}, got {text}")
        return value
    g.add_argument(flag, type=parse, metavar=metavar, **kw)


def switch(g, flag: str, help: str) -> None:
    """``--flag`` / ``--no-flag``; unset (None) lets the config's or the preset's value apply."""
    g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
