"""The fused sampling graph's top-k / top-p and draw (``logits.top_k_top_p``, ``logits.draw``) against
generate's token loop's ops (``top_k`` then ``top_p`` with the whole-vocabulary sort, ``torch.multinomial``)
on this device: bit for bit on random scores of 300-250 027 columns (normal, bf16-rounded, heavily tied,
a near-flat model), counting the rows ``top_k_top_p`` reports as overflowed (not exact: the request is
redone by the token loop); with ``--time``, microseconds per op as a replayed CUDA graph.

    PYTHONPATH=.:families:plugins python benchmarks/fast_warpers_check.py [--trials 10] [--time]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_warpers import _graph_us  # noqa: E402

from encdec_core.runtime import logits as L  # noqa: E402
from encdec_core.runtime.logits import draw, top_k_top_p  # noqa: E402


def inputs(n, v, kind, gen, dev):
    x = torch.randn(n, v, device=dev, generator=gen) * 3
    if kind == "bf16":
        return x.bfloat16().float()
    if kind == "coarse":  # many ties
        return (x * 2).round() / 2
    if kind == "flat":  # a near-degenerate model: most tokens tie
        x = torch.zeros(n, v, device=dev)
        x[:, :7] = 1.0
        return x
    return x


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--time", action="store_true")
    a = ap.parse_args()
    dev = torch.device(a.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    bad = {}
    counts = {}
    for v in (4097, 32128, 50265, 250027):
        for n in (1, 8, 64):
            for kind in ("bf16", "coarse", "flat", "fp32"):
                for k, p in ((50, 0.9), (10, 0.5), (50, 0.99), (1, 0.9), (200, 0.8)):
                    for t in range(a.trials if v < 100000 else 3):
                        s = inputs(n, v, kind, gen, dev) / 0.7
                        ref = L.top_p(L.top_k(s, k), p)
                        got, over = top_k_top_p(s, k, p)
                        counts[kind] = counts.get(kind, 0) + 1
                        rows = ~over
                        if not torch.equal(ref[rows], got[rows]):
                            bad.setdefault("top_k_top_p", []).append((v, n, kind, k, p, t))
                        counts["overflowed rows"] = counts.get("overflowed rows", 0) + int(over.sum())
                        pr = torch.softmax(ref, -1)
                        g1 = torch.Generator(device=dev).manual_seed(t)
                        g2 = torch.Generator(device=dev).manual_seed(t)
                        m1 = torch.multinomial(pr, 1, generator=g1).squeeze(1)
                        m2 = draw(pr, g2)
                        if not (torch.equal(m1, m2) and torch.equal(g1.get_state(), g2.get_state())):
                            bad.setdefault("draw", []).append((v, n, kind, k, p, t))
    print(json.dumps({"device": a.device, "torch": torch.__version__, "counts": counts,
                      "mismatches": {k: (len(x), x[:5]) for k, x in bad.items()}}), flush=True)
    if not a.time:
        return
    for v in (32128, 50265, 250027):
        for n in (1, 8, 64):
            s = inputs(n, v, "bf16", gen, dev)
            pr = torch.softmax(L.top_p(L.top_k(s, 50), 0.9), -1)
            out = {}
            out["topk50"] = _graph_us(lambda: torch.topk(s, 50), 200)
            out["topk100"] = _graph_us(lambda: torch.topk(s, 100), 200)
            out["top_k+top_p"] = _graph_us(lambda: L.top_p(L.top_k(s, 50), 0.9), 200)
            out["fast top_k+top_p"] = _graph_us(lambda: top_k_top_p(s, 50, 0.9), 200)
            out["multinomial"] = _graph_us(lambda: torch.multinomial(pr, 1), 200)
            out["draw"] = _graph_us(lambda: draw(pr), 200)

            def old():
                x = L.top_p(L.top_k(L.temperature(s, 0.7), 50), 0.9)
                return torch.multinomial(torch.softmax(x, -1), 1)

            def new():
                x, _ = top_k_top_p(L.temperature(s, 0.7), 50, 0.9)
                return draw(torch.softmax(x, -1))

            out["chain_old"] = _graph_us(old, 200)
            out["chain_new"] = _graph_us(new, 200)
            print(json.dumps({"rows": n, "vocab": v, "us": {k: round(x, 2) for k, x in out.items()}}), flush=True)


if __name__ == "__main__":
    main()
