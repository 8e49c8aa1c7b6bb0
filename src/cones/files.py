"""Every file cones reads or writes goes through here: one atomic writer, one bounded safetensors reader.

(Longer than most modules because it is the one place all of cones' file safety lives: split, the writer's
and the reader's rules would drift apart again.)

Writing (`write_bytes`, `write_text`, `write_json`, `write_image`, `write_files`):

- the data goes to a temporary file in the target's folder, named `.NAME.cones-tmp-PID-XXXXXXXX`, created
  with the user's umask (like any other tool), written, flushed and fsynced;
- it then becomes the target: without `overwrite`, by an exclusive create (`os.link`, which fails if the
  name exists), so that of two runs writing the same name the second refuses with one line instead of
  silently replacing the first; with `overwrite`, by `os.replace`;
- on any error the temporary file is removed, and an `OSError` becomes one `OutputError` line such as
  `no space left on device while writing out/x.png`;
- temporary files of this naming whose process is gone (a SIGKILL between write and rename) are swept on
  the next write to the same folder;
- `write_files` writes several files all or nothing: all temporary files first, then all renames, undone
  if one fails.

`check_outputs` and `check_output_folder` are the checks every command runs before slow work: the folder
exists and is writable, the names are free unless overwriting.

Reading (`read_file`, `read_safetensors_header`, `parse_safetensors_header`): only regular files (never
`/dev/zero` or a FIFO), with the file size and the header size capped before anything large is read, and
every failure one `InputError` line naming the path and the fix.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from cones.errors import InputError, OutputError, OutputExistsError

MAX_HEADER_BYTES = 1 << 20  # a concept's header is a few KB; a Stable Diffusion UNet's about 100 KB
TEMP_MARK = ".cones-tmp-"
_TEMP_RE = re.compile(r"^\..*\.cones-tmp-(\d+)-[0-9a-f]{8}$")
_LEGACY_TEMP_RE = re.compile(r"^.+\.tmp-(\d+)(\.png)?$")  # what cones versions before 0.2 left behind
_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}

PathLike = str | os.PathLike[str]
Source = bytes | Callable[[BinaryIO], Any]


class HeaderError(InputError):
    """A malformed safetensors header; the message gives the reason only, the caller names the file."""


# -- output checks ------------------------------------------------------------------------------------


def _show(path: PathLike) -> str:
    return os.fspath(path)


def check_outputs(paths: Sequence[PathLike], *, overwrite: bool = False, flag: str | None = None) -> None:
    """Raise `OutputError` unless every path can be written: its folder exists and is writable, it is not a
    folder, and (unless `overwrite`) it does not exist. `flag` names the option in messages (`--out`)."""
    for path in paths:
        path = Path(path)
        named = f"{flag} {_show(path)!r}" if flag else repr(_show(path))
        if path.is_dir():
            raise OutputError(f"{named} is a folder; pass a file name inside it")
        parent = path.parent
        if not parent.exists():
            raise OutputError(
                f"the folder {_show(parent)!r} of {named} does not exist; create it first (mkdir -p {_show(parent)})"
            )
        if not parent.is_dir():
            raise OutputError(f"{_show(parent)!r}, the folder of {named}, is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write in the folder {_show(parent)!r} of {named}: permission denied")
        if not overwrite and (path.exists() or path.is_symlink()):
            raise OutputExistsError(f"{_show(path)} exists; pass --overwrite to replace it.")


def check_output_folder(folder: PathLike, *, flag: str | None = None) -> None:
    """Raise `OutputError` unless `folder` is a writable folder or can be created (its nearest existing
    ancestor is a writable folder)."""
    folder = Path(folder)
    named = f"{flag} {_show(folder)!r}" if flag else repr(_show(folder))
    if folder.exists():
        if not folder.is_dir():
            raise OutputError(f"{named} is a file, not a folder; pass a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write in {named}: permission denied")
        return
    ancestor = folder.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {named}: {_show(ancestor)!r} is not a writable folder")


# -- temporary files ------------------------------------------------------------------------------------


def temp_path(path: PathLike) -> Path:
    """A fresh temporary name beside `path`, of the naming that `sweep_stale_temps` recognises."""
    path = Path(path)
    return path.parent / f".{path.name[:180]}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def sweep_stale_temps(folder: PathLike) -> list[str]:
    """Remove temporary files (and folders) of cones' naming in `folder` whose process is gone; return them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_RE.match(entry.name) or _LEGACY_TEMP_RE.match(entry.name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.path)
        except OSError:
            pass  # another process swept it first, or it is not ours to remove
    return removed


