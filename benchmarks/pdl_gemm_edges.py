"""Programmatic (PDL) edges into cuBLAS's GEMMs in a captured graph: a probe (GPU, Hopper).

Inductor's kernels and ours are launched with programmatic dependent launch: each may start while
its predecessor runs and waits (``griddepcontrol.wait``) before it reads the predecessor's writes.
cuBLAS's GEMMs between them are ordinary launches, so each starts after the kernel before it has
ended and pays its launch and prologue then (~5-6 µs a GEMM at 32-64 rows, docs/performance.md).
This probe rewrites a captured graph's default edges kernel -> cuBLAS GEMM, after capture and before
instantiation, into the programmatic edges a PDL launch records (driver API through ctypes:
``cuGraphGetEdges_v2`` / ``cuGraphRemoveDependencies_v2`` / ``cuGraphAddDependencies_v2``), which is
correct only if cuBLAS's kernels wait before they read their inputs. Two parts:

1. race: a chain of GEMMs, each fed by a Triton kernel that releases its dependants at once
   (``gdc_launch_dependents``), then spins, then writes the GEMM's input; every input buffer is
   NaN-filled at the start of the graph. A GEMM that does not wait reads NaN.
2. chain: six GEMMs per layer of bart-large (12 layers) / flan-t5-large (24), their real shapes and
   their own weights (streamed from HBM), an inductor-like PDL copy kernel between them; µs per GEMM
   with default and with programmatic edges at 32 / 64 / 256 rows.

2026-12-01 (H200, torch 2.11.0+cu130): the race part reads NaN in 50 of 50 replays with the
programmatic edges (cuBLAS's nvjet kernels do not wait), so the 0.6-0.9 µs per GEMM the chain part
shows is not to be had this way; the runner has no such option.

    PYTHONPATH=.:families python benchmarks/pdl_gemm_edges.py --parts race,chain [--out DIR]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import capture_graph  # noqa: E402

_CU_GRAPH_NODE_TYPE_KERNEL = 0
_DEPENDENCY_TYPE_DEFAULT = 0
_DEPENDENCY_TYPE_PROGRAMMATIC = 1
_PORT_PROGRAMMATIC = 1

# cuBLAS's GEMM kernels on Hopper (nvjet_*, sm90_xmma_gemm_*, cutlass_*), and its split-K reduction
GEMM_KERNEL = re.compile(r"nvjet|gemm|cutlass|splitKreduce", re.IGNORECASE)


class _EdgeData(ctypes.Structure):
    _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte), ("type", ctypes.c_ubyte),
                ("reserved", ctypes.c_ubyte * 5)]


class _KernelNodeParams(ctypes.Structure):  # CUDA_KERNEL_NODE_PARAMS_v2
    _fields_ = [("func", ctypes.c_void_p),
                ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("kernelParams", ctypes.c_void_p),
                ("extra", ctypes.c_void_p), ("kern", ctypes.c_void_p), ("ctx", ctypes.c_void_p)]


_LIB = None


def _driver():
    global _LIB
    if _LIB is None:
        _LIB = ctypes.CDLL("libcuda.so.1")
    return _LIB


def _check(rc: int, what: str) -> None:
    if rc != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(rc, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: CUDA error {rc} ({(msg.value or b'?').decode()})")


def kernel_name(node: int) -> str | None:
    """The kernel's (mangled) name of a graph node, None for other nodes."""
    lib = _driver()
    kind = ctypes.c_int()
    _check(lib.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(kind)), "cuGraphNodeGetType")
    if kind.value != _CU_GRAPH_NODE_TYPE_KERNEL:
        return None
    p = _KernelNodeParams()
    _check(lib.cuGraphKernelNodeGetParams_v2(ctypes.c_void_p(node), ctypes.byref(p)), "cuGraphKernelNodeGetParams")
    name = ctypes.c_char_p()
    if p.func:
        _check(lib.cuFuncGetName(ctypes.byref(name), ctypes.c_void_p(p.func)), "cuFuncGetName")
    elif p.kern:
        _check(lib.cuKernelGetName(ctypes.byref(name), ctypes.c_void_p(p.kern)), "cuKernelGetName")
    else:
        return ""
    return (name.value or b"").decode(errors="replace")


