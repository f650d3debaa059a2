"""Where mpirun is and whether multi-rank tests can run (pip install '.[mpi]' brings both)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MPIRUN = Path(sys.executable).parent / "mpirun"


def have_mpi() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return MPIRUN.is_file()


# skipped on a machine without MPI; in CI (CI=true, where make test installs .[mpi]) a missing MPI fails instead
need_mpi = pytest.mark.skipif(not have_mpi() and not os.environ.get("CI"),
                              reason="needs mpi4py and mpirun (pip install '.[mpi]')")


def launch_env() -> dict:
    env = dict(os.environ)
    env.update(ENCDEC_DISABLE_PLUGIN_AUTOLOAD="1", ENCDEC_DIST_TIMEOUT="90", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return env


def mpirun(n: int, *cmd, timeout: float = 300) -> subprocess.CompletedProcess:
    """``mpirun -n n cmd`` as root with oversubscription, output captured; a hang fails the test."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "mpi_scripts"))
    import parallel_common as pc

    args = [str(MPIRUN), *pc.MPIRUN_ARGS, "-n", str(n), *map(str, cmd)]
    try:
        return subprocess.run(args, capture_output=True, text=True, env=launch_env(), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpirun -n {n} {' '.join(map(str, cmd))} hung (> {timeout}s):\n{exc.stdout}\n{exc.stderr}")
