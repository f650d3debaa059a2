from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Norm(nn.Module):
    """LayerNorm or RMSNorm (T5: no mean subtraction, no bias), computed in fp32.

    The output has the weight's dtype, so a float32 residual stream (fp16 safety) feeds the
    half-precision matmuls that follow.
    """

    def __init__(self, d: int, kind: str, eps: float, bias: bool):
        super().__init__()
        self.kind = kind
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        if kind == "layer" and bias:
            self.bias = nn.Parameter(torch.zeros(d))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rms":
            xf = x.float()
            var = xf.pow(2).mean(-1, keepdim=True)
            y = xf * torch.rsqrt(var + self.eps)
            return self.weight * y.to(self.weight.dtype)
        w = self.weight.float()
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), (x.shape[-1],), w, b, self.eps).to(self.weight.dtype)
