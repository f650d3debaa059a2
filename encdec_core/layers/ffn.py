from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import ColumnLinear, RowLinear


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _gelu_fast(x):
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACT = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_fast,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


class FFN(nn.Module):
    """wi -> act -> wo, or gated: act(wi_0 x) * (wi_1 x) -> wo with wi = [wi_0; wi_1] fused."""

    def __init__(self, d: int, d_ff_local: int, activation: str, gated: bool, bias: bool, ctx):
        super().__init__()
        self.gated = gated
        self.act = ACT[activation]
        self.wi = ColumnLinear(d, d_ff_local * (2 if gated else 1), bias)
        self.wo = RowLinear(d_ff_local, d, bias, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.wi(x)
        if self.gated:
            g, u = h.chunk(2, dim=-1)
            h = self.act(g) * u
        else:
            h = self.act(h)
        return self.wo(h)
