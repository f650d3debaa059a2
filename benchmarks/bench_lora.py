"""Run-time LoRA on the CUDA-graph runner (docs/performance.md, section "run-time LoRA").

    PYTHONPATH=.:families:plugins python benchmarks/bench_lora.py parity   # tiny T5 / BART engines
    PYTHONPATH=.:families:plugins python benchmarks/bench_lora.py perf     # bart-large shape, batch 64

parity: engines with two run-time adapters made by peft (the test suite's helpers), fp32 and bf16:
        the graph runner's first-step logits per row against the engine with that adapter merged,
        and its greedy / beam-3 tokens against the merged engines and against the eager LoRA path.
perf:   bart-large shape (random weights), bf16, batch 64, in 128: the graph step (ms, 32 steps) and a
        greedy request of 64 tokens, without adapters and with a bank of 4 adapters (q / k / v
        projections at rank 8, or every linear layer at rank 16), uids -1, 0, 1, 2, 3 mixed; then the
        same runner with no request naming an adapter. Writes bench_lora_<part>.json to $OUT.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import torch  # noqa: E402


def parity() -> dict:
    import test_lora as T
    from conftest import make_registry

    from encdec_core.convert import convert
    from encdec_core.engine import Engine, build
    from encdec_core.runtime.cuda import CudaGraphRunner

    reg = make_registry("encdec_t5.plugin", "encdec_bart.plugin", "encdec_lora.plugin")
    res = {}
    for fam in ("t5", "bart"):
        tmp = Path(tempfile.mkdtemp())
        if fam == "t5":
            base, vocab = T._t5_base(tmp / "hf"), 96
            specs = [dict(r=2, lora_alpha=4, target_modules=["q", "v", "wo"]),
                     dict(r=4, lora_alpha=3, target_modules=["k", "o", "wi_0", "EncDecAttention.q"])]
        else:
            base, vocab = T._bart_base(tmp / "hf"), 90
            specs = [dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc2"]),
                     dict(r=3, lora_alpha=6, target_modules=["k_proj", "out_proj", "fc1"])]
        dirs = T._adapters(tmp, base, specs, 10)

        def eng(name, ad, mode):
            ck = convert(tmp / "hf", tmp / f"ck{name}", reg=reg, adapters=ad, adapter_mode=mode)
            return build(ck, tmp / f"en{name}", max_batch_size=8, max_input_len=32, max_output_len=12,
                         max_beam_width=3)
        e_rt, e0, e1, ep = eng("rt", dirs, "runtime"), eng("m0", dirs[:1], "merge"), eng("m1", dirs[1:], "merge"), \
            eng("p", [], "merge")
        ids, mask, dec = (t.repeat(2, 1).cuda() for t in T._inputs(vocab))
        seqs = [[int(t) for t in row[: int(m.sum())]] for row, m in zip(ids, mask)]
        uids = [0, -1, 1, 1]
        for dtype in (torch.float32, torch.bfloat16):
            rt = Engine.load(e_rt, device="cuda", dtype=dtype)
            by = {0: Engine.load(e0, device="cuda", dtype=dtype), 1: Engine.load(e1, device="cuda", dtype=dtype),
                  -1: Engine.load(ep, device="cuda", dtype=dtype)}
            r = CudaGraphRunner.for_engine(rt)
            with torch.no_grad(), rt.model.lora_bank.rows(uids):
                r.prefill(ids, mask, 1, 12)
                first = r.step(dec[:, 0]).float().clone()
            diffs = []
            for i, u in enumerate(uids):
                with torch.no_grad():
                    want = by[u].model(ids[i:i + 1], mask[i:i + 1], dec[i:i + 1, :1])[:, -1].float()
                diffs.append((first[i:i + 1] - want).abs().max().item())
            key = f"{fam}_{str(dtype)[6:]}"
            res[key] = {"first_step_logit_maxdiff_per_row": diffs}
            for beams in (1, 3):
                g = rt.generate_ids(seqs, lora_uids=uids, num_beams=beams, max_new_tokens=10, runner=r)
                e = rt.generate_ids(seqs, lora_uids=uids, num_beams=beams, max_new_tokens=10)
                m = [by[u].generate_ids([seqs[i]], num_beams=beams, max_new_tokens=10).tokens(0)
                     for i, u in enumerate(uids)]
                res[key][f"beam{beams}_graph_eq_merged_eager"] = [g.tokens(i) == m[i] for i in range(4)]
                res[key][f"beam{beams}_graph_eq_lora_eager"] = [g.tokens(i) == e.tokens(i) for i in range(4)]
            print(key, json.dumps(res[key]), flush=True)
    return res


def perf() -> dict:
    from _common import ensure_families

    ensure_families()
    from encdec_core.benchmark import model_from_preset
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.lora import LoraBank, write_bank

    B, S = 64, 128
    res = {}

    def timed(model, r, ids, uids=None):
        ctx = model.lora_bank.rows(uids) if uids is not None else contextlib.nullcontext()
        with ctx:
            step = r.time_step(ids, None, 32)
            r.greedy(ids, None, 64, min_new_tokens=64)  # capture / warm
            torch.cuda.synchronize()
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                out = r.greedy(ids, None, 64, min_new_tokens=64)
                torch.cuda.synchronize()
                ts.append((time.perf_counter() - t) * 1e3)
        return step, sorted(ts)[1], out

    model = model_from_preset("bart-large", torch.bfloat16, "cuda")
    ids = torch.randint(4, model.cfg.vocab_size, (B, S), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    r0 = CudaGraphRunner(model, B, 65, S)
    s0, e0, out0 = timed(model, r0, ids)
    res["base"] = {"graph_step_ms": s0, "greedy64_ms": e0}
    print("base", json.dumps(res["base"]), flush=True)
    del r0
    names = [n for n, p in model.named_parameters() if p.dim() == 2 and n.endswith(".weight") and
             any(k in n for k in (".qkv.", ".q.", ".kv.", ".out.", ".wi.", ".wo."))]
    for tag, rank, pick in (("qkv_r8", 8, lambda n: any(k in n for k in (".qkv.", ".q.", ".kv."))),
                            ("all_r16", 16, lambda n: True)):
        folder = Path(tempfile.mkdtemp()) / "lora"
        g = torch.Generator().manual_seed(0)
        ads = []
        for _ in range(4):
            fac = {}
            for n in names:
                if pick(n):
                    w = model.get_parameter(n)
                    fac[n] = (torch.randn(rank, w.shape[1], generator=g) * 0.02,
                              torch.randn(w.shape[0], rank, generator=g) * 0.02)
            ads.append(fac)
        write_bank(folder, ads)
        del model
        torch.cuda.empty_cache()
        model = model_from_preset("bart-large", torch.bfloat16, "cuda")  # same seed: the same weights
        model.lora_bank = LoraBank(model, folder, 4)
        r1 = CudaGraphRunner(model, B, 65, S)
        uids = [(i % 5) - 1 for i in range(B)]
        s1, e1, out1 = timed(model, r1, ids, uids)
        sb, eb, outb = timed(model, r1, ids, [-1] * B)  # no request names an adapter
        res[tag] = {"adapted_modules": len(ads[0]), "graph_step_ms": s1, "greedy64_ms": e1,
                    "tokens_equal_base": (out1 == out0).float().mean().item(),
                    "no_adapter_graph_step_ms": sb, "no_adapter_greedy64_ms": eb,
                    "no_adapter_tokens_equal_base": (outb == out0).float().mean().item()}
        print(tag, json.dumps(res[tag]), flush=True)
        del r1
        torch.cuda.empty_cache()
    return res


def main():
    part = sys.argv[1] if len(sys.argv) > 1 else "perf"
    if part not in ("parity", "perf"):
        raise SystemExit(f"bench_lora.py: part {part!r}: expected 'parity' or 'perf'")
    from encdec_core.benchmark import environment

    print(json.dumps(environment("cuda")), flush=True)
    res = parity() if part == "parity" else perf()
    out = os.environ.get("OUT", "benchmark-results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"bench_lora_{part}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
