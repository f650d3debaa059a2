"""Block sizes of the Triton decode kernels, measured: every GEMV / attention shape of a model's
decoder step at batch M, each config timed as 200 calls replayed from one CUDA graph (so launch
gaps count as they do in the step), next to cuBLAS (F.linear).

Caveat: the same weight is read 200 times, so it stays in the H100's 50 MB L2 and the absolute
times are optimistic (inside the real step each GEMV streams from HBM: ~5 us per GEMV in the
profile, see docs/performance.md). Use the numbers to rank configurations.

    PYTHONPATH=.:families python benchmarks/tune_triton.py --models bart-large,flan-t5-large --m 1
    PYTHONPATH=.:families python benchmarks/tune_triton.py --models bart-large --m 64,256 --big --rotate 8 \
        --layers qkv,out,ffn_in,ffn_out,lm_head      # tensor-core tiles for large batches, vs cuBLAS
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_families, graph_time  # noqa: E402


def graph_time_us(fn, calls: int = 200) -> float:
    """µs per call of ``fn`` replayed ``calls`` times from one CUDA graph (median of 5 replays)."""
    return graph_time(fn, calls)[0] * 1e3


def sweep(row: dict, call, configs, label) -> None:
    """Time ``call(config)`` for every config (errors recorded, not raised); keep the best in ``row``."""
    best = (row["default_us"], "default")
    for c in configs:
        try:
            t = graph_time_us(lambda: call(c), calls=100)
        except Exception as exc:  # noqa: BLE001 - a survey
            row.setdefault("errors", []).append(f"{c}: {type(exc).__name__}"[:120])
            continue
        row[label(c)] = t
        if t < best[0]:
            best = (t, c)
    row["best_us"], row["best"] = best


def linear_shapes(cfg, vocab):
    d, hd = cfg.d_model, cfg.decoder_heads * cfg.head_dim
    ff = cfg.decoder_ffn_dim
    g = cfg.gated_ffn
    return {
        "qkv": dict(N=3 * hd, K=d, norm=True),
        "out": dict(N=d, K=hd, residual=True),
        "q": dict(N=hd, K=d, norm=True),
        "ffn_in": dict(N=(2 if g else 1) * ff, K=d, norm=True, gated=g, act=cfg.activation),
        "ffn_out": dict(N=d, K=ff, residual=True),
        "lm_head": dict(N=vocab, K=d, norm=True, out32=True),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="t5-small,bart-large,flan-t5-large")
    ap.add_argument("--m", default="1")
    ap.add_argument("--big", action="store_true",
                    help="sweep the tiled kernel for batches > 16 (tiles, K chunk, warps, stages, split-K) and "
                         "attention key tiles x warps x pipeline stages")
    ap.add_argument("--rotate", type=int, default=1,
                    help="cycle through this many copies of each weight (and attention cache) so the calls "
                         "stream from HBM: "
                         "pick it so the copies exceed the L2 (50 MB H100, 60 MB H200); the default 1 "
                         "keeps one weight L2-resident (optimistic)")
    ap.add_argument("--layers", default="", help="only these linear layers (e.g. qkv,ffn_in); attention: attn")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    ensure_families()
    from encdec_core.benchmark import find_preset
    from encdec_core.runtime.cuda import triton_kernels as tk

    dev, dt = "cuda", torch.bfloat16
    res = []
    for name in a.models.split(","):
        fam, src = find_preset(name)
        cfg = fam.make_config(src)
        norm_kind = cfg.norm_type
        for m in [int(x) for x in a.m.split(",")]:
            for lname, sh in linear_shapes(cfg, cfg.vocab_size).items():
                if a.layers and lname not in a.layers.split(","):
                    continue
                N, K = sh["N"], sh["K"]
                ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(a.rotate)]
                it = itertools.cycle(ws)
                x = torch.randn(m, K, device=dev, dtype=dt)
                nw = torch.ones(K, device=dev, dtype=dt)
                nb = torch.zeros(K, device=dev, dtype=dt) if norm_kind == "layer" else None
                norm = (norm_kind, nw, nb, 1e-6) if sh.get("norm") else None
                nout = N // 2 if sh.get("gated") else N
                res_t = torch.randn(m, nout, device=dev, dtype=dt) if sh.get("residual") else None
                od = torch.float32 if sh.get("out32") else dt
                kw = dict(norm=norm, act=sh.get("act") if sh.get("gated") or lname == "ffn_in" else None,
                          gated=bool(sh.get("gated")), residual=res_t, out_dtype=od)
                row = {"model": name, "M": m, "layer": lname, "N": N, "K": K, "rotate": a.rotate,
                       "cublas_us": graph_time_us(lambda: F.linear(x, next(it))),
                       "default": tk.linear_config(m, nout, K, bool(sh.get("gated")), 2)}
                row["default_us"] = graph_time_us(lambda: tk.fused_linear(x, next(it), **kw))
                if a.big:  # the tiled kernel (M > 16): tiles, K chunk, warps, stages, split-K (None: default)
                    configs = []
                    for bm, bn, bk, nw, st, sp in ((64, 64, 128, 4, 3, 1), (64, 64, 128, 4, 3, 2),
                                                   (64, 64, 128, 4, 3, 4), (64, 64, 128, 4, 3, 8),
                                                   (64, 32, 128, 4, 3, None), (64, 128, 128, 8, 3, None),
                                                   (64, 64, 256, 4, 3, None), (64, 64, 64, 4, 3, None),
                                                   (32, 64, 128, 4, 3, None), (64, 64, 128, 8, 4, None)):
                        if bm > max(16, tk._next_pow2(m)):
                            continue
                        c = dict(BIG=True, BLOCK_M=min(bm, tk._next_pow2(m)), BLOCK_N=bn,
                                 BLOCK_K=min(bk, max(16, tk._next_pow2(K))), num_warps=nw, num_stages=st)
                        if sp:
                            c["SPLIT_K"] = sp
                        configs.append(c)
                else:
                    configs = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
                               for bn, nw, bk in itertools.product((4, 8, 16), (1, 2, 4), (256, 512)) if bk <= K]
                sweep(row, lambda c: tk.fused_linear(x, next(it), config=c, **kw), configs,
                      lambda c: "_".join(f"{k[6:].lower() if k.startswith('BLOCK_') else k}{v}"
                                         for k, v in c.items() if k not in ("UNROLL", "BIG")))
                best = (row["best_us"], row["best"])
                row["floor_us"] = N * K * 2 / 3.0e12 * 1e6  # the weight once at 3 TB/s
                print(f"{name} M={m} {lname:8s} N={N:6d} K={K:5d} cublas {row['cublas_us']:7.2f} "
                      f"default {row['default_us']:7.2f} best {best[0]:7.2f} {best[1]} floor {row['floor_us']:.2f}",
                      flush=True)
                res.append(row)
            if a.layers and "attn" not in a.layers.split(","):
                continue
            # attention
            H, D = cfg.decoder_heads, cfg.head_dim
            for kind, T in (("self", 80), ("cross", 128)):
                q = torch.randn(m, H, D, device=dev, dtype=dt)
                caches = itertools.cycle([(torch.randn(m, H, T, D, device=dev, dtype=dt),
                                           torch.randn(m, H, T, D, device=dev, dtype=dt)) for _ in range(a.rotate)])
                pos = torch.full((), 63, dtype=torch.long, device=dev)
                kn = torch.randn(m, H, D, device=dev, dtype=dt)
                kb = torch.zeros(m, T, device=dev, dtype=dt)
                akw = dict(pos=pos, k_new=kn, v_new=kn) if kind == "self" else dict(key_bias=kb)
                row = {"model": name, "M": m, "layer": f"attn_{kind}", "T": T, "rotate": a.rotate}
                # bytes of K/V read per call (self: the 63 filled rows)
                nbytes = 2 * m * H * (63 if kind == "self" else T) * D * 2
                row["default_us"] = graph_time_us(lambda: tk.decode_attention(q, *next(caches), 0.125, **akw))
                if a.big:
                    configs = [dict(BLOCK_T=bt, num_warps=nw, num_stages=st)
                               for bt, nw, st in itertools.product((16, 32, 64, 128), (1, 2, 4, 8), (1, 2, 3))
                               if not (kind == "self" and bt * D > 8192)]
                else:
                    configs = [dict(BLOCK_T=bt, num_warps=nw) for bt, nw in itertools.product((16, 32, 64), (1, 4))]
                sweep(row, lambda c: tk.decode_attention(q, *next(caches), 0.125, config=c, **akw), configs,
                      lambda c: f"bt{c['BLOCK_T']}_w{c['num_warps']}_s{c.get('num_stages', 'd')}")
                best = (row["best_us"], row["best"])
                print(f"{name} M={m} attn_{kind:5s} T={T} default {row['default_us']:7.2f} "
                      f"({nbytes / row['default_us'] / 1e6:.2f} TB/s) best {best[0]:7.2f} {best[1]} "
                      f"({nbytes / best[0] / 1e6:.2f} TB/s)", flush=True)
                res.append(row)
        with open(os.path.join(a.out, "tune_triton.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
