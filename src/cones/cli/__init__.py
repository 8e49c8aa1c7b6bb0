"""The `cones` command: one module per subcommand, each a thin call into the library.

Every module in this package that defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`
is a subcommand; adding a command is adding a file. Installed packages add theirs through the
`cones.commands` entry points (`cones.registry.command_modules`): the embedded world's `demo` and
`train-world` come that way. A user error prints one line and a hint; the
traceback appears only with `--debug` (or CONES_DEBUG=1).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import textwrap

from cones.errors import ConesError


class UsageError(ConesError):
    """A mistake in what the user asked for; printed as one line, no traceback."""


# Commands that run the model for long: they take --threads (see cones.threads).
HEAVY = frozenset({"find", "generate", "demo", "refine", "evaluate", "attention", "app", "bake"})


def add_threads_argument(parser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch; 0 (default): 1 on a machine of 2 cores or fewer, else the cores "
        "that other programs leave free, so that a busy machine slows cones in proportion",
    )


def _commands() -> dict:
    commands = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            commands[module.NAME] = module
    from cones.registry import command_modules

    for module in command_modules():
        commands[module.NAME] = module
    return dict(sorted(commands.items()))


EXAMPLE_STARTS = ("cones ", "torchrun ", "python ")


def split_examples(doc: str) -> tuple[str, str]:
    """A command module's docstring as (description, examples): its indented command lines move to the end
    of `--help`, where a reader who has just seen the options looks for how to put them together."""
    prose, examples = [], []
    for paragraph in (doc or "").strip().split("\n\n"):
        lines = paragraph.splitlines()
        is_example = lines[0].lstrip().startswith(EXAMPLE_STARTS) and all(
            line.lstrip().startswith(EXAMPLE_STARTS) or line.startswith("  ") for line in lines
        )
        if is_example:
            examples.append(textwrap.indent(textwrap.dedent(paragraph), "  "))
        else:
            prose.append(paragraph)
    return "\n\n".join(prose), "examples:\n" + "\n".join(examples) if examples else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cones",
        description="Concept neurons in diffusion models: find them, shut them, store and combine them.",
        epilog="examples:\n"
        "  cones demo                        # the whole job on the embedded model, in minutes on a CPU\n"
        "  cones find --images photos/ --token sks --class-word dog --out dog.cones --model sd15/\n"
        "  cones COMMAND --help              # each command's options and examples",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _commands().items():
        description, examples = split_examples(module.__doc__)
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=description,
            epilog=examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        if name in HEAVY and "threads" not in {a.dest for a in p._actions}:
            add_threads_argument(p)
        p.set_defaults(_run=module.run)
    return parser


def _quiet_libraries() -> None:
    """Keep the libraries' loading bars, deprecation notes and info logs out of a user's terminal."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("CONES_DEBUG") == "1"
    if not debug:
        _quiet_libraries()
    try:
        if hasattr(args, "threads"):
            from cones.threads import configure

            configure(args.threads)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("cones: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug or not _is_user_error(e):
            raise
        print(f"cones {args.command}: error: {e}", file=sys.stderr)
        return 1


def _is_user_error(error: Exception) -> bool:
    """Errors whose one-line message tells the user what to change (bad input, a search that cannot go on).

    A `SearchError` can only come from a search that was imported, so its module is looked up, not imported.
    """
    kinds: tuple[type[Exception], ...] = (ConesError, ValueError, FileExistsError, FileNotFoundError, OSError)
    search = sys.modules.get("cones.search")
    if search is not None:
        kinds += (search.SearchError,)
    return isinstance(error, kinds)


if __name__ == "__main__":
    sys.exit(main())
