"""Command-line values: one rule and one wording for every entry point.

The `moa-depthclip` CLI (argparse, subcommands) uses the argparse types `positive_int`, `non_negative_int` and
`positive_float`; the example scripts declare their settings as dataclasses parsed with transformers'
`HfArgumentParser` (`parse_settings`) and check the same rules in `__post_init__` (`check_values`). Either way a bad
value ends the command with one line, `PROG: error: --flag: reason`, and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Callable, NoReturn, Sequence, TypeVar

from transformers import HfArgumentParser

__all__ = [
    "ArgumentValueError",
    "check_pairs",
    "check_values",
    "exit_with_error",
    "non_negative_int",
    "parse_settings",
    "positive_float",
    "positive_int",
]

Settings = TypeVar("Settings")


class ArgumentValueError(ValueError):
    """A command-line value that cannot be used: `str(error)` is `--flag: reason`."""

    def __init__(self, flag: str, reason: str):
        self.flag, self.reason = flag, reason
        super().__init__(f"{flag}: {reason}")


# name -> (conversion, test, what is expected)
_RULES: dict[str, tuple[Callable, Callable, str]] = {
    "positive_int": (int, lambda v: v > 0, "a positive integer"),
    "non_negative_int": (int, lambda v: v >= 0, "an integer >= 0"),
    "positive_float": (float, lambda v: v > 0 and math.isfinite(v), "a positive finite number"),
}


def _check(rule: str, value):
    """`value` converted by `rule`, or ValueError("expected ..., got ...")."""
    convert, test, expected = _RULES[rule]
    try:
        converted = convert(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected {expected}, got {value!r}") from None
    if isinstance(value, float) and convert is int and converted != value:
        raise ValueError(f"expected {expected}, got {value}")
    if not test(converted):
        raise ValueError(f"expected {expected}, got {value}")
    return converted


def _argparse_type(rule: str):
    def convert(text: str):
        try:
            return _check(rule, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = rule
    return convert


positive_int = _argparse_type("positive_int")
non_negative_int = _argparse_type("non_negative_int")
positive_float = _argparse_type("positive_float")


def check_values(settings, **rules: Sequence[str]):
    """Check the named fields of `settings` by rule (`positive_int=("batch_size",)`, ...); None means unset.

    A list field is checked item by item. Raises `ArgumentValueError` naming the flag.
    """
    for rule, names in rules.items():
        for name in names:
            value = getattr(settings, name)
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if item is None:
                    continue
                try:
                    _check(rule, item)
                except ValueError as error:
                    raise ArgumentValueError(f"--{name}", str(error)) from None


def check_pairs(settings, *names: str):
    """Fields given as `--flag HEIGHT WIDTH` (argparse gives them as lists): two values each; stored as tuples."""
    for name in names:
        value = getattr(settings, name)
        if value is None:
            continue
        if len(value) != 2:
            raise ArgumentValueError(f"--{name}", f"expected 2 values (HEIGHT WIDTH), got {len(value)}")
        setattr(settings, name, tuple(value))


def exit_with_error(prog: str, message) -> NoReturn:
    """The one way a command ends on a bad value: one line on stderr, exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _SettingsParser(HfArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse's own errors ("argument --x_y/--x-y: invalid int value") in the rules' one-line wording
        exit_with_error(self.prog, re.sub(r"^argument (--[\w-]+)(/--[\w-]+)*: ", r"\1: ", message))


def parse_settings(settings_class: type[Settings], argv: Sequence[str] | None, prog: str, description: str) -> Settings:
    """Parse `argv` (default: `sys.argv[1:]`) into a `settings_class` dataclass with transformers' HfArgumentParser.

    Every flag is the dataclass field's name; its `__post_init__` checks the values. A bad value exits with one line.
    """
    parser = _SettingsParser(settings_class, prog=prog, description=description)
    try:
        settings, remaining = parser.parse_args_into_dataclasses(
            None if argv is None else list(argv), return_remaining_strings=True, look_for_args_file=False
        )
    except ArgumentValueError as error:
        exit_with_error(prog, error)
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    return settings
