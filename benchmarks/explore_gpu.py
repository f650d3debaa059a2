"""Exploration on the GPU: which means of fusion makes the decoder step fastest.

Runs, per model (random weights, bf16, batch 1 and 64, in 128): the eager step, the plain step
replayed from a CUDA graph, and the torch.compile'd step (inductor) under our own CUDA graph with
two attention formulations, and the Triton step (``kernels="triton"``, batch buckets <= 16; ``triton-nopdl``: without programmatic dependent launch). Prints ms per decode step and compile times; writes a JSON to $OUT.

    PYTHONPATH=.:families python benchmarks/explore_gpu.py [--models t5-small,...] [--out DIR]
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

from encdec_core.benchmark import model_from_preset  # noqa: E402
from encdec_core.runtime.cuda import CudaGraphRunner  # noqa: E402


def eager_greedy(model, ids, steps):
    enc = model.encode(ids)
    st = model.init_state(enc, None, steps + 1)
    tok = torch.full((ids.shape[0], 1), model.cfg.decoder_start_token_id, device=ids.device, dtype=torch.long)
    out = []
    for _ in range(steps):
        lg = model.decode(tok, st)[:, -1]
        tok = lg.argmax(-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, 1)


def time_eager_step(model, ids, steps=32):
    enc = model.encode(ids)
    st = model.init_state(enc, None, steps + 8)
    tok = torch.zeros((ids.shape[0], 1), device=ids.device, dtype=torch.long)
    for _ in range(4):
        model.decode(tok, st)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        model.decode(tok, st)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="t5-small,bart-large,flan-t5-large")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--variants", default="graph,compile-math,compile-sdpa")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager step timing")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    torch.manual_seed(0)
    ensure_families()
    res = []
    batches = [int(x) for x in a.batches.split(",")]
    for name in a.models.split(","):
        model = model_from_preset(name, torch.bfloat16, "cuda", seed=0)
        cfg = model.cfg
        print(f"== {name}", flush=True)
        ids = torch.randint(3, cfg.vocab_size, (max(batches), 128), device="cuda")
        row = {"model": name}
        if not a.no_eager:
            row["eager_b1_ms"] = time_eager_step(model, ids[:1])
            print(f"  eager step b1 {row['eager_b1_ms']:.3f} ms", flush=True)
        nb = max(batches)
        ref = eager_greedy(model, ids[:nb], 24)
        variants = a.variants.split(",")
        if name != a.models.split(",")[0] and len(variants) > 1:
            variants = [v for v in variants if v != "compile-sdpa"]
        for var in variants:
            # graph | compile-{math,sdpa} | triton[-{math,sdpa}]: the Triton step (kernels="triton") for
            # batch buckets <= 16, the compiled step with that attention above; triton-nopdl: the
            # Triton step without programmatic dependent launch
            parts = var.split("-")
            comp = parts[0] in ("compile", "triton")
            nopdl = "nopdl" in parts
            parts = [p for p in parts if p != "nopdl"]
            attn = parts[1] if len(parts) > 1 else "math"
            kernels = "triton" if parts[0] == "triton" else "inductor"
            t = time.perf_counter()
            try:
                r = CudaGraphRunner(model, max(batches), 80, 128, compile=comp, attention=attn, kernels=kernels)
                if nopdl and r._fused is not None:
                    r._fused.pdl = False
                if r._fused is not None:
                    row[f"{var}_pdl"] = bool(r._fused.pdl)
                r.warmup(batch_sizes=batches, source_lens=(128,), kinds=("greedy",), eos=-1, pad=0)
                ctime = time.perf_counter() - t
                out = r.greedy(ids[:nb], None, 24, eos=-1)[:, 1:]
                match = (out == ref).float().mean().item()
                row[f"{var}_compile_s"] = ctime
                row[f"{var}_match_vs_eager"] = match
                for b in batches:
                    ms = r.time_step(ids[:b], None, steps=64)
                    row[f"{var}_b{b}_ms"] = ms
                    print(f"  {var:14s} b{b:<4d} {ms:.4f} ms/step (compile+capture {ctime:.1f}s, match {match:.3f})",
                          flush=True)
            except Exception as exc:  # keep going: this is a survey
                row[f"{var}_error"] = f"{type(exc).__name__}: {exc}"[:500]
                print(f"  {var} FAILED {row[f'{var}_error']}", flush=True)
            torch.cuda.empty_cache()
        res.append(row)
        with open(os.path.join(a.out, "explore.json"), "w") as f:
            json.dump(res, f, indent=1)
        del model
        torch.cuda.empty_cache()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
