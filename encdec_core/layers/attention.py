"""Attention with one softmax-scale rule, an additive bias (position bias + masks) and KV caches.

scale = 1 / (q_scaling * sqrt(head_dim)), decided by EncDecConfig.softmax_scale.
The bias is [B|1, H|1, q, k] additive (masks are large negatives), so one fused kernel
(scaled_dot_product_attention) serves T5's relative bias, padding and causal masks alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import ColumnLinear, RowLinear


def attend(q, k, v, bias, scale: float) -> torch.Tensor:
    """q [B,H,q,D], k/v [B,H,k,D], bias broadcastable to [B,H,q,k] or None."""
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def _heads(x: torch.Tensor, h: int, d: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, h, d).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads_local: int, head_dim: int, bias: bool, scale: float, ctx):
        super().__init__()
        self.h, self.dh, self.scale = heads_local, head_dim, scale
        self.qkv = ColumnLinear(d, 3 * heads_local * head_dim, bias)
        self.out = RowLinear(heads_local * head_dim, d, bias, ctx)

    def forward(self, x, bias, cache=None, layer: int = 0):
        q, k, v = self.qkv(x).split(self.h * self.dh, dim=-1)
        q, k, v = _heads(q, self.h, self.dh), _heads(k, self.h, self.dh), _heads(v, self.h, self.dh)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        return self.out(_merge(attend(q, k, v, bias, self.scale)))


class CrossAttention(nn.Module):
    def __init__(self, d: int, heads_local: int, head_dim: int, bias: bool, scale: float, ctx):
        super().__init__()
        self.h, self.dh, self.scale = heads_local, head_dim, scale
        self.q = ColumnLinear(d, heads_local * head_dim, bias)
        self.kv = ColumnLinear(d, 2 * heads_local * head_dim, bias)
        self.out = RowLinear(heads_local * head_dim, d, bias, ctx)

    def project_kv(self, enc: torch.Tensor):
        """Cross-attention K/V, computed once per request from the encoder output."""
        k, v = self.kv(enc).split(self.h * self.dh, dim=-1)
        return _heads(k, self.h, self.dh), _heads(v, self.h, self.dh)

    def forward(self, x, k, v, bias):
        q = _heads(self.q(x), self.h, self.dh)
        return self.out(_merge(attend(q, k, v, bias, self.scale)))
