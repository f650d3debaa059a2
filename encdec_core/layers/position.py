"""Position encodings: learned tables (with offset or padding-aware), fairseq sinusoids, and
T5's relative position buckets. The stack owns the provider; layers receive the bias."""
from __future__ import annotations

import math

import torch
from torch import nn


def position_ids(mask: torch.Tensor, past: int | torch.Tensor, offset: int, padding_aware: bool,
                 pad_id: int) -> torch.Tensor:
    """Positions of the tokens in ``mask`` ([B, T], 1 = real token) after ``past`` cached tokens.

    padding-aware (fairseq): first real token at pad_id + 1, pads at pad_id (a zero row);
    otherwise (BART): arange + past + offset.
    """
    if padding_aware:
        m = mask.to(torch.long)
        return (torch.cumsum(m, dim=1) + past) * m + pad_id
    t = mask.shape[1]
    pos = torch.arange(t, device=mask.device, dtype=torch.long) + past + offset
    return pos.unsqueeze(0).expand(mask.shape[0], t)


def sinusoidal_table(num: int, dim: int, pad_id: int | None) -> torch.Tensor:
    """fairseq's table: frequencies exp(-i*log(10000)/(half-1)), laid out [sin | cos]."""
    half = dim // 2
    freq = math.log(10000) / (half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -freq)
    ang = torch.arange(num, dtype=torch.float).unsqueeze(1) * freq.unsqueeze(0)
    table = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1).view(num, -1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num, 1)], dim=1)
    if pad_id is not None:
        table[pad_id, :] = 0
    return table


def relative_buckets(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucketing of (key - query) distances: exact below num_buckets/2 (per direction), then
    logarithmic up to max_distance."""
    out = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out = out + (rel > 0).to(torch.long) * num_buckets
        n = rel.abs()
    else:
        n = -torch.min(rel, torch.zeros_like(rel))
    max_exact = num_buckets // 2
    small = n < max_exact
    large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return out + torch.where(small, n, large)


class RelativeBias(nn.Module):
    """A relative-position bias table [num_buckets, heads_local] (heads split under TP)."""

    def __init__(self, num_buckets: int, heads_local: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_buckets, heads_local))

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        # buckets [q, k] -> bias [1, H, q, k]
        return nn.functional.embedding(buckets, self.weight).permute(2, 0, 1).unsqueeze(0)


class RelativeBuckets:
    """Bucket indices for a query block at ``q_offset`` against ``k_len`` keys (no parameters)."""

    def __init__(self, bidirectional: bool, num_buckets: int, max_distance: int):
        self.bidirectional = bidirectional
        self.num_buckets = num_buckets
        self.max_distance = max_distance

    def __call__(self, q_len: int, k_len: int, q_offset, device) -> torch.Tensor:
        q = torch.arange(q_len, dtype=torch.long, device=device) + q_offset
        k = torch.arange(k_len, dtype=torch.long, device=device)
        rel = k.unsqueeze(0) - q.unsqueeze(1)
        return relative_buckets(rel, self.bidirectional, self.num_buckets, self.max_distance)
