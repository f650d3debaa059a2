"""Where an end-to-end greedy request spends its time on the GPU, outside the decoder steps.

issue 6 compares end-to-end tokens/s. At batch 64-256 our end-to-end time exceeds encoder + 64 graph
steps by 1.4-18 ms (docs/performance.md, the 2026-11-30 19:08 table): the prefill's cross K/V, the
host's "all finished" checks, the first launches, the trim at the end. This script profiles one
request as the benchmark runs it (``CudaGraphRunner.greedy(..., min_new_tokens=64)``) with CPU and CUDA
activity and splits its wall time into: GPU busy, GPU idle before the first kernel, idle gaps between
kernels (each with the kernels on either side and the host call open at the time), idle after the last.

    PYTHONPATH=.:families python benchmarks/e2e_timeline.py --models flan-t5-large,bart-large --batches 64,256

Writes e2e_timeline_<model>_b<batch>.json to --out and prints the summary and the largest gaps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_families  # noqa: E402

import torch  # noqa: E402


def gaps_of(kernels: list[tuple[float, float, str]], min_us: float) -> tuple[float, list[dict]]:
    """kernels: (start_us, end_us, name) sorted by start. Returns (busy_us of their union, the idle gaps of
    at least ``min_us`` between them, each {"at_us", "us", "before", "after"})."""
    busy, gaps = 0.0, []
    cur_s, cur_e, cur_name = None, None, ""
    for s, e, n in kernels:
        if cur_e is None:
            cur_s, cur_e, cur_name = s, e, n
            continue
        if s > cur_e:
            busy += cur_e - cur_s
            if s - cur_e >= min_us:
                gaps.append({"at_us": cur_e, "us": s - cur_e, "before": cur_name[:60], "after": n[:60]})
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
        cur_name = n
    if cur_e is not None:
        busy += cur_e - cur_s
    return busy, gaps


def host_call_at(cpu_events, t_us: float) -> str:
    """The innermost host op open at t (the Python-level call that the GPU was waiting on)."""
    best = None
    for ev in cpu_events:
        if ev[0] <= t_us <= ev[1] and (best is None or ev[1] - ev[0] < best[1] - best[0]):
            best = ev
    return best[2][:70] if best else ""


@torch.no_grad()
def timeline(name: str, batch: int, in_len: int, out_len: int, out_dir: str, min_gap_us: float) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from encdec_core.benchmark import model_from_preset
    from encdec_core.runtime.cuda import CudaGraphRunner

    model = model_from_preset(name, torch.bfloat16, "cuda")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.cfg.vocab_size, (batch, in_len), generator=g).cuda()
    mask = torch.ones_like(ids)
    r = CudaGraphRunner(model, batch, out_len + 1, in_len)

    def run():
        return r.greedy(ids, mask, max_new_tokens=out_len, min_new_tokens=out_len)

    t0 = time.time()
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    compile_s = time.time() - t0
    walls = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        run()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t) * 1e3)
    # phases alone (CUDA events around each, host waits between them)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    torch.cuda.synchronize()
    ev[0].record()
    r.prefill(ids, mask, 1, out_len)  # the encoder and every layer's cross K/V (the graphed prefill)
    ev[1].record()
    torch.cuda.synchronize()
    prefill_ms = ev[0].elapsed_time(ev[1])
    step_ms = r.time_step(ids, mask)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t = time.perf_counter()
        run()
        torch.cuda.synchronize()
        prof_wall = (time.perf_counter() - t) * 1e3
    evs = prof.events()
    kern = sorted((e.time_range.start, e.time_range.end, e.name) for e in evs
                  if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)
    cpu = [(e.time_range.start, e.time_range.end, e.name) for e in evs if e.device_type.name == "CPU"]
    run_start = min(e[0] for e in cpu) if cpu else kern[0][0]  # the profiled region holds run() and its syncs
    run_end = max(e[1] for e in cpu) if cpu else kern[-1][1]
    busy, gaps = gaps_of(kern, min_gap_us)
    for gp in gaps:
        gp["host"] = host_call_at(cpu, gp["at_us"] + gp["us"] / 2)
        gp["at_us"] -= run_start
    gaps.sort(key=lambda x: -x["us"])
    res = {"model": name, "batch": batch, "in": in_len, "out": out_len, "compile_s": compile_s,
           "wall_ms_median": sorted(walls)[len(walls) // 2], "walls_ms": walls, "profiled_wall_ms": prof_wall,
           "prefill_ms": prefill_ms, "graph_step_ms": step_ms, "prefill_plus_steps_ms": prefill_ms + out_len * step_ms,
           "kernels": len(kern), "gpu_busy_ms": busy / 1e3,
           "idle_before_first_ms": (kern[0][0] - run_start) / 1e3 if kern else None,
           "idle_after_last_ms": (run_end - kern[-1][1]) / 1e3 if kern else None,
           "idle_between_ms": sum(x["us"] for x in gaps) / 1e3, "gaps_over": min_gap_us,
           "n_gaps": len(gaps), "gaps": gaps[:40]}
    with open(os.path.join(out_dir, f"e2e_timeline_{name}_b{batch}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"{name} b{batch}: wall {res['wall_ms_median']:.2f} ms (profiled {prof_wall:.2f}); prefill (encoder and "
          f"cross K/V) {prefill_ms:.2f} + {out_len} x graph step {step_ms:.3f} = {res['prefill_plus_steps_ms']:.2f}; "
          f"GPU busy {res['gpu_busy_ms']:.2f}, idle before first kernel {res['idle_before_first_ms']:.2f}, "
          f"between ({len(gaps)} gaps >= {min_gap_us:.0f} us) {res['idle_between_ms']:.2f}, "
          f"after last {res['idle_after_last_ms']:.2f}", flush=True)
    for gp in gaps[:12]:
        print(f"   gap {gp['us']:8.1f} us at {gp['at_us'] / 1e3:7.2f} ms  {gp['before']!r} -> {gp['after']!r}"
              f"  host: {gp['host']!r}", flush=True)
    del r, model
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="flan-t5-large,bart-large")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--io", default="128,64")
    ap.add_argument("--min-gap-us", type=float, default=3.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    ensure_families()
    in_len, out_len = (int(x) for x in a.io.split(","))
    for name in [m for m in a.models.split(",") if m]:
        for b in [int(x) for x in a.batches.split(",") if x]:
            timeline(name, b, in_len, out_len, a.out, a.min_gap_us)
    return 0


if __name__ == "__main__":
    sys.exit(main())
