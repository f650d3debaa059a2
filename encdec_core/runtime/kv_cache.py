"""KV caches and the decoder state of a batch of requests.

Self-attention K/V: one preallocated tensor per K and V, [layers, batch, heads, max_len, head_dim]
(local layers and local heads under PP/TP), written in place; no allocation per step.
Cross-attention K/V: computed once per request from the encoder output, [B, H, S, D] per layer,
kept apart from the self-attention cache. Beam reordering touches only the self cache: a beam
never moves to another request, so cross K/V stay where they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LimitError


class KVCache:
    def __init__(self, n_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (max(n_layers, 1), batch, heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        s, t = self.length, k.shape[2]
        if s + t > self.max_len:
            raise LimitError(f"decoder length {s + t} exceeds the cache's max length {self.max_len}")
        self.k[layer, :, :, s:s + t] = k
        self.v[layer, :, :, s:s + t] = v
        return self.k[layer, :, :, :s + t], self.v[layer, :, :, :s + t]

    def advance(self, t: int) -> None:
        self.length += t

    def reorder(self, index: torch.Tensor) -> None:
        """Rows of the batch take the cache of rows ``index`` (beam search)."""
        s = self.length
        self.k[:, :, :, :s] = self.k[:, :, :, :s].index_select(1, index)
        self.v[:, :, :, :s] = self.v[:, :, :, :s].index_select(1, index)

    def select(self, index: torch.Tensor) -> None:
        """Keep / repeat batch rows (drop finished requests, expand for beams)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


@dataclass
class DecoderState:
    cache: KVCache
    cross_k: list  # per local decoder layer: [B, H, S, D]
    cross_v: list
    cross_bias: torch.Tensor  # [B, 1, 1, S] additive

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def batch_size(self) -> int:
        return self.cross_bias.shape[0]

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)

    def select(self, index: torch.Tensor) -> None:
        self.cache.select(index)
        self.cross_k = [k.index_select(0, index) for k in self.cross_k]
        self.cross_v = [v.index_select(0, index) for v in self.cross_v]
        self.cross_bias = self.cross_bias.index_select(0, index)
