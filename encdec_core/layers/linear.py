"""Linear layers that know their tensor-parallel role.

ColumnLinear holds a slice of the output features (no communication). RowLinear holds a slice of
the input features: partial products are all-reduced, then the (replicated) bias is added once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel.context import ParallelContext

_FP16_SCALE = 1.0 / 256.0  # exact power of two: scaling loses nothing but sub-normals


class ColumnLinear(nn.Module):
    def __init__(self, d_in: int, d_out_local: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out_local, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out_local)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowLinear(nn.Module):
    def __init__(self, d_in_local: int, d_out: int, bias: bool, ctx: ParallelContext):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in_local))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16:
            # fp16 safety (T5's FFN output overflows fp16): scale the input down by an exact power
            # of two, accumulate/all-reduce, and return the result in fp32 for the fp32 residual.
            y = F.linear(x * _FP16_SCALE, self.weight).float()
            y = self.ctx.all_reduce(y) * (1.0 / _FP16_SCALE)
        else:
            y = self.ctx.all_reduce(F.linear(x, self.weight))
        if self.bias is not None:
            y = y + self.bias
        return y
