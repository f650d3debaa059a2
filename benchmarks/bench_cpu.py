"""CPU benchmark behind docs/performance.md: t5-small and bart-base, fp32, batch 1 and 8, in 60 / out 20,
against HF transformers and CTranslate2 (when `pip install ctranslate2` is there) on the same weights.

    PYTHONPATH=.:families python benchmarks/bench_cpu.py [--threads 2] [--runner compiled|eager] [--out results/]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_families  # noqa: E402

import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="t5-small,bart-base")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--io", default="60,20")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runner", default="compiled", choices=("compiled", "eager"),
                    help="compiled: the static step compiled by inductor with frozen, autotuned weights "
                         "(one compile per batch size, outside the timed runs); eager: the eager runner")
    ap.add_argument("--out", default="benchmark-results")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(a.threads)
    ensure_families()
    from encdec_core.benchmark import environment, format_table, run_benchmark

    print(json.dumps(environment("cpu")))
    io = [tuple(int(x) for x in a.io.split(","))]
    for name in a.models.split(","):
        t = time.time()
        rows = run_benchmark(name, batch_sizes=[int(b) for b in a.batches.split(",")], input_output_lens=io,
                             compare_hf=True, device="cpu", dtype="float32", repeats=a.repeats,
                             csv_path=os.path.join(a.out, f"cpu_{name}_{a.runner}.csv"),
                             json_path=os.path.join(a.out, f"cpu_{name}_{a.runner}.json"), progress=False,
                             runner=a.runner, log=lambda m: print(m, flush=True))
        print(f"## {name} ({time.time() - t:.0f} s)\n" + format_table(rows), flush=True)


if __name__ == "__main__":
    main()
