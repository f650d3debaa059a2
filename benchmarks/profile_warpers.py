"""Where sampling's per-token selection spends its time on a GPU: each of generate's sampling ops
(temperature, top-k, top-p, softmax, the draw) on [rows, vocab] fp32 scores, timed alone as a
replayed CUDA graph (as they run inside the fused sampling graph), and the same chain whole.

The scores are bf16 values widened to fp32, as the bf16 model's logits are, so ties occur as they do
in a real run. Prints a JSON line per (rows, vocab): microseconds per op (median of --iters replays).

    PYTHONPATH=.:families:plugins python benchmarks/profile_warpers.py --rows 1,8,64 --vocabs 32128,50265
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import graph_time  # noqa: E402


def _graph_us(fn, iters: int) -> float:
    """Device time of one replay of ``fn`` captured in a CUDA graph, µs (median of ``iters`` replays)."""
    return graph_time(fn, calls=1, replays=iters)[0] * 1000.0


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,64")
    ap.add_argument("--vocabs", default="32128,50265")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--iters", type=int, default=200)
    a = ap.parse_args()
    from encdec_core.runtime import logits as L

    dev = torch.device("cuda")
    for v in [int(x) for x in a.vocabs.split(",")]:
        for n in [int(x) for x in a.rows.split(",")]:
            gen = torch.Generator(device=dev).manual_seed(0)
            scores = (torch.randn(n, v, device=dev, generator=gen) * 3).bfloat16().float()
            tk = L.top_k(L.temperature(scores, a.temperature), a.top_k)
            tp = L.top_p(tk, a.top_p)
            probs = torch.softmax(tp, dim=-1)
            out = {}
            out["temperature"] = _graph_us(lambda: L.temperature(scores, a.temperature), a.iters)
            out["topk_values"] = _graph_us(lambda: torch.topk(scores, a.top_k), a.iters)
            out["top_k"] = _graph_us(lambda: L.top_k(scores, a.top_k), a.iters)
            out["sort"] = _graph_us(lambda: torch.sort(tk, descending=False), a.iters)
            asc = torch.sort(tk, descending=False)[0]
            out["softmax_cumsum"] = _graph_us(lambda: asc.softmax(dim=-1).cumsum(dim=-1), a.iters)
            out["top_p"] = _graph_us(lambda: L.top_p(tk, a.top_p), a.iters)
            out["softmax"] = _graph_us(lambda: torch.softmax(tp, dim=-1), a.iters)
            out["multinomial"] = _graph_us(lambda: torch.multinomial(probs, 1), a.iters)

            def chain():
                s = L.top_p(L.top_k(L.temperature(scores, a.temperature), a.top_k), a.top_p)
                return torch.multinomial(torch.softmax(s, dim=-1), 1)

            out["chain"] = _graph_us(chain, a.iters)
            # is CUDA's default sort of this row stable (ties by index), as a stable sort is?
            st = torch.sort(tk, descending=False, stable=True)[1]
            out["sort_equals_stable"] = bool(torch.equal(torch.sort(tk, descending=False)[1], st))
            print(json.dumps({"rows": n, "vocab": v, "us": {k: (round(x, 2) if isinstance(x, float) else x)
                                                            for k, x in out.items()}}), flush=True)


if __name__ == "__main__":
    main()
