"""The decoder step's GEMMs at 16-256 rows, one shape at a time: cuBLAS as the compiled step calls it
(``F.linear``) against other ways to issue the same product, to find a faster one for the rows where
the step is bound by GEMM latency (issue 6: bart-large batch 64 and the 8 x 4 beam step).

Variants (all bf16 in, bf16 out, fp32 accumulation):
- ``linear``: ``F.linear(x, W)`` (cuBLAS; what inductor's step calls)
- ``swap``: ``(W @ x.T).T`` (cuBLAS sees the problem transposed; other kernels, same product)
- ``addmm``: ``F.linear(x, W, b)`` (BART's layers have biases: cuBLASLt's bias epilogue)
- ``lt``: ``F.linear`` with ``torch.backends.cuda.preferred_blas_library("cublaslt")``
- ``tri_*``: a Triton kernel with the weight as the MMA's row operand ("swap AB": a [BN, BK] weight
  tile times a [BK, rows] activation tile), split over K into ``S`` parts: S = 1 stores bf16 directly;
  S > 1 writes fp32 partials that a second kernel sums in split order (deterministic).

``_swab_pdl_kernel`` (used by ``gemm_chain.py``) is the same product launched with programmatic
dependent launch: it prefetches its weight slice into L2 before it waits for the previous kernel, and
the tile's last split sums the partials in split order (a per-tile counter).

Measured on an H200 (docs/performance.md, 2026-11-30 20:04): every variant costs 4.8-10 us per call at
32-256 rows, about 4.5 us of it fixed; none beats cuBLAS by more than ~1 us except on the lm_head.

Every call is timed from a CUDA graph of 50 calls that cycle through enough copies of the weight to
exceed the L2 (so the weight streams from HBM, as in the step), median of 5 replays. Each variant is
checked against an fp32 product (relative Frobenius error).

    PYTHONPATH=.:families python benchmarks/gemm_probe.py --models bart-large,flan-t5-large --m 32,64,256
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_families, graph_time  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _swab_kernel(x_ptr, w_ptr, out_ptr, M, N, s_xm, s_wn, s_om, s_ps,
                 K_SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 PARTIAL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    n = pid_n * BN + tl.arange(0, BN)
    m = pid_m * BM + tl.arange(0, BM)
    nmask = n < N
    mmask = m < M
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    k_lo = pid_s * K_SPLIT
    for k0 in range(0, K_SPLIT, BK):
        k = k_lo + k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + n[:, None] * s_wn + k[None, :], mask=nmask[:, None], other=0.0)
        xt = tl.load(x_ptr + m[None, :] * s_xm + k[:, None], mask=mmask[None, :], other=0.0)
        acc = tl.dot(w, xt, acc)
    omask = nmask[:, None] & mmask[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_s * s_ps + m[None, :] * s_om + n[:, None], acc, mask=omask)
    else:
        tl.store(out_ptr + m[None, :] * s_om + n[:, None], acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _prefetch_l2(ptrs):
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _swab_pdl_kernel(x_ptr, w_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, s_xm, s_om,
                     N: tl.constexpr, K: tl.constexpr, K_SPLIT: tl.constexpr, S: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr,
                     PDL: tl.constexpr, PF_LINES: tl.constexpr):
    """Swap-AB GEMM with programmatic dependent launch: the program's weight slice is prefetched into
    L2 before it waits for the previous kernel; split-K partials summed in split order by the tile's
    last program (per-tile counter, left zero)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < N
    m = pid_m * BM + tl.arange(0, BM)
    mmask = m < M
    k_lo = pid_s * K_SPLIT
    if PDL:
        if pid_m == 0:
            j = tl.minimum(k_lo + tl.arange(0, PF_LINES) * 64, K - 1)
            nn = tl.minimum(n, N - 1)
            _prefetch_l2(w_ptr + nn[:, None] * K + j[None, :])
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for k0 in range(0, K_SPLIT, BK):
        k = k_lo + k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=nmask[:, None], other=0.0)
        xt = tl.load(x_ptr + m[None, :] * s_xm + k[:, None], mask=mmask[None, :], other=0.0)
        acc = tl.dot(w, xt, acc)
    omask = nmask[:, None] & mmask[None, :]
    if S > 1:
        wp = ws_ptr + m[None, :] * N + n[:, None]
        tl.store(wp + pid_s * M * N, acc, mask=omask)
        tl.debug_barrier()
        NT: tl.constexpr = (N + BN - 1) // BN
        tile = pid_m * NT + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == S - 1:
            acc = tl.zeros([BN, BM], dtype=tl.float32)
            for sk in tl.static_range(S):
                acc += tl.load(wp + sk * M * N, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(cnt_ptr + tile, 0)
            if HAS_BIAS:
                acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + m[None, :] * s_om + n[:, None], acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + m[None, :] * s_om + n[:, None], acc.to(out_ptr.dtype.element_ty), mask=omask)