def edges(graph: int) -> list[tuple[int, int, _EdgeData]]:
    lib = _driver()
    n = ctypes.c_size_t(0)
    _check(lib.cuGraphGetEdges_v2(ctypes.c_void_p(graph), None, None, None, ctypes.byref(n)), "cuGraphGetEdges")
    frm, to = (ctypes.c_void_p * n.value)(), (ctypes.c_void_p * n.value)()
    data = (_EdgeData * n.value)()
    _check(lib.cuGraphGetEdges_v2(ctypes.c_void_p(graph), frm, to, data, ctypes.byref(n)), "cuGraphGetEdges")
    return [(frm[i] or 0, to[i] or 0, data[i]) for i in range(n.value)]


def programmatic_gemm_edges(graph: int, pattern: re.Pattern = GEMM_KERNEL) -> dict:
    """Turn every default edge kernel -> GEMM kernel (``pattern`` on the GEMM's name) of ``graph``
    (a ``cudaGraph_t`` not yet instantiated) into a programmatic edge. Returns counts:
    {"edges": all edges, "gemm_nodes": kernel nodes matching, "converted": edges rewritten}."""
    lib = _driver()
    names: dict[int, str | None] = {}

    def name(node):
        if node not in names:
            names[node] = kernel_name(node)
        return names[node]

    all_edges = edges(graph)
    converted = 0
    for a, b, d in all_edges:
        if d.type != _DEPENDENCY_TYPE_DEFAULT or name(a) is None or not (name(b) and pattern.search(name(b))):
            continue
        fa, fb = ctypes.c_void_p(a), ctypes.c_void_p(b)
        _check(lib.cuGraphRemoveDependencies_v2(ctypes.c_void_p(graph), ctypes.byref(fa), ctypes.byref(fb),
                                                ctypes.byref(d), ctypes.c_size_t(1)), "cuGraphRemoveDependencies")
        new = _EdgeData(from_port=_PORT_PROGRAMMATIC, to_port=0, type=_DEPENDENCY_TYPE_PROGRAMMATIC)
        _check(lib.cuGraphAddDependencies_v2(ctypes.c_void_p(graph), ctypes.byref(fa), ctypes.byref(fb),
                                             ctypes.byref(new), ctypes.c_size_t(1)), "cuGraphAddDependencies")
        converted += 1
    gemms = sum(1 for v in names.values() if v and pattern.search(v))
    return {"edges": len(all_edges), "gemm_nodes": gemms, "converted": converted}


def edge_summary(graph: int) -> dict:
    """Counts of the graph's edges by (source kind, destination kind, type): kinds are "gemm",
    "kernel" or "other"; for reports."""
    out: dict = {}
    names: dict[int, str | None] = {}
    for a, b, d in edges(graph):
        kinds = []
        for node in (a, b):
            if node not in names:
                names[node] = kernel_name(node)
            nm = names[node]
            kinds.append("other" if nm is None else "gemm" if GEMM_KERNEL.search(nm) else "kernel")
        key = f"{kinds[0]}->{kinds[1]}:{'programmatic' if d.type == _DEPENDENCY_TYPE_PROGRAMMATIC else 'default'}"
        out[key] = out.get(key, 0) + 1
    return out


