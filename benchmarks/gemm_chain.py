"""The decoder step's GEMMs as the dependent chain they form (each GEMM reads the previous one's
output), replayed from one CUDA graph: what a GEMM costs inside the step rather than alone.

Alone (``gemm_probe.py``) every GEMM at 32-64 rows takes >= ~4.8 us, however small its weight: the
fixed cost of a kernel that starts only when its predecessor has finished and then waits for its
first weight bytes. A kernel launched with programmatic dependent launch (PDL) can fetch its weight
into L2 while its predecessor still runs; cuBLAS's kernels cannot. This measures, per decoder layer
(6 GEMMs of the model's real shapes, every layer with its own weights, so they stream from HBM):

- ``cublas``: ``F.linear`` (what the compiled step calls);
- ``tiled`` / ``tiled_pdl``: ``triton_kernels.fused_linear``'s tiled kernel (split-K, L2 prefetch of
  the weight slice before the PDL wait);
- ``swab`` / ``swab_pdl``: ``gemm_probe._swab_pdl_kernel`` (the weight as the MMA's row operand,
  split-K summed in split order by the tile's last program).

With ``--interleave`` a PDL-launched elementwise kernel sits between the GEMMs, as the step's
attention / norm / activation kernels do (inductor launches its kernels with PDL).

    PYTHONPATH=.:families python benchmarks/gemm_chain.py --models bart-large,flan-t5-large --m 32,64
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_families, graph_time  # noqa: E402
from gemm_probe import auto_split, swab_pdl  # noqa: E402


@triton.jit
def _between_kernel(x_ptr, y_ptr, M, N, s_xm, s_ym, BLOCK: tl.constexpr):
    """y = x * 1 over an [M, N] view, launched with PDL (waits first, then lets its successor launch)."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r = i // N
    c = i % N
    mask = i < M * N
    v = tl.load(x_ptr + r * s_xm + c, mask=mask, other=0.0)
    tl.store(y_ptr + r * s_ym + c, v, mask=mask)


def between(x, y):
    M, N = x.shape
    _between_kernel[(triton.cdiv(M * N, 1024),)](x, y, M, N, x.stride(0), y.stride(0), BLOCK=1024,
                                                 num_warps=4, launch_pdl=True)
    return y


def layer_shapes(cfg):
    d, hd, ff = cfg.d_model, cfg.decoder_heads * cfg.head_dim, cfg.decoder_ffn_dim
    gi = 2 if cfg.gated_ffn else 1
    # (name, N, K): each reads the first K columns of the previous output
    return [("qkv", 3 * hd, d), ("out", d, hd), ("q", hd, d), ("cross_out", d, hd),
            ("ffn_in", gi * ff, d), ("ffn_out", d, ff)]


def chain_weights(name, dev="cuda", dt=torch.bfloat16):
    """(config, layers, layer shapes, per layer [(weight, bias or None)] x 6, weight bytes) of a preset's
    decoder GEMMs with random weights (biases for BART), every layer its own."""
    from encdec_core.benchmark import find_preset

    fam, src = find_preset(name)
    cfg = fam.make_config(src)
    L = cfg.decoder_layers
    shp = layer_shapes(cfg)
    has_bias = name.startswith("bart")
    W = [[(torch.randn(N, K, device=dev, dtype=dt) * (K ** -0.5),
           torch.randn(N, device=dev, dtype=dt) * 0.1 if has_bias else None) for _, N, K in shp]
         for _ in range(L)]
    return cfg, L, shp, W, sum(w.numel() * 2 for lay in W for w, _ in lay)


