"""Greedy tokens of the CUDA runner's variants against generate's eager path, with the margin that
tells a near-tie from a wrong result.

For each model (the preset's real shape, random weights, fp32, TF32 off) and runner variant
(``graph``: CUDA graphs of the uncompiled step; ``compiled``: the runner's default; ``compiled-static``:
dynamic=False; ``compiled-inductor``: the compiled model step instead of the Triton step;
``compiled-nopdl``: compile_options={}; ``compiled-eager-encoder``: compile_encoder=False), two requests of other batch and source buckets are decoded
with ``runner.greedy`` (the fused loop), on a fresh runner and on one that served a first request,
and through ``generate(..., runner)`` (its token loop). Each result is compared with
``generate(model, ...)`` without a runner. Where a row differs, the eager top-1 / top-2 logit gap at
the first differing position is printed: a gap near fp32 rounding (< 1e-4) is a near-tie that the
kernels' reduction order decides; a larger one is a bug.

    PYTHONPATH=.:families python benchmarks/check_greedy_paths.py --models t5-small,bart-base [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_families  # noqa: E402

VARIANTS = {
    "graph": dict(compile=False),
    "compiled": dict(),
    "compiled-static": dict(dynamic=False),
    "compiled-inductor": dict(kernels="inductor"),
    "compiled-nopdl": dict(compile_options={}),
    "compiled-eager-encoder": dict(compile_encoder=False),
}


def requests(cfg, device, seed=0):
    """Two requests: 3 rows of source length 13 and 5 rows of length 29, right padded."""
    out = []
    for b, s in ((3, 13), (5, 29)):
        g = torch.Generator().manual_seed(seed + b)
        ids = torch.randint(4, cfg.vocab_size, (b, s), generator=g)
        mask = torch.ones_like(ids)
        for i in range(1, b):
            ids[i, s - 3 * i:] = cfg.pad_token_id
            mask[i, s - 3 * i:] = 0
        out.append((ids.to(device), mask.to(device)))
    return out


@torch.no_grad()
def tie_gap(model, ids, mask, ref: torch.Tensor, row: int, pos: int) -> float:
    """Top-1 minus top-2 eager logit at output position ``pos`` of ``row`` (teacher forced on ref)."""
    from encdec_core.runtime.generation import EagerRunner

    r = EagerRunner(model)
    r.prefill(ids[row:row + 1], mask[row:row + 1], 1, ref.shape[1] + 1)
    logits = None
    for t in range(pos):
        logits = r.step(ref[row:row + 1, t].contiguous()).float()
    top = logits[0].topk(2).values
    return float(top[0] - top[1])


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="t5-small,bart-base")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    ensure_families()
    torch.backends.cuda.matmul.allow_tf32 = False
    from encdec_core.benchmark import model_from_preset
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.generation import GenerationConfig, generate

    rows = []
    for name in a.models.split(","):
        model = model_from_preset(name, torch.float32, a.device, seed=0)
        cfg = model.cfg
        gc = GenerationConfig.from_model(cfg, None, max_new_tokens=a.new_tokens)
        reqs = requests(cfg, a.device)
        refs = [generate(model, ids, mask, gc).sequences for ids, mask in reqs]
        for var in a.variants.split(","):
            kw = dict(VARIANTS[var])
            if a.device != "cuda":
                kw.update(use_graphs=False, compile=False)
            for history in ("fresh", "after-first"):
                for path in ("greedy", "generate"):
                    r = CudaGraphRunner(model, 16, a.new_tokens + 8, 32, **kw)
                    todo = list(zip(reqs, refs))
                    if history == "fresh":
                        todo = todo[1:]
                    for k, ((ids, mask), ref) in enumerate(todo):
                        if path == "greedy":
                            got = r.greedy(ids, mask, max_new_tokens=a.new_tokens,
                                           forced_bos_token_id=gc.forced_bos_token_id,
                                           forced_eos_token_id=gc.forced_eos_token_id)
                        else:
                            got = generate(model, ids, mask, gc, runner=r).sequences
                        same = got.shape == ref.shape and torch.equal(got, ref)
                        row = dict(model=name, variant=var, history=history, path=path, rows=ids.shape[0],
                                   source=ids.shape[1], equal=bool(same))
                        if not same and got.shape[0] == ref.shape[0]:
                            n = min(got.shape[1], ref.shape[1])
                            diff = (got[:, :n] != ref[:, :n])
                            bad = [int(i) for i in diff.any(1).nonzero().flatten()]
                            if bad:
                                i = bad[0]
                                p = int(diff[i].float().argmax())
                                row.update(rows_differing=bad, first_row=i, first_pos=p,
                                           eager_top2_gap=tie_gap(model, ids, mask, ref, i, p))
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    with open(os.path.join(a.out, "check_greedy_paths.json"), "w") as f:
        json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r["equal"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} results equal to the eager path"
          + "".join(f"\n  differs: {r}" for r in bad))


if __name__ == "__main__":
    main()