def output_error(error: OSError, path: PathLike) -> OutputError:
    """One line for an `OSError` met while writing `path`."""
    if isinstance(error, OutputError):
        return error
    shown = _show(path)
    if error.errno == errno.ENOSPC:
        return OutputError(
            f"no space left on device while writing {shown}; free some space or write elsewhere"
        )
    if error.errno == errno.EDQUOT:
        return OutputError(f"disk quota exceeded while writing {shown}; free some space or write elsewhere")
    if error.errno in (errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write {shown}: permission denied")
    if error.errno == errno.EROFS:
        return OutputError(f"cannot write {shown}: the file system is read-only")
    reason = error.strerror or " ".join(str(error).split())
    return OutputError(f"cannot write {shown}: {reason}")


# -- writing ----------------------------------------------------------------------------------------------


def _write_temp(tmp: Path, source: Source) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    with os.fdopen(fd, "wb") as f:
        if isinstance(source, bytes | bytearray | memoryview):
            f.write(source)
        else:
            source(f)
        f.flush()
        os.fsync(f.fileno())


def _link_exclusive(tmp: Path, path: Path) -> None:
    """Make `tmp` the file `path`, failing if `path` exists (also if it appeared a moment ago)."""
    appeared = OutputExistsError(
        f"{_show(path)} exists (it appeared while cones was working: another run?); "
        "pass --overwrite to replace it."
    )
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise appeared from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        try:  # a file system without hard links: reserve the name exclusively, then replace it
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise appeared from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_files(items: Sequence[tuple[PathLike, Source]], *, overwrite: bool = False) -> None:
    """Write several files all or nothing; each source is bytes or a function writing to a binary file.

    Raises `OutputExistsError` if a name is taken and not `overwrite` (checked first, and again at the
    rename), `OutputError` for any other failure to write; nothing of this call is left behind then.
    """
    paths = [Path(p) for p, _ in items]
    if len(set(map(os.path.abspath, paths))) != len(paths):
        raise ValueError(f"`items` names a file twice: {[_show(p) for p in paths]}")
    check_outputs(paths, overwrite=overwrite)
    for folder in dict.fromkeys(p.parent for p in paths):
        sweep_stale_temps(folder)
    temps: list[Path] = []
    committed: list[tuple[Path, Path | None]] = []  # (target, backup of the file it replaced)
    current = paths[0] if paths else Path()
    try:
        for path, (_, source) in zip(paths, items, strict=True):
            current = path
            temps.append(temp_path(path))
            _write_temp(temps[-1], source)
        for path, tmp in zip(paths, temps, strict=True):
            current = path
            if not overwrite:
                _link_exclusive(tmp, path)
                committed.append((path, None))
                continue
            backup = None
            if len(paths) > 1 and path.exists():
                backup = temp_path(path)
                os.link(path, backup)
            os.replace(tmp, path)
            committed.append((path, backup))
    except BaseException as e:
        for path, backup in reversed(committed):
            try:
                if backup is not None:
                    os.replace(backup, path)
                else:
                    os.unlink(path)
            except OSError:
                pass
        for tmp in temps:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise output_error(e, current) from None
        raise
    for _, backup in committed:
        if backup is not None:
            try:
                os.unlink(backup)
            except OSError:
                pass
    for folder in dict.fromkeys(p.parent for p in paths):
        _fsync_folder(folder)


def write_bytes(path: PathLike, data: Source, *, overwrite: bool = False) -> None:
    """Write one file atomically (see the module docstring)."""
    write_files([(path, data)], overwrite=overwrite)


def write_text(path: PathLike, text: str, *, overwrite: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def write_json(path: PathLike, value: Any, *, overwrite: bool = False, indent: int | None = 2) -> None:
    write_text(path, json.dumps(value, indent=indent) + "\n", overwrite=overwrite)


def image_writer(image, path: PathLike) -> Callable[[BinaryIO], None]:
    """A source for `write_files` that saves a PIL image in the format of `path`'s suffix."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    kind = Image.registered_extensions().get(suffix, "PNG")
    return lambda f: image.save(f, format=kind)


def write_image(image, path: PathLike, *, overwrite: bool = False) -> None:
    """Write a PIL image atomically, in the format of `path`'s suffix (PNG when unknown)."""
    write_bytes(path, image_writer(image, path), overwrite=overwrite)


# -- reading ----------------------------------------------------------------------------------------------


def _open_regular(path: PathLike, hint: str) -> tuple[int, int]:
    """(file descriptor, size) of a regular file; `InputError` naming the path and `hint` otherwise."""
    shown = _show(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"cannot read {shown!r}: it does not exist; {hint}") from None
    except OSError as e:
        raise InputError(f"cannot read {shown!r}: {e.strerror or e}; {hint}") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"cannot read {shown!r}: it is a folder, not a file; {hint}")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(
            f"cannot read {shown!r}: it is not a regular file (a device, pipe or socket); {hint}"
        )
    try:  # O_NONBLOCK: a FIFO swapped in after the stat cannot block the open
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InputError(f"cannot read {shown!r}: {e.strerror or e}; {hint}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise InputError(
            f"cannot read {shown!r}: it is not a regular file (a device, pipe or socket); {hint}"
        )
    return fd, info.st_size


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    return data if data is not None else b""


def read_file(path: PathLike, *, max_bytes: int, what: str = "file", hint: str = "") -> bytes:
    """The bytes of a regular file of at most `max_bytes`, checked before it is read."""
    hint = hint or f"pass {what}"
    fd, size = _open_regular(path, hint)
    with os.fdopen(fd, "rb") as f:
        if size > max_bytes:
            raise InputError(
                f"cannot read {_show(path)!r}: it has {size:,} bytes, more than the {max_bytes:,} {what} may have"
            )
        data = _read_exactly(f, max_bytes + 1)
    if len(data) > max_bytes:  # it grew while being read
        raise InputError(
            f"cannot read {_show(path)!r}: it has over {max_bytes:,} bytes, more than {what} may have"
        )
    return data


def _reject_constant(name: str) -> Any:
    raise HeaderError(f"the header holds the non-JSON constant {name}")


def loads_json(text: str | bytes, what: str) -> Any:
    """`json.loads` that refuses NaN/Infinity and deep nesting with one `HeaderError` line."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"{what} is not JSON ({e})") from None
    except RecursionError:
        raise HeaderError(f"{what} is nested too deeply") from None


def parse_safetensors_header(
    data: bytes, *, max_header: int = MAX_HEADER_BYTES
) -> tuple[dict[str, Any], int]:
    """(header object, offset of the tensor data) of a safetensors file's bytes (or its first bytes)."""
    if len(data) < 8:
        raise HeaderError(f"it has {len(data)} bytes, too few for a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > max_header:
        raise HeaderError(
            f"it declares a {size:,}-byte header, more than the {max_header:,} bytes this reader accepts"
        )
    if size > len(data) - 8:
        raise HeaderError(
            f"it declares a {size}-byte header but holds {len(data) - 8} bytes after the size field"
        )
    header = loads_json(data[8 : 8 + size], "its safetensors header")
    if not isinstance(header, dict):
        raise HeaderError("its safetensors header is not a JSON object")
    return header, 8 + size


def read_safetensors_header(
    path: PathLike, *, max_header: int = MAX_HEADER_BYTES, hint: str = "pass a safetensors file"
) -> tuple[dict[str, Any], int, int]:
    """(header object, offset of the tensor data, file size) of a safetensors file on disk, reading only
    its header; `InputError` naming the path for a missing, irregular or malformed file."""
    fd, size = _open_regular(path, hint)
    with os.fdopen(fd, "rb") as f:
        head = _read_exactly(f, 8)
        declared = int.from_bytes(head, "little") if len(head) == 8 else 0
        body = _read_exactly(f, min(declared, max_header + 1, max(size - 8, 0)))
    try:
        header, offset = parse_safetensors_header(head + body, max_header=max_header)
    except HeaderError as e:
        raise InputError(f"cannot read {_show(path)!r}: {e}; {hint}") from None
    return header, offset, size


def read_tensor_bytes(path: PathLike, header: dict[str, Any], offset: int, size: int, name: str) -> bytes:
    """The raw bytes of tensor `name` of a safetensors file whose header `read_safetensors_header` gave."""
    entry = header.get(name)
    span = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (
        not isinstance(span, list)
        or len(span) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)
        or not 0 <= span[0] <= span[1] <= size - offset
    ):
        raise InputError(f"cannot read {_show(path)!r}: tensor `{name}` has bad data offsets {span!r}")
    fd, _ = _open_regular(path, "pass a safetensors file")
    with os.fdopen(fd, "rb") as f:
        f.seek(offset + span[0])
        data = _read_exactly(f, span[1] - span[0])
    if len(data) != span[1] - span[0]:
        raise InputError(f"cannot read {_show(path)!r}: it ends inside tensor `{name}`")
    return data
