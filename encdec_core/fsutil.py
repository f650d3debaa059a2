"""Atomic output directories and files: everything is written to a temp path beside the target and
renamed at the end, so a failure leaves no half-written checkpoint, engine or report.

Output paths are checked before any work starts (``check_output_dir`` / ``check_output_file``): a
directory that exists is replaced only when it is empty or holds an encdec checkpoint or engine, so
a mistyped ``--output-dir`` (the model's own folder, a folder of other files) is refused instead of
deleted.

Outputs get the permissions of any file the user creates (0o666 / 0o777 less the umask), not the
private modes of mkstemp / mkdtemp. A temp dir is named ``.NAME.tmp-<pid>-<host>-XXXX`` and locked
(``flock``) by the process writing it; a later write of NAME removes the temp dirs that a killed
writer left behind: those of this host whose lock is free and whose process is gone."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import EncDecError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, so no temp dir is ever taken for stale
    fcntl = None

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


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status), else by
    setting and at once restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str, what: str = "output file") -> None:
    """Write ``text`` to ``path`` through a temp file in the same directory (parents created); the
    file gets 0o666 less the umask, as ``open(path, "w")`` would give it."""
    path = Path(path)
    check_output_file(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists (another user's process); anything else: assume alive
        return True
    return True


def _lock(fd: int) -> bool:
    """Take ``fd``'s exclusive flock without waiting; False when another process holds it (or the
    file system cannot lock: then nobody's temp dir is ever taken for stale)."""
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def remove_stale_temp_dirs(out_dir: Path) -> list[Path]:
    """Remove the ``.NAME.tmp-<pid>-<host>-*`` siblings of ``out_dir`` that a killed writer left:
    only dirs named by this host's tag, whose pid is not a live process here and whose lock nobody
    holds (a live writer holds it until its dir is renamed or removed). Older temp dirs, without a pid
    in their name, are left alone: nothing tells whether their writer still runs. Returns the removed
    dirs; a dir that cannot be removed is left as it is."""
    out_dir = Path(out_dir)
    pat = re.compile(rf"^\.{re.escape(out_dir.name)}\.tmp-(\d+)-{_host_tag()}-[^/]+$")
    removed = []
    try:
        siblings = list(out_dir.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pat.match(p.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, a link, not a dir: not ours to touch
            continue
        try:
            if not _lock(fd):
                continue
            # still the dir we locked (not renamed away into the output by a writer that just finished)
            st, now = os.fstat(fd), os.lstat(p)
            if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
                continue
            shutil.rmtree(p)
            removed.append(p)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _publish_modes(root: Path, umask: int) -> None:
    """The modes a user's own mkdir / open would give: ``root`` and its folders 0o777, its files 0o666,
    less ``umask`` (mkdtemp makes 0o700, and safetensors writes 0o600). A hard-linked file (an engine's
    link to its checkpoint's shard) keeps the mode of the file it shares; links are not followed."""
    os.chmod(root, 0o777 & ~umask)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                if stat.S_ISDIR(st.st_mode):
                    os.chmod(p, 0o777 & ~umask)
                elif stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    os.chmod(p, 0o666 & ~umask)


@contextmanager
def atomic_dir(out_dir: Path, what: str = "output directory"):
    """Yield a fresh temp dir; on success it replaces ``out_dir`` (with 0o777 less the umask, like a
    directory ``mkdir`` makes), on any error it is removed. Temp dirs of ``out_dir`` left by killed
    writers are removed first (``remove_stale_temp_dirs``)."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, what)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-{_host_tag()}-", dir=out_dir.parent))
    fd = None
    try:
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        _lock(fd)  # held until the dir is renamed or removed: a live writer's dir is never taken for stale
        yield tmp
        check_output_dir(out_dir, what)  # still ours to replace after the work
        _publish_modes(tmp, current_umask())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)