@triton.jit
def _feed(y_ptr, x_ptr, M, N_in, K_out, scale, SPIN: tl.constexpr, EARLY: tl.constexpr, BLOCK: tl.constexpr):
    """x[m, k] = y[m, k] * scale for k < K_out (the next GEMM's input). EARLY: release dependants
    first, then spin SPIN rounds before the store (a late producer)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * K_out
    m = offs // K_out
    k = offs % K_out
    tl.extra.cuda.gdc_wait()
    if EARLY:
        tl.extra.cuda.gdc_launch_dependents()
    v = tl.load(y_ptr + m * N_in + k, mask=mask, other=0.0).to(tl.float32)
    if not EARLY:
        tl.extra.cuda.gdc_launch_dependents()
    acc = v
    for _ in range(SPIN):
        acc = acc * 0.9999999 + v * 1e-7
    tl.store(x_ptr + offs, (acc * scale).to(x_ptr.dtype.element_ty), mask=mask)


def feed(y, x, scale, spin=0, early=False):
    M, K = x.shape
    BLOCK = 1024
    _feed[(triton.cdiv(M * K, BLOCK),)](y, x, M, y.shape[1], K, scale, SPIN=spin, EARLY=early, BLOCK=BLOCK,
                                        launch_pdl=True)


SHAPES = {  # (N, K) of a decoder layer's GEMMs, in the step's order
    "bart-large": [(3072, 1024), (1024, 1024), (1024, 1024), (1024, 1024), (4096, 1024), (1024, 4096)],
    "flan-t5-large": [(3072, 1024), (1024, 1024), (1024, 1024), (1024, 1024), (5632, 1024), (1024, 2816)],
}
LAYERS = {"bart-large": 12, "flan-t5-large": 24}


def chain(model, M, spin=0, early=False, nan_fill=False, layers=None):
    """(run(): the chain's output, buffers) for GEMMs of ``model``'s shapes at M rows."""
    g = torch.Generator(device="cuda").manual_seed(0)
    L = layers or LAYERS[model]
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * k ** -0.5
          for _ in range(L) for n, k in SHAPES[model]]
    x0 = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16, generator=g)
    xs = [torch.empty(M, w.shape[1], device="cuda", dtype=torch.bfloat16) for w in ws]
    ys = [torch.empty(M, w.shape[0], device="cuda", dtype=torch.bfloat16) for w in ws]

    def run():
        if nan_fill:
            for x in xs:
                x.fill_(float("nan"))
        prev = x0
        for w, x, y in zip(ws, xs, ys):
            feed(prev, x, 1.0, spin, early)
            torch.matmul(x, w.t(), out=y)
            prev = y
        return ys[-1]
    return run


def capture(run, convert: bool):
    gr, out = capture_graph(run, warm=2, keep_graph=True)
    info = edge_summary(gr.raw_cuda_graph())
    if convert:
        info["converted"] = programmatic_gemm_edges(gr.raw_cuda_graph())
        info["after"] = edge_summary(gr.raw_cuda_graph())
    gr.instantiate()
    return gr, out, info


def time_graph(gr, reps=20, inner=10):
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(inner):
            gr.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / inner)
    return statistics.median(times[2:])


def part_race(res):
    names = set()
    for M in (64, 256):
        run = chain("bart-large", M, spin=4000, early=True, nan_fill=True, layers=2)
        ref = run().float().clone()
        torch.cuda.synchronize()
        for convert in (False, True):
            gr, out, info = capture(run, convert)
            bad = 0
            for _ in range(50):
                gr.replay()
                o = out.float()
                bad += int(not torch.equal(o, ref))
            torch.cuda.synchronize()
            row = dict(part="race", M=M, convert=convert, replays=50, differing_replays=bad,
                       nan=bool(torch.isnan(out.float()).any()), edges=info)
            res.append(row)
            print(json.dumps(row), flush=True)
    # the GEMM kernels cuBLAS picked
    run = chain("bart-large", 64, layers=1)
    gr, _, _ = capture(run, False)
    for a, b, _ in edges(gr.raw_cuda_graph()):
        for n in (a, b):
            nm = kernel_name(n)
            if nm and GEMM_KERNEL.search(nm):
                names.add(nm)
    res.append(dict(part="gemm_kernels", names=sorted(names)))
    print("GEMM kernels:", sorted(names), flush=True)


def part_chain(res, models):
    for model in models:
        for M in (32, 64, 256):
            run = chain(model, M)
            n = LAYERS[model] * len(SHAPES[model])
            outs = {}
            for convert in (False, True, False, True):
                gr, out, info = capture(run, convert)
                ms = time_graph(gr)
                outs[convert] = out.clone()
                row = dict(part="chain", model=model, M=M, convert=convert, us_per_gemm=ms * 1e3 / n,
                           ms=ms, converted=info.get("converted"))
                res.append(row)
                print(f"chain {model} M={M} convert={int(convert)} {ms * 1e3 / n:.2f} µs/GEMM "
                      f"(+feed) {info.get('converted')}", flush=True)
                del gr
            same = torch.equal(outs[False], outs[True])
            res.append(dict(part="chain_equal", model=model, M=M, equal=same))
            print(f"chain {model} M={M}: outputs equal with/without: {same}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="race,chain")
    ap.add_argument("--models", default="bart-large,flan-t5-large")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    res = []
    parts = a.parts.split(",")
    models = a.models.split(",")
    try:
        if "race" in parts:
            part_race(res)
        if "chain" in parts:
            part_chain(res, models)
    finally:
        with open(os.path.join(a.out, "pdl_gemm_edges.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
