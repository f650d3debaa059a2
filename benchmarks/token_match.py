"""The noise floor of issue 6's token-match criterion ("bf16 greedy = HF bf16 on >= 95 % of tokens").

With random weights of real shapes many greedy steps are near-ties, and free-running greedy decoding
keeps a flip for the rest of the row, so two bf16 runs that differ only in kernel choice can match on
fewer than 95 % of tokens. This script measures, on the same inputs and weights (HF's initialisation,
read through the family's weight map as in `encdec convert`), in 128 / out 64, EOS suppressed:

- HF fp32 (the reference; our fp32 path equals it by the parity tests),
- HF bf16 at the batch size, and HF bf16 in chunks of ``--chunk`` rows (other GEMM shapes, other
  kernels: HF against itself),
- ours in bf16 (the CUDA graph runner), at the batch size and in chunks,

and prints the match rate of every pair (fraction of equal generated tokens, as `encdec benchmark`
reports it) and how many tokens each bf16 run gets equal to fp32.

    PYTHONPATH=.:families python benchmarks/token_match.py --models bart-large,flan-t5-large --batches 64

Writes token_match.json to --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ensure_families  # noqa: E402

import torch  # noqa: E402


def in_chunks(fn, ids, mask, chunk: int) -> torch.Tensor:
    """fn over row chunks of ``chunk``, outputs concatenated (all rows generate the same length)."""
    return torch.cat([fn(ids[i:i + chunk], mask[i:i + chunk]) for i in range(0, ids.shape[0], chunk)])


def match_table(outs: dict) -> dict:
    """Every pair's match rate (benchmark._match: equal generated tokens over the common length)."""
    from encdec_core.benchmark import _match

    return {f"{a} ~ {b}": _match(outs[a], outs[b]) for a, b in itertools.combinations(outs, 2)}


def step_logits(step, dec_in: torch.Tensor, vocab: int) -> torch.Tensor:
    """The runner's logits for decoder inputs ``dec_in`` [B, T], one position at a time -> [B, T, vocab].
    A graph runner's step returns its static fp32 output buffer (``.float()`` is then no copy), which
    the next step overwrites: each position's logits are copied first."""
    return torch.stack([step(dec_in[:, t].contiguous())[:, :vocab].float().clone()
                        for t in range(dec_in.shape[1])], 1)


@torch.no_grad()
def run(name: str, batch: int, chunk: int, in_len: int, out_len: int, seed: int, device: str = "cuda") -> dict:
    from encdec_core.benchmark import _hf_generate, _inputs, _Ours, _resolve, hf_model_from_preset

    t0 = time.time()
    hf, ours32 = hf_model_from_preset(name, torch.float32, device, seed)
    ids, mask = _inputs(ours32.cfg, batch, in_len, device, seed)
    outs = {}
    outs["hf_fp32"] = _hf_generate(hf, ids, mask, out_len, 1, False)
    hf = hf.to(torch.bfloat16)
    outs[f"hf_bf16_b{batch}"] = _hf_generate(hf, ids, mask, out_len, 1, False)
    outs[f"hf_bf16_chunks{chunk}"] = in_chunks(lambda i, m: _hf_generate(hf, i, m, out_len, 1, False), ids, mask, chunk)
    del hf
    _, ours, _ = _resolve(ours32, device, torch.bfloat16, seed, False)
    runner = _Ours(ours, batch, in_len, out_len, "auto")
    outs[f"ours_bf16_b{batch}"] = runner.generate(ids, mask, out_len, 1)
    outs[f"ours_bf16_chunks{chunk}"] = in_chunks(lambda i, m: runner.generate(i, m, out_len, 1), ids, mask, chunk)
    pairs = match_table(outs)
    res = {"model": name, "batch": batch, "chunk": chunk, "in": in_len, "out": out_len, "seed": seed,
           "seconds": time.time() - t0, "matches": pairs, "runner": runner.note}
    print(f"## {name} batch {batch} (chunks of {chunk}), in {in_len} / out {out_len}, {res['seconds']:.0f} s", flush=True)
    for k, v in pairs.items():
        print(f"   {k:40s} {v * 100:6.2f} %", flush=True)
    del runner, ours, ours32
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


