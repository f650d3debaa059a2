"""Where a greedy request's time outside the decode steps goes, on the CUDA graph runner: the encoder,
the prefill (encoder + cross-K/V projections into the static caches), the host's time to launch the
prefill (no synchronisation), the whole ``runner.greedy`` request, and 64 graph steps.

Random weights of the preset's real shapes, source length 128, 64 new tokens (EOS suppressed); best of
5 (greedy: 3) after two warm-up requests; ms.

    PYTHONPATH=.:families python benchmarks/time_prefill.py --model bart-large --batches 1,64 [--prefill-graphs 0,1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import best_ms, ensure_families  # noqa: E402


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bart-large")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prefill-graphs", default="0",
                    help="comma-separated runner settings to compare: 0 (the eager prefill), 1 (prefill_graphs=True)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    ensure_families()
    from encdec_core.benchmark import model_from_preset
    from encdec_core.runtime.cuda import CudaGraphRunner

    batches = [int(x) for x in a.batches.split(",")]
    model = model_from_preset(a.model, dtype=getattr(torch, a.dtype), device="cuda")
    rows = []
    for setting in [bool(int(x)) for x in a.prefill_graphs.split(",")]:
        runner = CudaGraphRunner(model, max(batches), a.new + 16, 128, prefill_graphs=setting)
        rows += run(runner, model, batches, a.new, setting)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"time_prefill_{a.model}.json"), "w") as f:
        json.dump(rows, f, indent=1)


def run(runner, model, batches, new: int, setting: bool) -> list:
    rows = []
    for b in batches:
        ids = torch.randint(4, model.cfg.vocab_size, (b, 128), device="cuda")
        mask = torch.ones_like(ids)
        request = lambda: runner.greedy(ids, mask, max_new_tokens=new, min_new_tokens=new)  # noqa: E731
        for _ in range(2):
            request()
        sync = torch.cuda.synchronize
        enc = best_ms(lambda: runner.encode(ids, mask), 5, sync)[0]
        pre = best_ms(lambda: runner.prefill(ids, mask, 1, new + 1), 5, sync)[0]
        pre_host = best_ms(lambda: runner.prefill(ids, mask, 1, new + 1), 5, sync, wait=False)[0]
        req = best_ms(request, 3, sync)[0]
        step = runner.time_step(ids, None, steps=new)
        row = dict(prefill_graphs=setting, batch=b, encoder_ms=enc, prefill_ms=pre, prefill_host_launch_ms=pre_host,
                   request_ms=req, step_ms=step, loop_rest_ms=req - pre - new * step)
        rows.append(row)
        print(f"prefill_graphs={int(setting)} batch {b}: encoder {enc:.2f} ms, prefill {pre:.2f} (host launch "
              f"{pre_host:.2f}), request {req:.2f}, {new} steps {new * step:.2f} ({step:.4f} each); rest of the "
              f"loop {req - pre - new * step:.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
