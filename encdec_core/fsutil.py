"""Atomic output directories and files: everything is written to a temp path beside the target and
renamed at the end, so a failure leaves no half-written checkpoint, engine or report.

Output paths are checked before any work starts (``check_output_dir`` / ``check_output_file``): a
directory that exists is replaced only when it is empty or holds an encdec checkpoint or engine, so
a mistyped ``--output-dir`` (the model's own folder, a folder of other files) is refused instead of
deleted."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import EncDecError

# (file, value of its "format" field): a directory holding one of these is ours to replace
_OUR_FORMATS = (("config.json", "encdec-checkpoint"), ("engine.json", "encdec-engine"))


def _is_ours(d: Path) -> bool:
    for name, fmt in _OUR_FORMATS:
        try:
            with open(d / name, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == fmt:
            return True
    return False


def _check_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor of ``path`` is a writable directory."""
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link: mkdir would fail
            raise EncDecError(f"{what} {path}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise EncDecError(f"{what} {path}: {parent} is a file, expected a directory")
    try:  # a real probe: os.access says yes to root, and on read-only or special file systems
        fd, probe = tempfile.mkstemp(prefix=".encdec-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise EncDecError(f"{what} {path}: cannot write in directory {parent} ({exc.strerror})") from None


def as_path(value, what: str) -> Path:
    """A path argument of the Python API (str or os.PathLike) as a Path; anything else (None, a
    number, a list) an EncDecError naming ``what``."""
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise EncDecError(f"{what} = {value!r}: expected a path (str or Path)")


def check_output_dir(out_dir: Path, what: str = "output directory") -> None:
    """Refuse an output directory that cannot be written or must not be replaced, before any work."""
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise EncDecError(f"{what} {out_dir}: exists and is not a directory")
        try:
            entries = sorted(p.name for p in out_dir.iterdir())
        except OSError as exc:
            raise EncDecError(f"{what} {out_dir}: cannot be read ({exc.strerror})") from None
        if entries and not _is_ours(out_dir):
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise EncDecError(
                f"{what} {out_dir}: exists and is not an encdec checkpoint or engine (it holds {shown}); "
                f"expected a new or empty directory, or one written by encdec (which is replaced)")
    _check_parent(out_dir, what)


def check_output_file(path: Path, what: str = "output file") -> None:
    """Refuse an output file path that is a directory or lies under a file / an unwritable directory."""
    path = Path(path)
    if path.is_dir():
        raise EncDecError(f"{what} {path}: is a directory, expected a file path")
    _check_parent(path, what)


def write_text_atomic(path: Path, text: str, what: str = "output file") -> None:
    """Write ``text`` to ``path`` through a temp file in the same directory (parents created)."""
    path = Path(path)
    check_output_file(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_dir(out_dir: Path, what: str = "output directory"):
    """Yield a fresh temp dir; on success it replaces ``out_dir``, on any error it is removed."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, what)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        check_output_dir(out_dir, what)  # still ours to replace after the work
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
