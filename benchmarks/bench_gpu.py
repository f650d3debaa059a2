"""GPU benchmark behind docs/performance.md (H100, bf16, greedy, in 128 / out 64, random weights of real
shapes; HF transformers with the same weights in the same run).

    PYTHONPATH=.:families python benchmarks/bench_gpu.py --models t5-small,bart-large,flan-t5-large \
        --out results/            # writes gpu_<model>.csv / .json and prints markdown tables
    python benchmarks/bench_gpu.py --models "" --profile t5-small --profile-batches 1,64
        # kernel time by kind, and one step's kernels in order, of the decode step

Configurations: greedy at batch 1, 64, 256 and beam 4 at batch 8 (override with --configs "1x1;8x4").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_families, kernel_rows  # noqa: E402

import torch  # noqa: E402


def parse_configs(text: str):
    out = []
    for part in text.split(";"):
        b, k = part.lower().split("x")
        out.append((int(b), int(k)))
    return out


@torch.no_grad()
def profile_step(name: str, batch: int, out_dir: str, steps: int = 20, kernels: str = "inductor",
                 fused_max_batch: int = 16, beams: int = 1, runner_options: dict | None = None) -> dict:
    """Kernels of the decoder step (run without a graph so each kernel shows), grouped by kind and,
    in ``sequence``, one step's kernels in launch order with their mean durations over ``steps``
    (which kernel is which layer's projection or attention follows from the order).

    beams > 1: a whole beam search of ``batch`` requests (``generate``: the step, log-softmax, the
    processors, the beam update and the cache reorder of every step, plus one encoder pass and
    prefill), per step; no ``sequence``. ``runner_options``: further CudaGraphRunner keywords
    (beam_topk, compile_options, ...), as the benchmark passes them."""
    from torch.profiler import ProfilerActivity, profile

    from encdec_core.benchmark import model_from_preset
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.generation import GenerationConfig, generate

    model = model_from_preset(name, torch.bfloat16, "cuda")
    ids = torch.randint(4, model.cfg.vocab_size, (batch, 128), device="cuda")
    r = CudaGraphRunner(model, batch * beams, steps + 8, 128, use_graphs=False, kernels=kernels,
                        fused_max_batch=fused_max_batch, **(runner_options or {}))
    if beams > 1:
        gc = GenerationConfig.from_model(model.cfg, None, max_new_tokens=steps, min_new_tokens=steps,
                                         num_beams=beams, do_sample=False, forced_eos_token_id=None)

        def run():
            generate(model, ids, None, gc, runner=r)
        run()  # compile the step and the beam tail
    else:
        def run():
            for _ in range(steps):
                r._run("greedy")
        r.greedy(ids, None, 4, eos=-1)  # compile
        r.prefill(ids, None, 1, steps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    groups: dict = {}
    total, count = 0.0, 0
    rows = kernel_rows(prof, steps)
    for t, c, n in rows:
        kind = ("gemm" if any(s in n.lower() for s in ("gemm", "gemv", "cublas", "cutlass", "sm90_xmma", "nvjet"))
                else "triton" if n.startswith(("triton", "_fused_linear", "_decode_attention")) else "other")
        g = groups.setdefault(kind, {"us_per_step": 0.0, "kernels_per_step": 0.0})
        g["us_per_step"] += t
        g["kernels_per_step"] += c
        total += t
        count += c
    top = [(t, c, n[:90]) for t, c, n in rows[:25]]
    kern = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    per = len(kern) // steps
    sequence = []
    if beams == 1 and per and len(kern) == per * steps:
        for i in range(per):
            evs = kern[i::per]
            sequence.append((evs[0].name[:70], sum(e.time_range.elapsed_us() for e in evs) / steps))
    res = {"model": name, "batch": batch, "beams": beams, "kernels": kernels, "kernel_us_per_step": total,
           "kernels_per_step": count, "groups": groups, "top": top, "sequence": sequence}
    tag = f"_beam{beams}" if beams > 1 else ""
    with open(os.path.join(out_dir, f"profile_{name}_b{batch}{tag}_{kernels}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"profile {name} b{batch}{tag} ({kernels}): {count:.0f} kernels/step, {total:.1f} us of kernel time/step")
    for k, g in groups.items():
        print(f"  {k:7s} {g['kernels_per_step']:6.0f} kernels {g['us_per_step']:8.1f} us")
    for t, c, n in top[:12]:
        print(f"  {t:8.1f} us {c:5.0f}x  {n}")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="t5-small,bart-large,flan-t5-large")
    ap.add_argument("--configs", default="1x1;64x1;256x1;8x4", help="batch x beams, ';'-separated")
    ap.add_argument("--io", default="128,64")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hf-static-max-batch", type=int, default=1)
    ap.add_argument("--no-hf", action="store_true", help="our engine only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode of the decoder step")
    ap.add_argument("--beam-topk", default=None, choices=("torch", "triton"),
                    help="beam search's candidate top-k: torch.topk or the Triton two-stage kernel "
                         "(default: the runner's, Triton on CUDA)")
    ap.add_argument("--no-inductor-pdl", action="store_true",
                    help="inductor's kernels of the compiled step without programmatic dependent launch "
                         "(compile_options={}; the runner's default on Hopper launches them with it)")
    ap.add_argument("--no-attention-pdl", action="store_true",
                    help="the compiled step's Triton attention ops without programmatic dependent launch "
                         "(attention_pdl=False; the runner's default follows inductor's PDL)")
    ap.add_argument("--no-prefill-graphs", action="store_true",
                    help="the eager prefill (prefill_graphs=False; the runner's default replays the encoder and "
                         "cross K/V from one CUDA graph per bucket)")
    ap.add_argument("--kernels", default=None, help="decoder step kernels: inductor, triton or auto (runner default)")
    ap.add_argument("--attention", default=None, help="attention of the compiled step: math or sdpa")
    ap.add_argument("--fused-max-batch", type=int, default=None, help="largest batch bucket of the Triton step")
    ap.add_argument("--beam-reorder", default=None, choices=("auto", "index", "copy"),
                    help="beam search: move a cache-row index (index) or the cache rows (copy)")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--profile", default="", help="models to profile (the decode step's kernels)")
    ap.add_argument("--profile-batches", default="1", help="batch sizes to profile, comma-separated")
    ap.add_argument("--profile-beams", type=int, default=1,
                    help="> 1: profile a whole beam search of that width (per step: step + beam tail)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmark-results"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    ensure_families()
    from encdec_core.benchmark import environment, format_table, run_benchmark

    print(json.dumps(environment("cuda")))
    io = [tuple(int(x) for x in a.io.split(","))]
    opts = {}
    if a.compile_mode:
        opts["compile_mode"] = a.compile_mode
    if a.beam_topk:
        opts["beam_topk"] = a.beam_topk
    if a.no_inductor_pdl:
        opts["compile_options"] = {}
    if a.no_attention_pdl:
        opts["attention_pdl"] = False
    if a.no_prefill_graphs:
        opts["prefill_graphs"] = False
    if a.kernels:
        opts["kernels"] = a.kernels
    if a.attention:
        opts["attention"] = a.attention
    if a.fused_max_batch is not None:
        opts["fused_max_batch"] = a.fused_max_batch
    if a.beam_reorder:
        opts["beam_reorder"] = a.beam_reorder
    for name in [m for m in a.models.split(",") if m]:
        t = time.time()
        rows = run_benchmark(name, input_output_lens=io, compare_hf=not a.no_hf, device="cuda", dtype=a.dtype,
                             csv_path=os.path.join(a.out, f"gpu_{name}{a.tag}.csv"),
                             json_path=os.path.join(a.out, f"gpu_{name}{a.tag}.json"), progress=False,
                             runner_options=opts or None,
                             repeats=a.repeats, configs=parse_configs(a.configs),
                             hf_static_max_batch=a.hf_static_max_batch, log=lambda m: print(m, flush=True))
        print(f"## {name} ({time.time() - t:.0f} s)\n" + format_table(rows), flush=True)
        torch.cuda.empty_cache()
    for name in [m for m in a.profile.split(",") if m]:
        for b in (int(x) for x in a.profile_batches.split(",")):
            profile_step(name, b, a.out, kernels=a.kernels or "inductor",
                         fused_max_batch=a.fused_max_batch if a.fused_max_batch is not None else 16,
                         beams=a.profile_beams,
                         runner_options={k: v for k, v in opts.items() if k not in ("kernels", "fused_max_batch")})


if __name__ == "__main__":
    main()
