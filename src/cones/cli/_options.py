"""Command-line flags generated from a config dataclass, so that help texts live in one place."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
import typing
import warnings


def add_config_arguments(
    parser, config_cls, skip: tuple[str, ...] = (), model_defaults: bool = False
) -> None:
    """One `--flag` per field of `config_cls`, with its metadata help and default shown.

    With `model_defaults`, a flag not given parses as None and the help says that the model may set its
    own default (`FindConfig.for_model`); `config_from_args(..., base=...)` then fills it in."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        flag = "--" + f.name.replace("_", "-")
        shown = " ".join(f.default) if isinstance(f.default, tuple) else f.default
        help_text = (
            f.metadata.get("help", "")
            + f" (default: {shown}"
            + (", or the model's" if model_defaults else "")
            + ")"
        )
        default = None if model_defaults else (list(f.default) if isinstance(f.default, tuple) else f.default)
        if typing.get_origin(kind) is tuple:
            parser.add_argument(flag, nargs="+", default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def config_from_args(config_cls, args, base=None, **overrides):
    """Build `config_cls` from parsed flags: fields missing from `args` (or None there, when `base` is
    given) keep `base`'s values (or the class defaults)."""
    values = dataclasses.asdict(base) if base is not None else {}
    for f in dataclasses.fields(config_cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            if value is None and base is not None:
                continue
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


def add_model_arguments(parser, *, dtype: bool = True, config: bool = True, device: bool = True) -> None:
    """The flags that choose the base model and where it runs, the same in every command."""
    parser.add_argument(
        "--model",
        default=None,
        help="Stable Diffusion folder or single-file checkpoint (default: the embedded model)",
    )
    if config:
        parser.add_argument(
            "--config",
            default=None,
            help="a local diffusers folder of the same SD version, for a single-file --model checkpoint",
        )
    if device:
        parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    if dtype:
        parser.add_argument(
            "--dtype",
            default="fp32",
            choices=("fp32", "fp16", "bf16"),
            help="weights' precision; fp16/bf16 on a GPU (default: fp32)",
        )
