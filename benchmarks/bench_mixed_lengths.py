"""Mixed source lengths: the encoder in length groups (the runner's default) against one padded call
(``encoder_launch_cost=0``), on the same requests; encoder time, end-to-end greedy time and whether
the tokens are equal. Random weights of the preset's shapes, lengths uniform in [--min-len, --max-len].

    PYTHONPATH=.:families python benchmarks/bench_mixed_lengths.py --models t5-small,bart-base --batches 8,32
    PYTHONPATH=.:families python benchmarks/bench_mixed_lengths.py --device cuda --dtype bfloat16 \
        --models t5-small,bart-large --batches 64,256 --min-len 16 --max-len 512 --out-len 64
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_families  # noqa: E402


def _time(fn, cuda: bool) -> tuple:
    """(wall milliseconds of fn(), its result), synchronising the GPU around it."""
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="t5-small,bart-base")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--min-len", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=60)
    ap.add_argument("--out-len", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    ensure_families()
    from encdec_core.benchmark import model_from_preset
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.generation import GenerationConfig, generate

    cuda = a.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    rows = []
    for name in a.models.split(","):
        model = model_from_preset(name, dtype, a.device, seed=0)
        cfg = model.cfg
        for b in (int(x) for x in a.batches.split(",")):
            rng = random.Random(b)
            lens = [rng.randint(a.min_len, a.max_len) for _ in range(b)]
            ids = torch.randint(4, cfg.vocab_size, (b, a.max_len))
            mask = torch.zeros_like(ids)
            for r, n in enumerate(lens):
                mask[r, :n] = 1
                ids[r, n:] = cfg.pad_token_id
            ids, mask = ids.to(a.device), mask.to(a.device)
            gc = GenerationConfig.from_model(cfg, None, max_new_tokens=a.out_len, min_new_tokens=a.out_len)
            res, toks = {}, {}
            for label, cost in (("one_call", 0), ("groups", None)):
                r = CudaGraphRunner(model, b, a.out_len + 4, a.max_len, use_graphs=cuda, compile=cuda,
                                    encoder_launch_cost=cost)
                generate(model, ids, mask, gc, runner=r)  # compile / capture
                enc, e2e = [], []
                for _ in range(a.repeats):
                    enc.append(_time(lambda: r.encode(ids, mask), cuda)[0])
                    t, out = _time(lambda: generate(model, ids, mask, gc, runner=r), cuda)
                    e2e.append(t)
                toks[label] = out.sequences
                res[label] = dict(encoder_ms=statistics.median(enc), e2e_ms=statistics.median(e2e))
                del r
            row = dict(model=name, batch=b, lengths=f"{a.min_len}-{a.max_len}", out_len=a.out_len,
                       device=a.device, dtype=a.dtype, **{f"{k}_{m}": v for k, d in res.items() for m, v in d.items()},
                       tokens_equal=bool(torch.equal(toks["one_call"], toks["groups"])))
            rows.append(row)
            print(f"{name:12s} b{b:<4d} encoder {row['one_call_encoder_ms']:8.1f} -> {row['groups_encoder_ms']:8.1f} ms"
                  f"  end-to-end {row['one_call_e2e_ms']:8.1f} -> {row['groups_e2e_ms']:8.1f} ms"
                  f"  tokens equal {row['tokens_equal']}", flush=True)
        del model
    with open(os.path.join(a.out, "bench_mixed_lengths.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