def chain_cases(models: str, ms: str, dev="cuda", dt=torch.bfloat16):
    """For each preset of ``models`` and row count of ``ms`` (comma-separated): (name, L, shp, W, wbytes,
    M, x0 [M, d_model] random, outs: one [M, N] buffer per GEMM of a layer); seed 0."""
    ensure_families()
    torch.manual_seed(0)
    for name in models.split(","):
        cfg, L, shp, W, wbytes = chain_weights(name, dev, dt)
        for M in [int(v) for v in ms.split(",")]:
            x0 = torch.randn(M, cfg.d_model, device=dev, dtype=dt)
            outs = [torch.empty(M, N, device=dev, dtype=dt) for _, N, _ in shp]
            yield name, L, shp, W, wbytes, M, x0, outs


def graph_ms(fn, replays=20):
    return graph_time(fn, 1, replays)


def time_chain(fn, ref, label):
    """(ms per call of ``fn`` replayed from a CUDA graph, its output in fp32, relative error against
    ``ref``, 0 without one); None, with a printed line, when it fails (a survey goes on)."""
    try:
        ms, out = graph_ms(fn)
    except Exception as exc:  # noqa: BLE001 - a survey
        print(f"{label}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
        return None
    out = out.float().clone()
    return ms, out, (0.0 if ref is None else float((out - ref).norm() / ref.norm().clamp_min(1e-30)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="bart-large,flan-t5-large")
    ap.add_argument("--m", default="32,64")
    ap.add_argument("--variants", default="cublas,tiled,tiled_pdl,swab,swab_pdl,swab_pdl_k64")
    ap.add_argument("--interleave", default="0,1")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    from encdec_core.runtime.cuda import triton_kernels as tk

    dev, dt = "cuda", torch.bfloat16
    res = []
    for name, L, shp, W, wbytes, M, x0, outs in chain_cases(a.models, a.m, dev, dt):
        mids = [torch.empty(M, N, device=dev, dtype=dt) for _, N, _ in shp]
        ws = torch.empty(8 * M * max(N for _, N, _ in shp), device=dev, dtype=torch.float32)
        cnt = torch.zeros(4096, dtype=torch.int32, device=dev)

        def gemm(variant, x, w, b, out):
            N, K = w.shape
            if variant == "cublas":
                return F.linear(x, w, b)
            if variant.startswith("tiled"):
                return tk.fused_linear(x, w, b, out=out, pdl=variant == "tiled_pdl", counters=cnt)
            bm = max(16, min(64, triton.next_power_of_2(M)))
            bk = 64 if variant.endswith("k64") else 128
            S = auto_split(M, N, K, bm, 64, bk)
            c = dict(BM=bm, BN=64, BK=bk, S=S, w=4, st=3)
            return swab_pdl(x, w, b, out, c, ws[: S * M * N].view(S, M, N) if S > 1 else None, cnt,
                            pdl="pdl" in variant)

        for inter in [int(v) for v in a.interleave.split(",")]:
            ref = None
            for variant in a.variants.split(","):
                def chain():
                    h = x0
                    for lay in W:
                        for i, (w, b) in enumerate(lay):
                            K = w.shape[1]
                            y = gemm(variant, h[:, :K], w, b, outs[i])
                            if inter:
                                y = between(y, mids[i])
                            h = y
                    return h
                got = time_chain(chain, ref, f"{name} M={M} {variant}")
                if got is None:
                    continue
                ms, out, err = got
                ref = out if ref is None else ref
                n_g = L * len(shp)
                row = {"model": name, "M": M, "variant": variant, "interleave": inter, "ms": ms,
                       "us_per_gemm": ms * 1e3 / n_g, "us_per_layer": ms * 1e3 / L,
                       "TBps": wbytes / ms / 1e9, "rel_err_vs_first": err}
                res.append(row)
                print(f"{name:14s} M={M:3d} interleave={inter} {variant:14s} {ms * 1e3:8.1f} us/step "
                      f"{row['us_per_layer']:6.2f} us/layer {row['us_per_gemm']:5.2f} us/GEMM "
                      f"{row['TBps']:5.2f} TB/s err {err:.1e}", flush=True)
    with open(os.path.join(a.out, "gemm_chain.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
