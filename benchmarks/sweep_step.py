"""Block-size policies of the Triton step, timed in the real decoder step (GPU).

``tune_triton.py`` times one GEMV replayed alone, with its weight L2-resident: good for ranking tiles,
blind to what happens between kernels (programmatic dependent launch, L2 traffic of the neighbours).
This script swaps ``triton_kernels.linear_config`` for a named policy and times the whole Triton
decoder step (fused greedy loop replayed from its CUDA graph; random weights of the preset's real
shapes, bf16, source length 128) per model and batch size, against the inductor-compiled step.

    PYTHONPATH=.:families python benchmarks/sweep_step.py --models bart-large --batches 1,8 \
        --policies base,k512,fma [--inductor] [--out DIR]
    # the compiled step (batches above 16) with other attention block sizes:
    PYTHONPATH=.:families python benchmarks/sweep_step.py --models bart-large --batches 64,256 \
        --policies inductor,inductor+attn-t32,inductor+attn-x64,inductor-math,inductor-autotune

Policies run in the order given, each with its own runner (and compile) in one process. The first
run of a process has been slower (2026-11-30 18:53 and 2026-12-01 15:04, H200): name the candidates
more than once, alternated with the default (``--policies inductor+attn-s32w1,inductor,inductor+attn-s32w1,
inductor``), before choosing by a few percent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_families  # noqa: E402

import encdec_core.runtime.cuda.triton_kernels as tk  # noqa: E402
from encdec_core.benchmark import model_from_preset  # noqa: E402
from encdec_core.runtime.cuda import CudaGraphRunner  # noqa: E402

BASE = tk.linear_config
BASE_ATTN = tk.attention_config


# A policy has linear_config's signature and varies the default (``base``, the configuration
# triton_kernels ships) in one respect.

def _fullk(per_thread: int):
    """Batch <= 2 with PDL: the whole weight slice in registers, ``per_thread`` elements a thread
    (the default: 64)."""
    def policy(M, N, K, gated=False, weight_bytes=2, pdl=False):
        cfg = BASE(M, N, K, gated, weight_bytes, pdl)
        if pdl and not cfg["USE_DOT"] and weight_bytes == 2:
            min_warps = BASE(M, N, K, gated, weight_bytes)["num_warps"]
            cfg["num_warps"] = tk.slice_warps(cfg["BLOCK_N"], cfg["BLOCK_K"], gated, min_warps, per_thread)
            tk._stats_blocks(cfg, N, K)
        return cfg
    return policy


def _k512(M, N, K, gated=False, weight_bytes=2, pdl=False):
    """Batch <= 2: the K-chunked configuration used without PDL (512-wide chunks)."""
    return BASE(M, N, K, gated, weight_bytes)


def _dot(block_k: int, warps: int):
    """Batch > 2 (tensor cores): another K chunk / warp count (the default: 256 / 4)."""
    def policy(M, N, K, gated=False, weight_bytes=2, pdl=False):
        cfg = BASE(M, N, K, gated, weight_bytes, pdl)
        if cfg["USE_DOT"]:
            bk = min(block_k, max(16, tk._next_pow2(K)))
            cfg.update(BLOCK_K=bk, num_warps=warps, UNROLL=tk._cdiv(K, bk) <= tk._max_unroll(16))
            tk._stats_blocks(cfg, N, K)
        return cfg
    return policy


def _fma(warps: int):
    """Batch 3..8 on CUDA-core FMAs (the configuration before the tensor-core path)."""
    def policy(M, N, K, gated=False, weight_bytes=2, pdl=False):
        cfg = BASE(M, N, K, gated, weight_bytes, pdl)
        if 2 < M <= 8:
            bm = tk._next_pow2(M)
            bk = min(32 * max(1, 16 // weight_bytes), max(16, tk._next_pow2(K)))
            cfg.update(BLOCK_M=bm, BLOCK_N=4, BLOCK_K=bk, USE_DOT=False, num_warps=warps,
                       UNROLL=tk._cdiv(K, bk) <= tk._max_unroll(bm))
            tk._stats_blocks(cfg, N, K)
        return cfg
    return policy


def _big(bm: int, bn: int, bk: int, warps: int, stages: int):
    """Batch > 16: ``bm`` rows (at most the batch's power of two) x ``bn`` columns per program, a
    software-pipelined K loop of ``bk`` chunks with ``stages`` stages (the tiled kernel with its
    default split-K for these tiles)."""
    return _tiled(bn=bn, bk=bk, warps=warps, stages=stages, bm=bm)


def _tiled(bn=None, bk=None, warps=None, stages=None, split=None, target=None, bm=None, tma=False):
    """Batch > 16 on the tiled kernel: change one of its knobs (column tile ``bn``, K chunk ``bk``,
    warps, pipeline stages, row tile ``bm``) and the split-K factor: ``split`` fixed, or the default
    heuristic aiming at ``target`` programs (256) with the new tiles; ``tma``: weight tiles through a
    tensor descriptor."""
    def policy(M, N, K, gated=False, weight_bytes=2, pdl=False):
        cfg = BASE(M, N, K, gated, weight_bytes, pdl)
        if cfg.get("BIG"):
            if bm:
                cfg["BLOCK_M"] = min(bm, tk._next_pow2(M))
            if bn:
                cfg["BLOCK_N"] = bn
            if bk:
                cfg["BLOCK_K"] = min(bk, max(16, tk._next_pow2(K)))
            if warps:
                cfg["num_warps"] = warps
            if stages:
                cfg["num_stages"] = stages
            if tma and (K * weight_bytes) % 16 == 0:
                cfg["W_TMA"] = True
            cfg["SPLIT_K"] = split or tk.split_k_default(M, N, K, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"],
                                                         target=target or 256)
            tk._stats_blocks(cfg, N, K)
        return cfg
    return policy


def _gemv_rows(bm_max: int, bn: int = 16, warps: int = 4, bk: int = 256):
    """16 < M <= ``bm_max`` on the tensor-core GEMV path of batches 3-16 instead of the tiled kernel:
    one row tile of all M rows (``BLOCK_M`` = M's power of two), ``bn`` columns a program, the K
    loop in ``bk`` chunks unrolled up to 4, so every weight byte is read once, issued before the
    PDL wait (the tiled kernel pipelines a rolled loop after it)."""
    def policy(M, N, K, gated=False, weight_bytes=2, pdl=False):
        if not 16 < M <= bm_max:
            return BASE(M, N, K, gated, weight_bytes, pdl)
        cfg = BASE(16, N, K, gated, weight_bytes, pdl)
        kb = min(bk, max(16, tk._next_pow2(K)))
        cfg.update(BLOCK_M=tk._next_pow2(M), BLOCK_N=bn, BLOCK_K=kb, num_warps=warps,
                   UNROLL=tk._cdiv(K, kb) <= tk._max_unroll(16))
        tk._stats_blocks(cfg, N, K)
        return cfg
    return policy


def _attn_split(self_t=None, self_w=None, cross_t=None, cross_w=None):
    """Attention: self- and cross-attention key tiles / warps chosen apart (None: the default's, see
    ``triton_kernels.attention_config``)."""
    def cfg(D, T=None, self_mode=True, pdl=False, batch=None):
        c = BASE_ATTN(D, T, self_mode, pdl, batch)
        t, w = (self_t, self_w) if self_mode else (cross_t, cross_w)
        if t:
            c["BLOCK_T"] = t
        if w:
            c["num_warps"] = w
        return c
    return cfg


def _attn(block_t=None, warps=None, cross_only=False):
    """Attention: another key tile / warp count for both attentions; ``cross_only``: for
    cross-attention only (its whole source in one tile, loaded before the PDL wait, when it fits)."""
    return _attn_split(None if cross_only else block_t, None if cross_only else warps, block_t, warps)


ATTN_POLICIES = {
    "attn-t32": _attn(32), "attn-t128": _attn(128), "attn-w1": _attn(warps=1), "attn-w2": _attn(warps=2),
    "attn-w4": _attn(warps=4),
    "attn-t128w8": _attn(128, 8), "attn-t32w2": _attn(32, 2),
    "attn-x64": _attn(64, cross_only=True), "attn-x128w8": _attn(128, 8, cross_only=True),
    "attn-x32": _attn(32, cross_only=True), "attn-x32w2": _attn(32, 2, cross_only=True),
}


# attn-s<keys>[w<warps>] (self-attention only), attn-c<keys>[w<warps>] (cross only), and the pairs
for _t in (16, 32, 64, 128):
    for _w in (None, 1, 2, 4):
        _sfx = f"{_t}" + (f"w{_w}" if _w else "")
        ATTN_POLICIES[f"attn-s{_sfx}"] = _attn_split(self_t=_t, self_w=_w)
        ATTN_POLICIES[f"attn-c{_sfx}"] = _attn_split(cross_t=_t, cross_w=_w)
        for _t2 in (16, 32, 64, 128):
            for _w2 in (None, 1, 2, 4):
                ATTN_POLICIES[f"attn-s{_sfx}c{_t2}" + (f"w{_w2}" if _w2 else "")] = \
                    _attn_split(_t, _w, _t2, _w2)

POLICIES = {
    "base": BASE,
    "fullk32": _fullk(32),
    "fullk128": _fullk(128),
    "k512": _k512,
    "dot-k128": _dot(128, 4),
    "dot-w8": _dot(256, 8),
    "fma": _fma(1),
    "fma-w4": _fma(4),
    "big-m32n32": _big(32, 32, 64, 4, 3),
    "big-m64n32": _big(64, 32, 64, 4, 3),
    "big-m64n64": _big(64, 64, 64, 4, 3),
    "big-m64n64w8": _big(64, 64, 64, 8, 3),
    "big-m64n128w8": _big(64, 128, 64, 8, 3),
    "big-m128n64w8": _big(128, 64, 64, 8, 3),
    # the tiled kernel (split-K, producer-written norm statistics)
    "tiled-nosplit": _tiled(split=1),
    "tiled-n32": _tiled(bn=32),
    "tiled-n128": _tiled(bn=128, warps=8),
    "tiled-k64": _tiled(bk=64),
    "tiled-k128": _tiled(bk=128),
    "tiled-k256": _tiled(bk=256),
    "tiled-k256w8": _tiled(bk=256, warps=8),
    "tiled-k128s2": _tiled(bk=128, stages=2),
    "tiled-tma": _tiled(tma=True),
    "tiled-tma-s4": _tiled(tma=True, stages=4),
    "tiled-w8": _tiled(warps=8),
    "tiled-s4": _tiled(stages=4),
    "tiled-s2": _tiled(stages=2),
    "tiled-t128": _tiled(target=128),
    "tiled-t512": _tiled(target=512),
    "tiled-m32": _tiled(bm=32),
    "tiled-m128": _tiled(bm=128, warps=8),
    # batches 17-64 on the GEMV path (one row tile)
    "gemv-m64": _gemv_rows(64),
    "gemv-m64n32": _gemv_rows(64, bn=32),
    "gemv-m64w8": _gemv_rows(64, warps=8),
    "gemv-m64k128": _gemv_rows(64, bk=128),
}


COMPILED = {  # the compiled step's base policies: (attention, torch.compile mode, TunableOp, inductor options)
    # the runner's default options (None): inductor's kernels with PDL on Hopper+ (default_compile_options)
    "inductor": ("triton", None, False, None),
    "inductor-nopdl": ("triton", None, False, {}),
    "inductor-math": ("math", None, False, None),
    "inductor-autotune": ("triton", "max-autotune-no-cudagraphs", False, None),  # inductor's GEMM templates too
    # torch.cuda.tunable: every cuBLAS / cuBLASLt GEMM benchmarks the library's algorithms for its
    # shape at the first call (the warm-up before graph capture) and keeps the fastest
    "inductor-tunableop": ("triton", None, True, None),
    # inductor's own kernels with programmatic dependent launch, asked for explicitly (compile_options)
    "inductor-pdl": ("triton", None, False, {"triton.enable_pdl": True}),
    # the runner's default options, the Triton attention ops launched without PDL
    "inductor-noattnpdl": ("triton", None, False, None),
}
RUNNER_KW = {"inductor-noattnpdl": dict(attention_pdl=False)}  # further runner keywords of a base policy


def _compiled(policy: str):
    """The inductor-compiled model step: "inductor" (its default attention, the Triton op on CUDA),
    "inductor-math" (inductor's own fp32 reductions), "inductor-autotune" (compile mode
    max-autotune-no-cudagraphs: inductor benchmarks its Triton GEMM templates, with fused epilogues,
    against cuBLAS per shape), "inductor-pdl" / "inductor-nopdl" (inductor's kernels with / without
    PDL; "inductor" takes the runner's default: with it on Hopper), "inductor-noattnpdl" (the default
    without PDL for the attention ops), each optionally
    "+<attention policy>" (the Triton op with that policy's block sizes) -> (attention, attention
    policy or None, compile mode, TunableOp, inductor options or None); else None."""
    base, _, attn = policy.partition("+")
    if base not in COMPILED or (attn and base == "inductor-math"):
        return None
    attention, mode, tunable, options = COMPILED[base]
    return attention, attn or None, mode, tunable, options


def _known(policy: str) -> bool:
    comp = _compiled(policy)
    if comp:
        return comp[1] in (None, *ATTN_POLICIES)
    return policy in POLICIES or policy in ATTN_POLICIES


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="bart-large")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--policies", default="base,k512,fma",
                    help=f"of {sorted(POLICIES) + sorted(ATTN_POLICIES)}, or the compiled step: {sorted(COMPILED)}, "
                         "inductor[-autotune]+<attention policy>")
    ap.add_argument("--inductor", action="store_true", help="also time the inductor-compiled step")
    ap.add_argument("--nopdl", action="store_true", help="also time each policy without PDL")
    ap.add_argument("--fused-max-batch", type=int, default=16, help="largest batch bucket of the Triton step")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    unknown = [p for p in a.policies.split(",") if not _known(p)]
    if unknown:
        ap.error(f"unknown policies {sorted(unknown)}")
    ensure_families()
    batches = [int(b) for b in a.batches.split(",")]
    res = []
    for name in a.models.split(","):
        model = model_from_preset(name, torch.bfloat16, "cuda", seed=0)
        ids = torch.randint(3, model.cfg.vocab_size, (max(batches), 128), device="cuda")
        runs = [(p, True) for p in a.policies.split(",")]
        if a.nopdl:
            runs += [(p, False) for p in a.policies.split(",")]
        if a.inductor:
            runs.append(("inductor", False))
        ref = None
        for pol, pdl in runs:
            comp = _compiled(pol)
            tk.linear_config = POLICIES.get(pol, BASE)
            tk.attention_config = ATTN_POLICIES.get(comp[1] if comp else pol, BASE_ATTN)
            t = time.perf_counter()
            tunable = bool(comp and comp[3])
            if tunable:
                torch.cuda.tunable.enable(True)
                torch.cuda.tunable.tuning_enable(True)
            try:
                r = CudaGraphRunner(model, max(batches), 80, 128, compile=bool(comp),
                                    compile_mode=comp[2] if comp else None,
                                    kernels="inductor" if comp else "triton",
                                    attention=comp[0] if comp else "auto",
                                    fused_max_batch=a.fused_max_batch,
                                    compile_options=comp[4] if comp else None,
                                    **(RUNNER_KW.get(pol.partition("+")[0], {}) if comp else {}))
                if r._fused is not None:
                    r._fused.pdl = r._fused.pdl and pdl
                r.warmup(batch_sizes=batches, source_lens=(128,), kinds=("greedy",), eos=-1, pad=0)
                # tokens of every batch bucket against the first run's (a wrong kernel shows here)
                toks = [r.greedy(ids[:b], None, 24, eos=-1) for b in batches]
                ref = ref or toks
                match = [(x == y).float().mean().item() for x, y in zip(toks, ref)]
                for b, mt in zip(batches, match):
                    ms = r.time_step(ids[:b], None, steps=64)
                    row = dict(model=name, policy=pol, pdl=bool(r._fused is not None and r._fused.pdl),
                               batch=b, ms=ms, token_match_vs_first=mt, setup_s=time.perf_counter() - t)
                    res.append(row)
                    print(f"{name:14s} {pol:10s} pdl={int(row['pdl'])} b{b:<3d} {ms:.4f} ms/step "
                          f"(tokens vs first run {mt:.3f})", flush=True)
                del r
            except Exception as exc:  # a survey: keep going
                print(f"{name} {pol} FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            if tunable:
                print(f"{name} {pol}: {len(torch.cuda.tunable.get_results())} tuned GEMM shapes", flush=True)
                torch.cuda.tunable.enable(False)
            torch.cuda.empty_cache()
        tk.linear_config, tk.attention_config = BASE, BASE_ATTN
        del model
        torch.cuda.empty_cache()
        with open(os.path.join(a.out, "sweep_step.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
