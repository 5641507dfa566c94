"""What a valid value is, for every flag of every command: numbers finite and in range, paths of the right kind.

``carlrar.config.check`` applies these rules to the config dataclasses from the bounds each declares (a numeric
field without a bound is a programming error, raised on first use), so training, search and attack options, their
YAML keys and the Python API are checked before anything runs. ``number``, ``path`` and ``text`` make argparse types
of the same rules for the commands' own flags, and ``ArgumentParser`` (every command's parser, below) refuses an option declared without
such a type: a new flag cannot skip the checks.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from pathlib import Path

from carlrar.errors import UserError

SEED_MAX = 2**32 - 1  # numpy's seeds (set_seed) stop here


def number_problem(value, whole: bool, low=None, high=None, above=None) -> str | None:
    """Why ``value`` is not a number of the kind and range, or None. ``low`` / ``high`` inclusive, ``above``
    exclusive."""
    kind = "a whole number" if whole else "a finite number"
    show = lambda x: f"{x}" if isinstance(x, int) else f"{x:g}"  # noqa: E731  (2**32 - 1 in full, 1e-06 short)
    if low is not None and high is not None:
        wanted = f"{kind} in [{show(low)}, {show(high)}]"
    elif above is not None or low is not None:
        wanted = f"{kind} > {show(above)}" if above is not None else f"{kind} ≥ {show(low)}"
    else:
        wanted = kind
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        return f"must be {wanted}"
    if not math.isfinite(value) or (low is not None and value < low) or (above is not None and value <= above) \
            or (high is not None and value > high):
        return f"must be {wanted}"
    return None


def check_number(name: str, value, whole: bool, low=None, high=None, above=None):
    problem = number_problem(value, whole, low, high, above)
    if problem:
        raise UserError(f"{name} = {value!r}: {problem}")


def path_problem(value: str, kind: str, name: str = "") -> str | None:
    """Why ``value`` is not a path of ``kind``, or None. Kinds: file (an existing file), dir (an existing folder),
    new_file (a file to write), new_dir (a folder to write; missing folders are made, in a writable folder),
    model (a hub name, or an existing local folder), run (a folder, once it exists)."""
    p = Path(value)
    if "\0" in value or not value:
        return "not a usable path"
    if kind == "file":
        return "is a directory, expected a file" if p.is_dir() else None if p.is_file() else "file not found"
    if kind == "dir":
        return None if p.is_dir() else "is a file, expected a directory" if p.exists() else "no such directory"
    if kind in ("run", "model"):
        local = value.startswith((".", "/", "~")) or os.sep in value.rstrip(os.sep)
        if p.exists() and not p.is_dir():
            return "is a file, expected a directory"
        return "no such model directory" if kind == "model" and local and not p.exists() else None
    if kind in ("new_file", "new_dir"):  # missing folders are made when written
        if kind == "new_file" and p.is_dir():
            return "is a directory, expected a file"
        if kind == "new_dir" and p.exists() and not p.is_dir():
            return "is a file, expected a directory"
        existing = next(a for a in (p, *p.absolute().parents) if a.exists())
        if existing != p and not existing.is_dir():
            return f"cannot create the {name + ' ' if name else ''}folder: {existing} is a file"
        return _writable(existing)
    raise ValueError(f"unknown path kind {kind!r}")


def _writable(p: Path) -> str | None:
    return None if os.access(p, os.W_OK) else f"cannot write to {p} (no permission or a read-only file system)"


def check_path(value: str | None, kind: str, name: str = ""):
    problem = value is not None and path_problem(str(value), kind, name)
    if problem:
        raise UserError(f"{value}: {problem}")


def checks_value(parse):
    """Mark an argparse type ``parse(text, name)`` as one that checks its value and reports a bad one as a
    ``UserError`` naming the option (``ArgumentParser`` binds ``name`` and accepts only such types)."""
    parse.checks_value = True
    return parse


def number(whole: bool = False, low=None, high=None, above=None):
    """A number of the kind and range."""

    def parse(text: str, name: str):
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            value = text
        check_number(name, value, whole, low, high, above)
        return value

    parse.limits = {"whole": whole, "low": low, "high": high, "above": above}  # for tests/test_fuzz_flags.py
    return checks_value(parse)


def parsed(kind: type):
    """A number parsed as ``kind``, whose range a config dataclass checks (the attack's knobs: AttackConfig)."""

    def parse(value: str, name: str):
        try:
            return kind(value)
        except ValueError:
            raise UserError(f"{name} = {value!r}: expected a {'whole ' if kind is int else ''}number") from None

    return checks_value(parse)


def path(kind: str):
    """A path of ``kind`` (see ``path_problem``)."""

    def parse(text: str, name: str):
        check_path(text, kind, name)
        return text

    parse.kind = kind
    return checks_value(parse)


@checks_value
def text(value: str, name: str) -> str:
    """A non-empty string without NUL bytes (names, columns, comma-separated lists)."""
    if not value.strip() or "\0" in value:
        raise UserError(f"{name} = {value!r}: must be a non-empty text")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad flags as a one-line user error instead of a usage block, and that takes every
    ``--a-b`` option as ``--a_b`` too: ``carlrar train`` (HfArgumentParser) takes both, so one spelling works in
    every command. --help shows the dashed spelling."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")

    def add_argument(self, *names, **kwargs):
        """A checking type of ``carlrar.validation`` learns the option's name, for its one-line error. Every option
        of every command has one (or ``choices``, or is a switch): tests/test_fuzz_flags.py holds them to it."""
        rule = kwargs.get("type")
        if getattr(rule, "checks_value", False):
            kwargs["type"] = functools.partial(rule, name=names[0].lstrip("-").replace("-", "_"))
        return super().add_argument(*names, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        end = args.index("--") if "--" in args else len(args)  # after "--" everything is a positional value
        return super().parse_known_args([*map(self._dashed, args[:end]), *args[end:]], namespace)

    def _dashed(self, arg: str) -> str:
        """``--a_b`` (or ``--a_b=V``) → ``--a-b`` when that is an option here; anything else is left as it is."""
        flag, eq, value = arg.partition("=")
        dashed = "--" + flag[2:].replace("_", "-")
        if flag.startswith("--") and dashed != flag and dashed in self._option_string_actions:
            return dashed + eq + value
        return arg
