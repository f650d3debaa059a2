"""benchmarks/token_match.py (issue 6's token-match noise floor): rows decoded in chunks come back in
order, and every pair of systems gets the benchmark's match rate."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from token_match import in_chunks, match_table, step_logits  # noqa: E402


def test_chunks_keep_row_order_and_cover_a_last_short_chunk():
    ids = torch.arange(10).view(5, 2)
    seen = []

    def fn(i, m):
        seen.append(i.shape[0])
        return torch.cat([i[:, :1], i * 10], 1)
    out = in_chunks(fn, ids, torch.ones_like(ids), 2)
    assert seen == [2, 2, 1]
    assert torch.equal(out, torch.cat([ids[:, :1], ids * 10], 1))


def test_every_pair_gets_the_benchmarks_match_rate():
    a = torch.tensor([[0, 1, 2, 3, 4], [0, 5, 6, 7, 8]])
    b = a.clone()
    b[1, 3:] = 9                      # 2 of the 8 generated tokens differ
    c = a[:, :3]                      # shorter: compared over the common length
    t = match_table({"a": a, "b": b, "c": c})
    assert list(t) == ["a ~ b", "a ~ c", "b ~ c"]
    assert t["a ~ b"] == 0.75 and t["a ~ c"] == 1.0 and t["b ~ c"] == 1.0


def test_step_logits_copies_a_runner_s_reused_output_buffer():
    """A CUDA-graph runner's step returns the same fp32 buffer every time (the graph's output);
    the teacher-forced logits must hold every position's values, not the last one's."""
    buf = torch.zeros(2, 7)

    def step(tok):
        buf.copy_(tok.float().view(2, 1) * torch.arange(7.0))  # position-dependent logits, one buffer
        return buf
    dec_in = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = step_logits(step, dec_in, 5)
    assert out.shape == (2, 3, 5)
    want = dec_in.float().unsqueeze(-1) * torch.arange(5.0)
    assert torch.equal(out, want)
