"""Sampling on the CUDA graph runner: generate's token loop (fused_greedy=False: the step's graph, then
the processors, warpers and the draw as separate kernels and a host round trip per token) against the
runner's fused loop (``sample_search``: all of it in one graph, a host check every 8 steps), and HF
transformers' generate with the same options (eager, and with cache_implementation="static", compiled).

Random weights of the preset's real shapes, source length 128, 64 new tokens with EOS suppressed
(min_new_tokens 64), do_sample with temperature 0.7, top_k 50, top_p 0.9 and a seed; wall time per
request (best of 3 after a warm-up) and per token, and whether both of our loops drew the same tokens.
HF holds the same weights (``hf_model_from_preset``); its draws come from another generator, so its
tokens are not compared.

    PYTHONPATH=.:families:plugins python benchmarks/time_sampling.py --models t5-small,bart-large --batches 1,8,64
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_loop_args, best_ms, ensure_families  # noqa: E402

OPTIONS = dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="t5-small,bart-large")
    ap.add_argument("--hf-batches", default="1,8,64", help="batches HF eager runs at ('' for none)")
    ap.add_argument("--hf-static-batches", default="1", help="batches HF's static-cache compiled generate runs at")
    add_loop_args(ap)
    a = ap.parse_args()
    ensure_families()
    from encdec_core.benchmark import hf_model_from_preset, model_from_preset
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.generation import GenerationConfig, generate

    batches = [int(x) for x in a.batches.split(",")]
    hf_b = {int(x) for x in a.hf_batches.split(",") if x}
    hf_sb = {int(x) for x in a.hf_static_batches.split(",") if x}
    dtype = getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    kw = dict(compile=False, use_graphs=False) if a.device == "cpu" else {}
    rows = []
    for name in [m for m in a.models.split(",") if m]:
        hf = None
        if hf_b or hf_sb:
            hf, model = hf_model_from_preset(name, dtype=dtype, device=a.device)
        else:
            model = model_from_preset(name, dtype=dtype, device=a.device)
        cfg = model.cfg
        seqs = {}
        for fused in (False, True):
            runner = CudaGraphRunner(model, max(batches), a.new + 16, 128, fused_greedy=fused, **kw)
            for b in batches:
                g = torch.Generator().manual_seed(b)
                ids = torch.randint(4, cfg.vocab_size, (b, 128), generator=g).to(a.device)
                mask = torch.ones_like(ids)
                gc = GenerationConfig.from_model(cfg, None, max_new_tokens=a.new, min_new_tokens=a.new, seed=11,
                                                 **OPTIONS)
                generate(model, ids, mask, gc, runner=runner)  # warm-up: graphs captured
                ms, out = best_ms(lambda: generate(model, ids, mask, gc, runner=runner), 3, sync)
                seqs[(fused, b)] = out.sequences.cpu()
                row = dict(model=name, system="encdec-fused" if fused else "encdec-token-loop", batch=b,
                           ms_per_request=round(ms, 3), ms_per_token=round(ms / a.new, 4),
                           length=out.sequences.shape[1])
                if fused:
                    x = seqs[(False, b)]
                    row["same_tokens_as_token_loop"] = x.shape == out.sequences.shape and bool(
                        (x == out.sequences.cpu()).all())
                rows.append(row)
                print(json.dumps(row), flush=True)
            del runner
        del model
        torch.cuda.empty_cache() if a.device == "cuda" else None
        if hf is None:
            continue
        import transformers

        for b in sorted(hf_b | hf_sb):
            g = torch.Generator().manual_seed(b)
            ids = torch.randint(4, cfg.vocab_size, (b, 128), generator=g).to(a.device)
            mask = torch.ones_like(ids)
            gen = transformers.GenerationConfig(max_new_tokens=a.new, min_new_tokens=a.new, **OPTIONS,
                                                decoder_start_token_id=hf.config.decoder_start_token_id,
                                                eos_token_id=hf.config.eos_token_id, pad_token_id=hf.config.pad_token_id,
                                                forced_bos_token_id=None, forced_eos_token_id=None,
                                                no_repeat_ngram_size=0)
            for static in (False, True):
                if b not in (hf_sb if static else hf_b):
                    continue
                extra = {"cache_implementation": "static"} if static else {}

                def call():
                    with torch.inference_mode():
                        return hf.generate(input_ids=ids, attention_mask=mask, generation_config=gen, **extra)
                call()  # warm-up (static: compiles)
                if static:
                    call()
                ms, out = best_ms(call, 3, sync)
                row = dict(model=name, system="hf-static" if static else "hf", batch=b, ms_per_request=round(ms, 3),
                           ms_per_token=round(ms / a.new, 4), length=out.shape[1])
                rows.append(row)
                print(json.dumps(row), flush=True)
        del hf
        torch.cuda.empty_cache() if a.device == "cuda" else None
    print(f"{'model':<12} {'batch':>5} {'system':<18} {'ms/request':>11} {'ms/token':>9} {'vs hf':>7} {'vs hf-static':>12}")
    for r in rows:
        ref = {s: next((x for x in rows if x["model"] == r["model"] and x["batch"] == r["batch"] and x["system"] == s),
                       None) for s in ("hf", "hf-static")}
        ratio = lambda s: f"{ref[s]['ms_per_request'] / r['ms_per_request']:.1f}x" if ref[s] else "-"  # noqa: E731
        print(f"{r['model']:<12} {r['batch']:>5} {r['system']:<18} {r['ms_per_request']:>11.2f} {r['ms_per_token']:>9.4f} "
              f"{ratio('hf'):>7} {ratio('hf-static'):>12}" + (f"  same tokens: {r['same_tokens_as_token_loop']}"
                                                               if "same_tokens_as_token_loop" in r else ""))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "time_sampling.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
