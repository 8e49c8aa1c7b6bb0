"""cones' own exception types: one small hierarchy under `ConesError`.

Every error that cones raises because of what it was given (a damaged file, a concept for another base
model, an output that cannot be written, a search that cannot go on) is a `ConesError` whose message is one
line naming the path or argument and the fix. The command line prints that line and exits with code 1; the
Python API raises the same exception with the same message. Each type also derives from the built-in type
that a caller would have caught before (`ValueError`, `OSError`, `FileExistsError`, `RuntimeError`), so
existing `except` clauses keep working.
"""

from __future__ import annotations


class ConesError(Exception):
    """Base of every error cones raises about its inputs or outputs; the message is one line."""


class InputError(ConesError, ValueError):
    """An input file that cannot be used: missing, a folder, not a regular file, too large, malformed."""


class ConceptMismatchError(ConesError, ValueError):
    """A concept that does not belong to this base model (other layers, shapes or weights)."""


class OutputError(ConesError, OSError):
    """An output that cannot be written: no folder, no permission, no space left."""


class OutputExistsError(OutputError, FileExistsError):
    """An output file exists (or appeared while cones was working) and overwriting was not asked for."""


class ConesWarning(Warning):
    """Something the user should know that does not stop cones, e.g. a concept applied with `force=True`."""
