"""generate(..., runner) greedy on the CUDA graph runner: generate's token loop (fused_greedy=False,
a host round trip per token) against the runner's fused loop (fused_greedy=True, the default).

Random weights of the preset's real shapes, source length 128, 64 new tokens, with EOS suppressed
(min_new_tokens 64) and without; wall time per request (best of 3 after a warm-up), and whether both
loops give the same tokens.

    PYTHONPATH=.:families python benchmarks/time_generate_greedy.py --model bart-large --batches 1,8,64
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_loop_args, best_ms, ensure_families  # noqa: E402


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bart-large")
    ap.add_argument("--loops", default="token,fused", help="token (fused_greedy=False) and / or fused")
    add_loop_args(ap)
    a = ap.parse_args()
    ensure_families()
    from encdec_core.benchmark import model_from_preset
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.generation import GenerationConfig, generate

    batches = [int(x) for x in a.batches.split(",")]
    model = model_from_preset(a.model, dtype=getattr(torch, a.dtype), device=a.device)
    kw = dict(compile=False, use_graphs=False) if a.device == "cpu" else {}
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    cfg = model.cfg
    rows, seqs = [], {}
    loops = [x for x in a.loops.split(",") if x]
    if not loops or set(loops) - {"token", "fused"}:
        ap.error(f"--loops {a.loops!r}: expected token and / or fused")
    for fused in [x == "fused" for x in loops]:
        runner = CudaGraphRunner(model, max(batches), a.new + 16, 128, fused_greedy=fused, **kw)
        for b in batches:
            g = torch.Generator().manual_seed(b)
            ids = torch.randint(4, cfg.vocab_size, (b, 128), generator=g).to(a.device)
            mask = torch.ones_like(ids)
            for min_new in (a.new, 0):
                gc = GenerationConfig.from_model(cfg, None, max_new_tokens=a.new, min_new_tokens=min_new or None)
                generate(model, ids, mask, gc, runner=runner)  # warm-up: graphs captured
                ms, out = best_ms(lambda: generate(model, ids, mask, gc, runner=runner), 3, sync)
                seqs[(fused, b, min_new)] = out.sequences.cpu()
                row = dict(model=a.model, fused_greedy=fused, batch=b, min_new_tokens=min_new,
                           ms_per_request=ms, length=out.sequences.shape[1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    both = len(loops) == 2
    for row in rows:
        if both:
            x, y = seqs[(False, row["batch"], row["min_new_tokens"])], seqs[(True, row["batch"], row["min_new_tokens"])]
            row["same_tokens_both_loops"] = x.shape == y.shape and bool((x == y).all())
    print(f"{'batch':>5} {'min_new':>7} " + " ".join(f"{x + ' loop ms':>13}" for x in loops)
          + (f" {'same tokens':>11}" if both else ""))
    for b in batches:
        for mn in (a.new, 0):
            ts = [next(r for r in rows if r["fused_greedy"] is (x == "fused") and r["batch"] == b
                       and r["min_new_tokens"] == mn) for x in loops]
            print(f"{b:>5} {mn:>7} " + " ".join(f"{t['ms_per_request']:>13.2f}" for t in ts)
                  + (f" {str(ts[-1]['same_tokens_both_loops']):>11}" if both else ""))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"time_generate_greedy_{a.model}.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
