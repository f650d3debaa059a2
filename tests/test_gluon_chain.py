"""benchmarks/gluon_chain.py (issue 6's persistent GEMM chain, a GPU experiment): its host plan, run
with torch on the CPU, equals the plain chain (packing, splits, offsets, bias rule), and its Gluon
kernel compiles for sm_90a without a GPU. The kernel itself runs only on a Hopper GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gluon_chain.py"


def _run(flag: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "families")]))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(SCRIPT), flag], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]


def test_plan_equals_the_plain_chain():
    rows = _run("--simulate")
    assert len(rows) == 3 and all(r["ok"] and r["rel_err"] < 1e-5 for r in rows), rows
    # the cases cover more items than programs, and programs with no item at all
    assert max(max(r["items"]) for r in rows) > 1 and min(min(r["items"]) for r in rows) == 0


def test_kernel_compiles_for_hopper():
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    rows = _run("--compile-check")
    assert [(r["m"], r["stages"], r["xpf"]) for r in rows] == [(64, 8, False), (32, 8, False), (64, 4, False),
                                                               (64, 8, True)]
    # 128 columns of K per chunk in 16-wide wgmma steps; the prologue's STAGES loads plus the refill
    assert all(r["wgmma"] == 8 and r["tma_loads"] == r["stages"] + 1 for r in rows), rows
    assert all(r["shared_bytes"] <= 227 * 1024 for r in rows), rows
