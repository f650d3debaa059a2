from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def norm(x: torch.Tensor, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm ("layer") or RMSNorm ("rms") of x's last dim, computed in fp32, returned in the
    weight's dtype (RMS: the normalised rows are rounded to it before the weight multiplies)."""
    if kind == "rms":
        xf = x.float()
        var = xf.pow(2).mean(-1, keepdim=True)
        y = xf * torch.rsqrt(var + eps)
        return weight * y.to(weight.dtype)
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), b, eps).to(weight.dtype)


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
        return norm(x, self.kind, self.weight, self.bias, self.eps)
