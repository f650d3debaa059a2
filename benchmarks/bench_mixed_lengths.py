"""Mixed source lengths: the encoder in length groups (the runner's default) against one padded call
(``encoder_launch_cost=0``), on the same requests; encoder time, end-to-end greedy time, the number
of groups and the share of tokens equal to the one-call run's. Random weights of the preset's
shapes, lengths uniform in [--min-len, --max-len]. ``--launch-costs 2048,8192`` times those costs
too (token-rows one more encoder call is worth; "default" is the runner's).

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
    ap.add_argument("--launch-costs", default="default",
                    help="comma-separated encoder launch costs to time against one call ('default': the runner's)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    ensure_families()
    from encdec_core.benchmark import model_from_preset
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.encode import default_launch_cost, plan_groups
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
            costs = [None if c == "default" else int(c) for c in a.launch_costs.split(",")]
            runs = [("one_call", 0)] + [("groups" if c is None else f"cost{c}", c) for c in costs]
            for label, cost in runs:
                r = CudaGraphRunner(model, b, a.out_len + 4, a.max_len, use_graphs=cuda, compile=cuda,
                                    encoder_launch_cost=cost)
                generate(model, ids, mask, gc, runner=r)  # compile / capture
                enc, e2e = [], []
                for _ in range(a.repeats):
                    enc.append(_time(lambda: r.encode(ids, mask), cuda)[0])
                    t, out = _time(lambda: generate(model, ids, mask, gc, runner=r), cuda)
                    e2e.append(t)
                toks[label] = out.sequences
                c = default_launch_cost(torch.device(a.device).type) if cost is None else cost
                n_groups = len(plan_groups(lens, c)) if c > 0 else 1
                res[label] = dict(encoder_ms=statistics.median(enc), e2e_ms=statistics.median(e2e),
                                  launch_cost=c, groups=n_groups,
                                  token_match=(out.sequences == toks["one_call"]).float().mean().item()
                                  if label != "one_call" else 1.0)
                del r
            row = dict(model=name, batch=b, lengths=f"{a.min_len}-{a.max_len}", out_len=a.out_len,
                       device=a.device, dtype=a.dtype, **{f"{k}_{m}": v for k, d in res.items() for m, v in d.items()})
            rows.append(row)
            for label, _ in runs[1:]:
                print(f"{name:12s} b{b:<4d} {label:9s} (cost {res[label]['launch_cost']}, {res[label]['groups']} groups) "
                      f"encoder {res['one_call']['encoder_ms']:8.1f} -> {res[label]['encoder_ms']:8.1f} ms  "
                      f"end-to-end {res['one_call']['e2e_ms']:8.1f} -> {res[label]['e2e_ms']:8.1f} ms  "
                      f"tokens equal to one call {res[label]['token_match']:.3f}", flush=True)
        del model
    with open(os.path.join(a.out, "bench_mixed_lengths.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