def swab_pdl(x, w, b, out, cfg, ws, cnt, pdl=True):
    """out = x @ w.T (+ b) with ``_swab_pdl_kernel``; ws: fp32 [S, M, N] (S > 1), cnt: int32 zeros."""
    M, K = x.shape
    N = w.shape[0]
    BM, BN, BK, S = cfg["BM"], cfg["BN"], cfg["BK"], cfg["S"]
    k_split = K // S
    grid = (triton.cdiv(N, BN), S, triton.cdiv(M, BM))
    kw = {"launch_pdl": True} if pdl else {}
    _swab_pdl_kernel[grid](x, w, b if b is not None else x, out, ws if ws is not None else x, cnt, M,
                           x.stride(0), out.stride(0), N=N, K=K, K_SPLIT=k_split, S=S, BM=BM, BN=BN, BK=BK,
                           HAS_BIAS=b is not None, PDL=pdl, PF_LINES=triton.next_power_of_2(max(1, k_split // 64)),
                           num_warps=cfg["w"], num_stages=cfg["st"], **kw)
    return out


def auto_split(M, N, K, BM, BN, BK, target=264):
    tiles = triton.cdiv(N, BN) * triton.cdiv(M, BM)
    s = 1
    while tiles * s * 2 <= target and K % (s * 2 * BK) == 0 and K // (s * 2) >= BK:
        s *= 2
    return s


@triton.jit
def _sum_splits_kernel(p_ptr, out_ptr, total, s_ps, S: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < total
    acc = tl.load(p_ptr + i, mask=mask, other=0.0)
    for s in tl.static_range(1, S):
        acc += tl.load(p_ptr + s * s_ps + i, mask=mask, other=0.0)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=mask)


def swab(x, w, out, cfg, ws=None):
    M, K = x.shape
    N = w.shape[0]
    BM, BN, BK, S = cfg["BM"], cfg["BN"], cfg["BK"], cfg["S"]
    k_split = K // S
    grid = (triton.cdiv(N, BN), S, triton.cdiv(M, BM))
    if S == 1:
        _swab_kernel[grid](x, w, out, M, N, x.stride(0), w.stride(0), out.stride(0), 0,
                           K_SPLIT=k_split, BM=BM, BN=BN, BK=BK, PARTIAL=False,
                           num_warps=cfg["w"], num_stages=cfg["st"])
    else:
        _swab_kernel[grid](x, w, ws, M, N, x.stride(0), w.stride(0), N, M * N,
                           K_SPLIT=k_split, BM=BM, BN=BN, BK=BK, PARTIAL=True,
                           num_warps=cfg["w"], num_stages=cfg["st"])
        total = M * N
        _sum_splits_kernel[(triton.cdiv(total, 1024),)](ws, out, total, M * N, S=S, BLOCK=1024, num_warps=4)
    return out


def graph_us(fn, calls=50):
    return graph_time(fn, calls)[0] * 1e3


def kernel_names(fn):
    """The CUDA kernels one call launches (cuBLAS's choice: tile names, split-K reductions)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name[:120] for e in prof.events() if e.device_type.name == "CUDA"]


def shapes(cfg, vocab):
    d, hd, ff = cfg.d_model, cfg.decoder_heads * cfg.head_dim, cfg.decoder_ffn_dim
    gi = 2 if cfg.gated_ffn else 1
    return {"qkv": (3 * hd, d), "out": (d, hd), "ffn_in": (gi * ff, d), "ffn_out": (d, ff),
            "lm_head": (-(-vocab // 64) * 64, d)}


def tri_configs(M, N, K):
    bm = max(16, min(128, triton.next_power_of_2(M)))
    out = []
    for BN, BK, st in itertools.product((64, 128), (64, 128, 256), (3, 4)):
        if BK > K or (BN == 128 and BK == 256 and st == 4):
            continue
        tiles = triton.cdiv(N, BN) * triton.cdiv(M, bm)
        auto = 1
        while tiles * auto * 2 <= 264 and K // (auto * 2) >= BK and K % (auto * 2 * BK) == 0:
            auto *= 2
        for S in sorted({1, auto, auto * 2} if K % (auto * 2 * BK) == 0 else {1, auto}):
            out.append(dict(BM=bm, BN=BN, BK=BK, S=S, w=4, st=st))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="bart-large,flan-t5-large")
    ap.add_argument("--m", default="32,64,256")
    ap.add_argument("--layers", default="")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    ensure_families()
    from encdec_core.benchmark import find_preset

    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    rows = []
    for name in a.models.split(","):
        fam, src = find_preset(name)
        cfg = fam.make_config(src)
        for lname, (N, K) in shapes(cfg, cfg.vocab_size).items():
            if a.layers and lname not in a.layers.split(","):
                continue
            copies = max(2, -(-160 * 2**20 // (N * K * 2)))
            ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
            for M in [int(v) for v in a.m.split(",")]:
                x = torch.randn(M, K, device=dev, dtype=dt)
                out = torch.empty(M, N, device=dev, dtype=dt)
                ref = x.float() @ ws[0].float().t()
                it = itertools.cycle(ws)
                row = {"model": name, "layer": lname, "M": M, "N": N, "K": K}

                def check(y):
                    return float((y.float() - ref).norm() / ref.norm())

                row["linear_kernels"] = kernel_names(lambda: F.linear(x, ws[0]))
                row["swap_kernels"] = kernel_names(lambda: (ws[0] @ x.t()).t())
                row["linear"] = graph_us(lambda: F.linear(x, next(it)))
                bias = torch.randn(N, device=dev, dtype=dt)
                row["addmm_kernels"] = kernel_names(lambda: F.linear(x, ws[0], bias))
                row["addmm"] = graph_us(lambda: F.linear(x, next(it), bias))
                row["swap"] = graph_us(lambda: (next(it) @ x.t()).t())
                row["swap_err"] = check((ws[0] @ x.t()).t())
                torch.backends.cuda.preferred_blas_library("cublaslt")
                row["lt"] = graph_us(lambda: F.linear(x, next(it)))
                row["lt_err"] = check(F.linear(x, ws[0]))
                torch.backends.cuda.preferred_blas_library("cublas")
                best = (float("inf"), None)
                for c in tri_configs(M, N, K):
                    label = f"tri_n{c['BN']}k{c['BK']}s{c['S']}st{c['st']}"
                    wsp = torch.empty(c["S"], M, N, device=dev, dtype=torch.float32) if c["S"] > 1 else None
                    try:
                        err = check(swab(x, ws[0], out, c, wsp))
                        t = graph_us(lambda: swab(x, next(it), out, c, wsp))
                    except Exception as exc:  # noqa: BLE001 - a survey
                        row.setdefault("errors", []).append(f"{label}: {type(exc).__name__}: {exc}"[:200])
                        continue
                    row[label] = t
                    if err > 1e-2:
                        row.setdefault("bad", []).append(f"{label}: err {err:.2e}")
                        continue
                    if t < best[0]:
                        best = (t, label)
                row["tri_best"], row["tri_best_cfg"] = best
                floor = N * K * 2 / 4.3e12 * 1e6
                row["floor_us"] = floor
                print(f"{name:14s} {lname:8s} M={M:3d} N={N:5d} K={K:5d} linear {row['linear']:7.2f} swap "
                      f"{row['swap']:7.2f} lt {row['lt']:7.2f} triton {best[0]:7.2f} ({best[1]}) "
                      f"floor {floor:6.2f} us", flush=True)
                rows.append(row)
    with open(os.path.join(a.out, "gemm_probe.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
