"""The decoder step's GEMM chain (``gemm_chain.py``) as ONE persistent kernel: one program per SM
loops over every layer's six GEMMs, with a grid-wide barrier between dependent GEMMs, against cuBLAS
called GEMM by GEMM from a CUDA graph.

The question for issue 6: at 32-256 rows every GEMM launch costs ~4.5 us whatever its weight
(``gemm_probe.py``; cuBLAS chain: ~6 us per GEMM at 64 rows). A persistent kernel pays no launch, no
ramp-down / ramp-up between GEMMs, and can ask L2 for its next weight slice before it waits at the
barrier; it pays the barrier instead (an atomic arrive + spin on one counter). If the chain falls
well below cuBLAS's, a persistent decoder layer (GEMMs + attention phases) is worth building.

Barrier: every program adds 1 to a counter (release, GPU scope) and spins until it reads
``(i + 1) * programs`` (acquire); activations written inside the kernel are read with ``.cg``
(L2, never a stale L1 line). All programs must be resident at once: ``programs`` <= SM count and one
program fits per SM (checked with the occupancy the compiled kernel reports). Variants:

- ``persist``: the kernel as described;
- ``persist_pf``: also prefetches its next GEMM's weight rows into L2 before it waits at the barrier;
- ``persist_nobar``: the barriers left out (wrong results; the barrier's cost is the difference).

    PYTHONPATH=.:families python benchmarks/persistent_chain.py --models bart-large,flan-t5-large --m 32,64 --configs "4x3x128,4x4x256,8x4x256,8x3x128"

Result (docs/performance.md, 2026-12-01 05:02–05:07, H200): 8–15 us per GEMM against cuBLAS's 5.4–6; the barrier costs
0.3–1.6 us, the GEMM in one program per SM is what is slow. Not used by the runner.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm_chain import chain_cases, time_chain  # noqa: E402


@triton.jit
def _grid_sync(bar_ptr, target, ENABLED: tl.constexpr):
    """All programs arrive; return when ``target`` arrivals were counted (monotonic counter)."""
    if ENABLED:
        tl.debug_barrier()  # every warp's stores issued before the release
        tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
        cur = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        while cur < target:
            cur = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()


@triton.jit
def _prefetch_rows(w_ptr, pid, NPROG: tl.constexpr, N: tl.constexpr, K: tl.constexpr, BN: tl.constexpr,
                   LINES: tl.constexpr):
    """L2 prefetch of this program's weight tiles (contiguous [BN, K] row blocks) of one GEMM."""
    for t in range(pid, N // BN, NPROG):
        base = (w_ptr + t * BN * K).to(tl.pointer_type(tl.int8), bitcast=True)
        offs = tl.minimum(tl.arange(0, LINES) * 128, BN * K * 2 - 1)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [base + offs],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gemm_tiles(x_ptr, w_ptr, b_ptr, out_ptr, M, stride_x, stride_o, pid,
                NPROG: tl.constexpr, N: tl.constexpr, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                BM: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_M: tl.constexpr):
    """out[:M, cols] = x[:M, :K] @ w[cols].T (+ b) for this program's column tiles (weight as the MMA's
    row operand: acc [BN, BM])."""
    if N // BN <= NPROG and ONE_M:  # one tile per program, one row block: a single pipelined K loop
        if pid < N // BN:
            _gemm_tile(x_ptr, w_ptr, b_ptr, out_ptr, M, stride_x, stride_o, pid, 0, K, BN, BK, BM, HAS_BIAS)
    else:
        for t in range(pid, N // BN, NPROG):
            for m0 in range(0, M, BM):
                _gemm_tile(x_ptr, w_ptr, b_ptr, out_ptr, M, stride_x, stride_o, t, m0, K, BN, BK, BM, HAS_BIAS)


@triton.jit
def _gemm_tile(x_ptr, w_ptr, b_ptr, out_ptr, M, stride_x, stride_o, t, m0,
               K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, HAS_BIAS: tl.constexpr):
    cols = t * BN + tl.arange(0, BN)
    rows = m0 + tl.arange(0, BM)
    rmask = rows < M
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :])
        xt = tl.load(x_ptr + rows[None, :] * stride_x + ks[:, None], mask=rmask[None, :], other=0.0,
                     cache_modifier=".cg")
        acc += tl.dot(w, xt)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(tl.float32)[:, None]
    tl.store(out_ptr + rows[None, :] * stride_o + cols[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[None, :])


@triton.jit
def _then(row, i, x_ptr, out_ptr, M, n, bar_ptr, pid, NPROG: tl.constexpr, K_IN: tl.constexpr, N: tl.constexpr,
          K: tl.constexpr, BN: tl.constexpr, LINES: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
          HAS_BIAS: tl.constexpr, ONE_M: tl.constexpr, SYNC: tl.constexpr, PREFETCH: tl.constexpr):
    """GEMM i of a layer (weight / bias addresses at row[i] / row[i + 6]) after the previous one: prefetch
    its weight slice, wait at the barrier, compute. Returns the barrier count."""
    pt = tl.pointer_type(x_ptr.dtype.element_ty)
    w = tl.load(row + i).to(pt)
    if PREFETCH:
        _prefetch_rows(w, pid, NPROG, N, K, BN, LINES)
    n += NPROG
    _grid_sync(bar_ptr, n, SYNC)
    _gemm_tiles(x_ptr, w, tl.load(row + i + 6).to(pt), out_ptr, M, K_IN, N, pid, NPROG, N, K, BN, BK, BM, HAS_BIAS,
                ONE_M)
    return n


@triton.jit
def _chain_kernel(x0_ptr, tab_ptr, o0, o1, o2, o3, o4, o5, bar_ptr, M, L,
                  N0: tl.constexpr, K0: tl.constexpr, B0: tl.constexpr,
                  N1: tl.constexpr, K1: tl.constexpr, B1: tl.constexpr,
                  N2: tl.constexpr, K2: tl.constexpr, B2: tl.constexpr,
                  N3: tl.constexpr, K3: tl.constexpr, B3: tl.constexpr,
                  N4: tl.constexpr, K4: tl.constexpr, B4: tl.constexpr,
                  N5: tl.constexpr, K5: tl.constexpr, B5: tl.constexpr,
                  L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr, L4: tl.constexpr,
                  L5: tl.constexpr,
                  NPROG: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, HAS_BIAS: tl.constexpr,
                  SYNC: tl.constexpr, PREFETCH: tl.constexpr, ONE_M: tl.constexpr):
    """L layers x 6 GEMMs; GEMM i reads the first K_i columns of GEMM i-1's output (o5 feeds the next
    layer's GEMM 0). tab: int64 [L, 12] weight / bias addresses."""
    pid = tl.program_id(0)
    pt = tl.pointer_type(x0_ptr.dtype.element_ty)
    n = 0
    for layer in range(L):
        row = tab_ptr + layer * 12
        if layer == 0:
            _gemm_tiles(x0_ptr, tl.load(row).to(pt), tl.load(row + 6).to(pt), o0, M, K0, N0, pid, NPROG, N0, K0,
                        B0, BK, BM, HAS_BIAS, ONE_M)
        else:
            _gemm_tiles(o5, tl.load(row).to(pt), tl.load(row + 6).to(pt), o0, M, N5, N0, pid, NPROG, N0, K0, B0,
                        BK, BM, HAS_BIAS, ONE_M)
        n = _then(row, 1, o0, o1, M, n, bar_ptr, pid, NPROG, N0, N1, K1, B1, L1, BK, BM, HAS_BIAS, ONE_M, SYNC,
                  PREFETCH)
        n = _then(row, 2, o1, o2, M, n, bar_ptr, pid, NPROG, N1, N2, K2, B2, L2, BK, BM, HAS_BIAS, ONE_M, SYNC,
                  PREFETCH)
        n = _then(row, 3, o2, o3, M, n, bar_ptr, pid, NPROG, N2, N3, K3, B3, L3, BK, BM, HAS_BIAS, ONE_M, SYNC,
                  PREFETCH)
        n = _then(row, 4, o3, o4, M, n, bar_ptr, pid, NPROG, N3, N4, K4, B4, L4, BK, BM, HAS_BIAS, ONE_M, SYNC,
                  PREFETCH)
        n = _then(row, 5, o4, o5, M, n, bar_ptr, pid, NPROG, N4, N5, K5, B5, L5, BK, BM, HAS_BIAS, ONE_M, SYNC,
                  PREFETCH)
        if layer + 1 < L:
            if PREFETCH:
                _prefetch_rows(tl.load(row + 12).to(pt), pid, NPROG, N0, K0, B0, L0)
            n += NPROG
            _grid_sync(bar_ptr, n, SYNC)


def pick_bn(N: int, nprog: int) -> int:
    """The column tile: the smallest power of two >= 16 that needs no more rounds of tiles than any
    wider one (fewer, wider tiles when the rounds are equal cost the same weight per program)."""
    best = None
    for bn in (16, 32, 64, 128):
        if N % bn:
            continue
        rounds = -(-(N // bn) // nprog)
        work = rounds * bn
        if best is None or work < best[0]:
            best = (work, bn)
    return best[1]


def persistent_chain(x0, W, outs, bar, nprog, bk=128, bm=64, sync=True, prefetch=False, warps=4, stages=3):
    """Run the chain (W: [L][6] of (weight, bias or None)) in one launch; returns the last output."""
    L = len(W)
    has_bias = W[0][0][1] is not None
    tab = torch.tensor([[w.data_ptr() for w, _ in lay] + [(b if b is not None else w).data_ptr() for w, b in lay]
                        for lay in W], dtype=torch.int64, device=x0.device)
    M = x0.shape[0]
    shp = {}
    for i, (w, _) in enumerate(W[0]):
        N, K = w.shape
        bn = pick_bn(N, nprog)
        shp.update({f"N{i}": N, f"K{i}": K, f"B{i}": bn, f"L{i}": triton.next_power_of_2(-(-bn * K * 2 // 128))})
    bm = min(bm, max(16, triton.next_power_of_2(M)))

    def launch():
        bar.zero_()
        _chain_kernel[(nprog,)](x0, tab, *outs, bar, M, L, **shp, NPROG=nprog, BK=bk, BM=bm, HAS_BIAS=has_bias,
                                SYNC=sync, PREFETCH=prefetch, ONE_M=M <= bm, num_warps=warps, num_stages=stages)
        return outs[5]
    launch.tab = tab  # keep the table alive with the closure
    return launch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="bart-large,flan-t5-large")
    ap.add_argument("--m", default="32,64,256")
    ap.add_argument("--variants", default="cublas,persist,persist_pf,persist_nobar")
    ap.add_argument("--configs", default="4x3x128,4x4x256,8x4x256,8x3x128",
                    help="kernel configs, warps x stages x K-chunk, ';' or ',' separated")
    ap.add_argument("--programs", type=int, default=0, help="programs (default: the SM count)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    nprog = a.programs or torch.cuda.get_device_properties(0).multi_processor_count
    res = []
    for name, L, shp, W, wbytes, M, x0, outs in chain_cases(a.models, a.m):
        bar = torch.zeros(1, dtype=torch.int32, device=x0.device)
        ref = None
        for variant in a.variants.split(","):
            for conf in (["-"] if variant == "cublas" else a.configs.replace(";", ",").split(",")):
                warps, stages, bk = (0, 0, 0) if conf == "-" else (int(v) for v in conf.split("x"))
                if variant == "cublas":
                    def fn():
                        h = x0
                        for lay in W:
                            for w, b in lay:
                                h = F.linear(h[:, :w.shape[1]], w, b)
                        return h
                else:
                    fn = persistent_chain(x0, W, outs, bar, nprog, bk=bk, sync=variant != "persist_nobar",
                                          prefetch=variant == "persist_pf", warps=warps, stages=stages)
                got = time_chain(fn, ref, f"{name} M={M} {variant} {conf}")
                if got is None:
                    continue
                ms, out, err = got
                ref = out if ref is None else ref
                n_g = L * len(shp)
                row = {"model": name, "M": M, "variant": variant, "config": conf, "programs": nprog, "ms": ms,
                       "us_per_gemm": ms * 1e3 / n_g, "TBps": wbytes / ms / 1e9, "rel_err_vs_cublas": err}
                res.append(row)
                print(f"{name:14s} M={M:3d} {variant:14s} {conf:9s} {ms * 1e3:8.1f} us/step "
                      f"{row['us_per_gemm']:5.2f} us/GEMM {row['TBps']:5.2f} TB/s err {err:.1e}", flush=True)
    with open(os.path.join(a.out, "persistent_chain.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
