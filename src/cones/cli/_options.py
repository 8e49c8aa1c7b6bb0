"""Command-line flags generated from a config dataclass, so that help texts live in one place."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
import typing
import warnings


def add_config_arguments(parser, config_cls, skip: tuple[str, ...] = ()) -> None:
    """One `--flag` per field of `config_cls`, with its metadata help and default shown."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + " (default: %(default)s)"
        if typing.get_origin(kind) is tuple:
            parser.add_argument(flag, nargs="+", default=list(f.default), help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=help_text)


def config_from_args(config_cls, args, **overrides):
    """Build `config_cls` from parsed flags (fields missing from `args` keep their defaults)."""
    values = {}
    for f in dataclasses.fields(config_cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    values.update(overrides)
    return config_cls(**values)


@contextlib.contextmanager
def reported_warnings(command: str):
    """Print each `ConesWarning` raised inside the block once, as one `cones COMMAND: warning: ...` line."""
    from cones.errors import ConesWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConesWarning)
        try:
            yield
        finally:
            seen = dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, ConesWarning))
            for message in seen:
                print(f"cones {command}: warning: {message}", file=sys.stderr)
