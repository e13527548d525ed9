"""argparse types shared by the commands: a bad value is argparse's one-line error naming the option."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from dreamshot.config.values import AT_LEAST_ONE, SEED_LIMIT, Rule


def seed_value(text: str) -> int:
    """A noise or data seed: torch, numpy and Lightning take [0, 2**32)."""
    value = int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a seed in 0..{SEED_LIMIT - 1}, got {value}")
    return value


def ruled(rule: Rule, parse: type[int] | type[float] = int) -> Callable[[str], int | float]:
    """The argparse type of a value that `parse` reads and `rule` bounds (a rule of dreamshot/config/values.py,
    so an option and its config key take the same values)."""
    noun = "an integer" if parse is int else "a number"

    def value(text: str) -> int | float:
        parsed = parse(text)
        if not rule.holds(parsed):
            raise argparse.ArgumentTypeError(f"expected {noun} {rule.what}, got {parsed}")
        return parsed

    value.__name__ = parse.__name__  # argparse words unparsable text as "invalid int value: 'x'"
    return value


positive_int = ruled(AT_LEAST_ONE)
