"""fsutil: outputs get the umask's permissions (not mkdtemp's 0700 / mkstemp's and safetensors' 0600),
and the temp dirs a killed writer left beside an output are removed by the next write, never a live
writer's."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from encdec_core import fsutil
from encdec_core.fsutil import atomic_dir, current_umask, remove_stale_temp_dirs, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask):
        os.umask(mask)

    yield set_
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o027], ids=["022", "002", "027"])
def test_outputs_follow_the_umask(tmp_path, umask, mask):
    from safetensors.torch import save_file

    umask(mask)
    assert current_umask() == mask and current_umask() == mask  # read, not changed
    out = tmp_path / "ck"
    with atomic_dir(out) as tmp:
        save_file({"w": torch.ones(2)}, str(tmp / "rank0.safetensors"))  # safetensors writes 0600
        (tmp / "config.json").write_text("{}")
        (tmp / "lora").mkdir()
        (tmp / "lora" / "a.txt").write_text("x")
        os.link(tmp / "config.json", tmp / "linked.json")  # a hard link keeps its file's mode
        os.chmod(tmp / "config.json", 0o600)
    assert _mode(out) == 0o777 & ~mask and _mode(out / "lora") == 0o777 & ~mask
    assert _mode(out / "rank0.safetensors") == 0o666 & ~mask and _mode(out / "lora" / "a.txt") == 0o666 & ~mask
    assert _mode(out / "linked.json") == 0o600
    f = tmp_path / "sub" / "out.txt"
    write_text_atomic(f, "hello\n")
    assert f.read_text() == "hello\n" and _mode(f) == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "sub"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _temp(parent: Path, name: str) -> Path:
    d = parent / name
    d.mkdir()
    (d / "rank0.safetensors").write_bytes(b"partial")
    return d


def test_stale_temp_dirs_of_dead_writers_removed_others_kept(tmp_path):
    tag, dead = fsutil._host_tag(), _dead_pid()
    stale = _temp(tmp_path, f".ck.tmp-{dead}-{tag}-abc123")
    keep = [
        _temp(tmp_path, f".ck.tmp-{os.getpid()}-{tag}-live"),          # a live process on this host
        _temp(tmp_path, f".ck.tmp-{dead}-{'0' * 8 if tag != '0' * 8 else '1' * 8}-host"),  # another host's
        _temp(tmp_path, ".ck.tmp-k2j3h4"),                              # an older writer's: no pid to tell
        _temp(tmp_path, f".ck2.tmp-{dead}-{tag}-other"),               # another output's
    ]
    with atomic_dir(tmp_path / "ck") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists()
    assert all(k.exists() for k in keep)
    assert (tmp_path / "ck" / "config.json").is_file()


def test_locked_temp_dir_is_kept_even_if_its_pid_is_gone(tmp_path):
    """The flock, not the pid alone, decides: a dir some live process still holds is never removed."""
    d = _temp(tmp_path, f".ck.tmp-{_dead_pid()}-{fsutil._host_tag()}-held")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(d)!r}, os.O_RDONLY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert remove_stale_temp_dirs(tmp_path / "ck") == [] and d.exists()
    finally:
        holder.kill()
        holder.wait()
    assert remove_stale_temp_dirs(tmp_path / "ck") == [d] and not d.exists()


def test_sigkilled_writer_leftover_removed_by_the_next_write(tmp_path):
    out = tmp_path / "ck"
    code = ("import sys, time\n"
            "from encdec_core.fsutil import atomic_dir\n"
            "cm = atomic_dir(sys.argv[1])\n"
            "tmp = cm.__enter__()\n"
            "(tmp / 'rank0.safetensors').write_bytes(b'partial')\n"
            "print(tmp, flush=True)\n"
            "time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    writer = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        left = Path(writer.stdout.readline().strip())
        assert left.parent == tmp_path and left.name.startswith(f".ck.tmp-{writer.pid}-")
        # while the writer lives, another write of the same output leaves its temp dir alone
        with atomic_dir(out) as tmp:
            (tmp / "config.json").write_text('{"format": "encdec-checkpoint"}')
        assert left.is_dir()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert left.is_dir()  # SIGKILL: nothing could clean up
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text('{"format": "encdec-checkpoint"}')
    assert not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
