"""Block-size policies of the Triton step, timed in the real decoder step (GPU).

``tune_triton.py`` times one GEMV replayed alone, with its weight L2-resident: good for ranking tiles,
blind to what happens between kernels (programmatic dependent launch, L2 traffic of the neighbours).
This script swaps ``triton_kernels.linear_config`` for a named policy and times the whole Triton
decoder step (fused greedy loop replayed from its CUDA graph; random weights of the preset's real
shapes, bf16, source length 128) per model and batch size, against the inductor-compiled step.

    PYTHONPATH=.:families python benchmarks/sweep_step.py --models bart-large --batches 1,8 \
        --policies base,fullk,dot [--inductor] [--out DIR]
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
from explore_gpu import time_runner  # noqa: E402

import encdec_core.runtime.cuda.triton_kernels as tk  # noqa: E402
from encdec_core.benchmark import model_from_preset  # noqa: E402
from encdec_core.runtime.cuda import CudaGraphRunner  # noqa: E402

BASE = tk.linear_config
BASE_ATTN = tk.attention_config


def _fullk(M, N, K, gated=False, weight_bytes=2, warps_cap=8, per_thread=64):
    """M <= 2: one K chunk (the whole weight slice of a program loaded before the PDL wait), with
    enough warps that a thread holds at most ``per_thread`` weight elements."""
    cfg = BASE(M, N, K, gated, weight_bytes)
    if cfg["BLOCK_M"] <= 2 and not cfg["USE_DOT"]:
        kp = tk._next_pow2(K)
        elems = cfg["BLOCK_N"] * kp * (2 if gated else 1)
        warps = min(warps_cap, max(cfg["num_warps"], tk._next_pow2(tk._cdiv(elems, 32 * per_thread))))
        cfg.update(BLOCK_K=kp, UNROLL=True, num_warps=warps)
        tk._stats_blocks(cfg, N, K)
    return cfg


def _dot(M, N, K, gated=False, weight_bytes=2, block_k=128, block_n=16, warps=4):
    """M > 2: the tensor-core path (rows padded to 16)."""
    cfg = BASE(M, N, K, gated, weight_bytes)
    if M > 2:
        cfg.update(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=True, num_warps=warps,
                   UNROLL=tk._cdiv(K, block_k) <= 4)
        tk._stats_blocks(cfg, N, K)
    return cfg


def _fma_warps(M, N, K, gated=False, weight_bytes=2, warps=4):
    cfg = BASE(M, N, K, gated, weight_bytes)
    if 2 < M <= 8:
        cfg.update(num_warps=warps)
        tk._stats_blocks(cfg, N, K)
    return cfg


def _attn(block_t=None, warps=None):
    def cfg(D):
        c = BASE_ATTN(D)
        if block_t:
            c["BLOCK_T"] = block_t
        if warps:
            c["num_warps"] = warps
        return c
    return cfg


ATTN_POLICIES = {
    "attn-t32": _attn(32), "attn-t128": _attn(128), "attn-w1": _attn(warps=1), "attn-w2": _attn(warps=2),
    "attn-t128w8": _attn(128, 8), "attn-t32w2": _attn(32, 2),
}

POLICIES = {
    "base": BASE,
    "fullk": _fullk,
    "fullk32": lambda *a, **k: _fullk(*a, per_thread=32, **k),
    "fullk128": lambda *a, **k: _fullk(*a, per_thread=128, **k),
    "dot": _dot,
    "dot-k256": lambda *a, **k: _dot(*a, block_k=256, **k),
    "dot-w8": lambda *a, **k: _dot(*a, block_k=256, warps=8, **k),
    "fma-w4": _fma_warps,
    "fullk+dot": lambda M, N, K, gated=False, weight_bytes=2: (
        _fullk(M, N, K, gated, weight_bytes) if M <= 2 else _dot(M, N, K, gated, weight_bytes)),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="bart-large")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--policies", default="base,fullk,dot")
    ap.add_argument("--inductor", action="store_true", help="also time the inductor-compiled step")
    ap.add_argument("--nopdl", action="store_true", help="also time each policy without PDL")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
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
            tk.linear_config = POLICIES.get(pol, BASE)
            tk.attention_config = ATTN_POLICIES.get(pol, BASE_ATTN)
            t = time.perf_counter()
            try:
                r = CudaGraphRunner(model, max(batches), 80, 128, compile=pol == "inductor",
                                    kernels="inductor" if pol == "inductor" else "triton")
                if r._fused is not None:
                    r._fused.pdl = r._fused.pdl and pdl
                r.warmup(batch_sizes=batches, source_lens=(128,), kinds=("greedy",), eos=-1, pad=0)
                # tokens of every batch bucket against the first run's (a wrong kernel shows here)
                toks = [r.greedy(ids[:b], None, 24, eos=-1) for b in batches]
                ref = ref or toks
                match = [(x == y).float().mean().item() for x, y in zip(toks, ref)]
                for b, mt in zip(batches, match):
                    ms = time_runner(r, ids[:b])
                    row = dict(model=name, policy=pol, pdl=bool(r._fused is not None and r._fused.pdl),
                               batch=b, ms=ms, token_match_vs_first=mt, setup_s=time.perf_counter() - t)
                    res.append(row)
                    print(f"{name:14s} {pol:10s} pdl={int(row['pdl'])} b{b:<3d} {ms:.4f} ms/step "
                          f"(tokens vs first run {mt:.3f})", flush=True)
                del r
            except Exception as exc:  # a survey: keep going
                print(f"{name} {pol} FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            torch.cuda.empty_cache()
        tk.linear_config, tk.attention_config = BASE, BASE_ATTN
        del model
        torch.cuda.empty_cache()
        with open(os.path.join(a.out, "sweep_step.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
