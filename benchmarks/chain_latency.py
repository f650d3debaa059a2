"""What a kernel boundary costs in a chain of dependent kernels (GPU, CUDA graph replay).

The batch-1 decoder step is a chain of ~100 dependent kernels. This measures the per-kernel time of
a chain of N trivial Triton kernels (each program reads one element its predecessor wrote, adds 1
and writes it), replayed from a CUDA graph, launched

- plain: each kernel starts when the previous one has finished;
- pdl: programmatic dependent launch, ``griddepcontrol.wait`` before the read;
- flag: PDL launch, but instead of ``griddepcontrol.wait`` each program spins on a counter that the
  previous kernel's programs increment (release / acquire) after their stores: a kernel's consumers
  go on as soon as its last store is visible, not when its grid has retired.

    python benchmarks/chain_latency.py [--kernels 100] [--programs 256] [--warps 4]
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _fence_acq_rel():
    tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _step_kernel(x_ptr, y_ptr, cnt_ptr, idx, n_prev, MODE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if MODE == 1:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if MODE == 2:
        if idx > 0:
            c = tl.atomic_add(cnt_ptr + idx - 1, 0, sem="acquire")
            while c < n_prev:
                c = tl.atomic_add(cnt_ptr + idx - 1, 0, sem="acquire")
        tl.extra.cuda.gdc_launch_dependents()
    v = tl.load(x_ptr + offs, cache_modifier=".cg" if MODE == 2 else "")
    tl.store(y_ptr + offs, v + 1.0)
    if MODE == 2:
        _fence_acq_rel()
        tl.debug_barrier()
        tl.atomic_add(cnt_ptr + idx, 1, sem="release")


def run(mode: str, n_kernels: int, programs: int, warps: int, replays: int = 20) -> tuple[float, bool]:
    code = {"plain": 0, "pdl": 1, "flag": 2}[mode]
    block = 32 * warps
    bufs = [torch.zeros(programs * block, device="cuda") for _ in range(2)]
    cnt = torch.zeros(n_kernels, dtype=torch.int32, device="cuda")

    def chain():
        cnt.zero_()
        bufs[0].zero_()
        for i in range(n_kernels):
            src, dst = bufs[i % 2], bufs[(i + 1) % 2]
            _step_kernel[(programs,)](src, dst, cnt, i, programs, MODE=code, BLOCK=block, num_warps=warps,
                                      launch_pdl=code > 0)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        chain()
    g.replay()
    torch.cuda.synchronize()
    ok = bool((bufs[n_kernels % 2] == float(n_kernels)).all())
    times = []
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / replays / n_kernels * 1e3)
    ok = ok and bool((bufs[n_kernels % 2] == float(n_kernels)).all())
    return sorted(times)[1], ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", type=int, default=100)
    ap.add_argument("--programs", default="132,256,1024")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    res = []
    for p in [int(x) for x in a.programs.split(",")]:
        for mode in ("plain", "pdl", "flag"):
            us, ok = run(mode, a.kernels, p, a.warps)
            res.append(dict(mode=mode, programs=p, warps=a.warps, us_per_kernel=us, correct=ok))
            print(f"{mode:6s} programs={p:5d} warps={a.warps} {us:6.2f} us/kernel  correct={ok}", flush=True)
    with open(os.path.join(a.out, "chain_latency.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
