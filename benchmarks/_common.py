"""Shared set-up of the benchmark scripts: run from a clean tree without installing the package."""
from __future__ import annotations

import importlib
import os
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
for p in (ROOT, os.path.join(ROOT, "families")):
    if p not in sys.path:
        sys.path.insert(0, p)

BUILTIN = ("encdec_t5.plugin", "encdec_bart.plugin", "encdec_nmt.plugin")


def add_loop_args(ap) -> None:
    """The options of the scripts that time generate's loops on the runner (time_generate_greedy.py,
    time_sampling.py): batches, dtype, new tokens, device and output folder."""
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (the static step uncompiled: a check of the script)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))


def ensure_families():
    """Entry points exist only for an installed package: register the built-in families by hand."""
    from encdec_core import registry

    have = set()
    try:
        have = set(registry.names())
    except Exception:
        pass
    if {"t5", "bart"} <= have:
        return registry
    registry.reset()
    os.environ["ENCDEC_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    for m in BUILTIN:
        try:
            registry.register_plugin(importlib.import_module(m), name=m)
        except ImportError:
            pass
    return registry


def kernel_rows(prof, per: float) -> list:
    """A torch profiler's CUDA kernels as [(device us per ``per``, launches per ``per``, name)], the
    most time first (``per``: the steps or calls the profile covered)."""
    return sorted(((e.self_device_time_total / per, e.count / per, e.key) for e in prof.key_averages()
                   if e.device_type.name == "CUDA" and e.count), reverse=True)


def best_ms(fn, repeats: int, sync=lambda: None, wait: bool = True):
    """The best wall time (ms) of ``repeats`` calls of ``fn``, each started after ``sync()`` (the device
    idle) and timed until ``sync()`` returns after it, or with ``wait=False`` until ``fn`` returns (the
    host's time to launch the call); -> (ms, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        if wait:
            sync()
        best = min(best, (time.perf_counter() - t) * 1e3)
    return best, out


def capture_graph(fn, warm: int = 3, keep_graph: bool = False, warm_fn=None):
    """(CUDA graph of one ``fn()`` call, what it returned) after ``warm`` calls of ``warm_fn`` (default
    ``fn``) on a side stream; ``keep_graph``: not instantiated yet (``raw_cuda_graph()`` may be edited
    first, then ``instantiate()``)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warm):
            (warm_fn or fn)()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph(keep_graph=keep_graph)
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def graph_time(fn, calls: int = 1, replays: int = 5):
    """``fn`` called ``calls`` times inside one CUDA graph (after 3 warm-up calls on a side stream),
    the graph replayed ``replays`` times: (median ms per call, what the last captured call returned,
    a static tensor the replays overwrite)."""
    import torch

    def body():
        out = None
        for _ in range(calls):
            out = fn()
        return out
    g, out = capture_graph(body, warm_fn=fn)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(replays):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / calls)
    ts.sort()
    return ts[len(ts) // 2], out
