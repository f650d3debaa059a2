"""Accuracy of the Triton decoder step on a GPU, at the presets' real shapes (random weights).

For each model: fp32 logits of the Triton step against the model's own static step with the same
tokens (teacher forced: max |delta| per step), and bf16 greedy tokens of the Triton step and of the
model-op step, both against our fp32 greedy tokens (match rate and first diverging step).

    PYTHONPATH=.:families python benchmarks/check_fused.py --models t5-small,bart-large,flan-t5-large
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_families  # noqa: E402


def first_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the first step where the rows differ (the length when they never do)."""
    ne = a != b
    n = a.shape[1]
    first = torch.where(ne.any(1), ne.float().argmax(1), torch.full((a.shape[0],), float(n), device=a.device))
    return first.float().mean().item()


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="t5-small,bart-large,flan-t5-large")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    ensure_families()
    torch.backends.cuda.matmul.allow_tf32 = False
    from encdec_core.benchmark import model_from_preset
    from encdec_core.runtime.cuda import CudaGraphRunner

    res = []
    for name in a.models.split(","):
        row = {"model": name}
        m32 = model_from_preset(name, torch.float32, "cuda", seed=0)
        ids = torch.randint(4, m32.cfg.vocab_size, (a.batch, 128), device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(0))
        n = a.steps
        # the reference is the model's own ops (kernels="inductor": the runner's default on CUDA
        # would pick the Triton step for this batch and compare it with itself)
        ref = CudaGraphRunner(m32, a.batch, n + 1, 128, compile=False, kernels="inductor")
        tri = CudaGraphRunner(m32, a.batch, n + 1, 128, compile=False, kernels="triton")
        g32 = ref.greedy(ids, None, n, eos=-1)[:, 1:]
        # teacher-forced fp32 logits
        ref.prefill(ids, None, 1, n)
        tri.prefill(ids, None, 1, n)
        start = torch.full((a.batch,), m32.cfg.decoder_start_token_id, device="cuda")
        worst = 0.0
        for s in range(min(n, 8)):
            tok = start if s == 0 else g32[:, s - 1]
            lr = ref.step(tok).clone()
            lt = tri.step(tok).clone()
            worst = max(worst, (lr - lt).abs().max().item())
        row["fp32_logits_max_abs_diff"] = worst
        row["fp32_greedy_match"] = (tri.greedy(ids, None, n, eos=-1)[:, 1:] == g32).float().mean().item()
        del ref, tri
        m16 = model_from_preset(name, torch.bfloat16, "cuda", seed=0)
        del m32
        torch.cuda.empty_cache()
        for label, kw in (("bf16_model_ops", {"kernels": "inductor"}), ("bf16_triton", {"kernels": "triton"})):
            r = CudaGraphRunner(m16, a.batch, n + 1, 128, compile=False, **kw)
            out = r.greedy(ids, None, n, eos=-1)[:, 1:]
            row[f"{label}_match_vs_fp32"] = (out == g32).float().mean().item()
            row[f"{label}_first_diff"] = first_diff(out, g32)
            del r
        print(json.dumps(row), flush=True)
        res.append(row)
        del m16
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "check_fused.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
