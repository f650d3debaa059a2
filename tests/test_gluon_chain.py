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
    # dataflow counters: checked where every N is a multiple of 128, refused (None) where one is not
    assert [r["flags_ok"] for r in rows] == [True, None, True], rows
    # the cases cover more items than programs, and programs with no item at all
    assert max(max(r["items"]) for r in rows) > 1 and min(min(r["items"]) for r in rows) == 0


def test_kernel_compiles_for_hopper():
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    rows = _run("--compile-check")
    assert [(r["m"], r["variant"]) for r in rows] == [
        (64, "gluon_s8"), (64, "gluon_x4.s4"), (64, "gluon_x4.s4.va"), (64, "gluon_x2.s6.va"), (64, "gluon_s8.xpf"),
        (64, "gluon_x4.s4.va.df"), (32, "gluon_s8"), (32, "gluon_x4.s8.va")]
    for r in rows:
        unrolled = max(r["xch"], 1)  # chunks of one staged group are unrolled
        # 128 columns of K per chunk in 16-wide wgmma steps; the prologue's STAGES loads plus one refill
        # per unrolled chunk
        assert r["wgmma"] == 8 * unrolled and r["tma_loads"] == r["stages"] + unrolled, r
        # staged activations: 16-byte copies, M x 128 fp32 per chunk over 128 threads
        assert r["cp_async"] == r["xch"] * r["m"] * 128 * 4 // 16 // 128, r
        # partial sums: a 16-byte vector reduction per 4 columns (".va"), else one scalar atomic per element
        if ".va" in r["variant"]:
            assert r["red_v4"] == 64 * r["m"] // 4 // 128 and r["atom_f32"] == 0, r
        else:
            assert r["red_v4"] == 0 and r["atom_f32"] == 64 * r["m"] // 128, r
        assert r["shared_bytes"] <= 227 * 1024, r
