"""Where mpirun is and whether multi-rank tests can run (pip install '.[mpi]' brings both)."""
from __future__ import annotations

import os
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