@torch.no_grad()
def teacher_forced(name: str, batch: int, in_len: int, out_len: int, seed: int, device: str = "cuda",
                   tie: float = 0.05) -> dict:
    """Without the cascade of free-running decoding: HF fp32's greedy tokens fed to HF bf16 (one
    forward) and to our bf16 runner (its decoder step, one position at a time); per system the argmax
    agreement with fp32 at every position, and the logit error against HF fp32's logits. A position is
    a near-tie when fp32's top-2 logit gap is below ``tie``."""
    from encdec_core.benchmark import _hf_generate, _inputs, _resolve, hf_model_from_preset
    from encdec_core.runtime.cuda import CudaGraphRunner

    t0 = time.time()
    hf, ours32 = hf_model_from_preset(name, torch.float32, device, seed)
    ids, mask = _inputs(ours32.cfg, batch, in_len, device, seed)
    ref = _hf_generate(hf, ids, mask, out_len, 1, False)
    dec_in, target = ref[:, :-1], ref[:, 1:]
    T = dec_in.shape[1]

    def hf_logits(m):
        return m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_in, use_cache=False).logits.float()
    l32 = hf_logits(hf)
    top2 = l32.topk(2, -1).values
    near_tie = (top2[..., 0] - top2[..., 1]) < tie
    hf = hf.to(torch.bfloat16)
    systems = {"hf_bf16": hf_logits(hf)}
    del hf
    _, ours, _ = _resolve(ours32, device, torch.bfloat16, seed, False)
    cuda = device == "cuda"
    r = CudaGraphRunner(ours, batch, T + 1, in_len, use_graphs=cuda, compile=cuda)
    r.prefill(ids, mask, 1, T + 1)
    systems["ours_bf16"] = step_logits(r.step, dec_in, l32.shape[-1])
    res = {"model": name, "batch": batch, "in": in_len, "out": out_len, "positions": int(target.numel()),
           "near_ties_fp32": int(near_tie.sum()), "tie_gap": tie, "fp32_argmax_is_its_token":
           float((l32.argmax(-1) == target).float().mean())}
    for k, lg in systems.items():
        agree = lg.argmax(-1) == l32.argmax(-1)
        d = (lg - l32).abs()
        res[k] = {"argmax_agree": float(agree.float().mean()), "disagree": int((~agree).sum()),
                  "disagree_at_near_ties": int((~agree & near_tie).sum()),
                  "max_abs_logit_err": float(d.max()), "mean_abs_logit_err": float(d.mean())}
    res["seconds"] = time.time() - t0
    print(f"## teacher-forced {name} batch {batch}: {res['positions']} positions, {res['near_ties_fp32']} fp32 "
          f"near-ties (top-2 gap < {tie})", flush=True)
    for k in systems:
        v = res[k]
        print(f"   {k:10s} argmax = fp32 {v['argmax_agree'] * 100:6.2f} % ({v['disagree']} differ, "
              f"{v['disagree_at_near_ties']} of them near-ties); logit err max {v['max_abs_logit_err']:.4f} "
              f"mean {v['mean_abs_logit_err']:.5f}", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="bart-large,flan-t5-large")
    ap.add_argument("--batches", default="64")
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--io", default="128,64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run)")
    ap.add_argument("--teacher-forced", action="store_true",
                    help="per-position argmax agreement and logit error against HF fp32 on its own tokens")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    ensure_families()
    in_len, out_len = (int(x) for x in a.io.split(","))
    res = []
    for name in [m for m in a.models.split(",") if m]:
        for b in [int(x) for x in a.batches.split(",") if x]:
            if a.teacher_forced:
                res.append(teacher_forced(name, b, in_len, out_len, a.seed, a.device))
            else:
                res.append(run(name, b, a.chunk, in_len, out_len, a.seed, a.device))
            with open(os.path.join(a.out, "token_match.json"), "w") as f:
                json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
