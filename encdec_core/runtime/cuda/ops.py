"""The Triton decode-attention kernel as torch custom ops, so the inductor-compiled static step can
call it: inductor treats a custom op as one opaque kernel (it neither traces into the launch nor
fuses around it) and the runner's CUDA graph captures it like any other kernel.

``encdec::decode_self_attention`` writes the new K/V row into the caches (declared mutated) and
attends over positions 0..pos only (with ``row_index``, each position from the cache row the
index names: beam search without moving cache rows); ``encdec::decode_cross_attention`` attends over the whole source with
the additive padding bias (with ``kv_group`` G > 1, query row b reads cache row b // G: a request's
beams share one copy of its cross K/V). Both are ``triton_kernels.decode_attention`` (fp32 online softmax, one
rounding at the output). With ``pdl=True`` the kernel is launched with programmatic dependent launch:
it loads the cached K/V (tile 0, the whole source up to 128 keys) while the previous kernel still runs
and waits for it (``griddepcontrol.wait``) before reading q and the new K/V row. Safe after any kernel:
a kernel launched without the attribute (cuBLAS, a plain launch) is not started early by it, and
inductor's PDL kernels (``triton.enable_pdl``) wait before loading what the kernel right before them
wrote. ``encdec::row_topk`` is ``triton_kernels.row_topk`` (beam search's
candidates, ``CudaGraphRunner(beam_topk="triton")``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .triton_kernels import HAVE_TRITON, decode_attention, row_topk

__all__ = ["self_attention", "cross_attention", "topk", "ATTN_PDL_MAX_ROWS"]

# pdl=True applies to calls of up to this many query rows: on an H200 (2026-11-30 16:48, the compiled
# step) bart-large / flan-t5-large at 64 rows gained 4 % per step, at 256 rows they lost 1.5 % (the
# early programs of a 4096-program grid hold SMs the GEMM before it still needs)
ATTN_PDL_MAX_ROWS = 64

if HAVE_TRITON:

    @torch.library.custom_op("encdec::decode_self_attention", mutates_args=("k_cache", "v_cache"))
    def _self_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                        pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                        bias_table: Optional[torch.Tensor], row_index: Optional[torch.Tensor],
                        pdl: bool = False) -> torch.Tensor:
        return decode_attention(q, k_cache, v_cache, scale, pos=pos, k_new=k_new, v_new=v_new,
                                bias_table=bias_table, row_index=row_index,
                                pdl=pdl and q.shape[0] <= ATTN_PDL_MAX_ROWS)

    @_self_attention.register_fake
    def _(q, k_cache, v_cache, scale, pos, k_new, v_new, bias_table, row_index, pdl=False):
        return q.new_empty(q.shape)

    @torch.library.custom_op("encdec::decode_cross_attention", mutates_args=())
    def _cross_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                         key_bias: Optional[torch.Tensor], kv_group: int, pdl: bool = False) -> torch.Tensor:
        return decode_attention(q, k_cache, v_cache, scale, key_bias=key_bias, kv_group=kv_group,
                                pdl=pdl and q.shape[0] <= ATTN_PDL_MAX_ROWS)

    @_cross_attention.register_fake
    def _(q, k_cache, v_cache, scale, key_bias, kv_group, pdl=False):
        return q.new_empty(q.shape)

    @torch.library.custom_op("encdec::row_topk", mutates_args=())
    def _row_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return row_topk(x, k)

    @_row_topk.register_fake
    def _(x, k):
        return x.new_empty((x.shape[0], k)), x.new_empty((x.shape[0], k), dtype=torch.int64)


def self_attention(q, k_cache, v_cache, scale: float, pos, k_new, v_new, bias_table=None, row_index=None,
                   pdl: bool = False):
    """q / k_new / v_new [B, H, D]; caches [B, H, T, D] (row ``pos`` written); row_index: None or
    [B, >= T] cache rows per key position (beam search); pdl: launch with programmatic dependent
    launch (the caller guarantees the kernel right before it does not write ``pos``); -> [B, H, D]."""
    return torch.ops.encdec.decode_self_attention(q, k_cache, v_cache, float(scale), pos, k_new, v_new,
                                                  bias_table, row_index, bool(pdl))


def cross_attention(q, k_cache, v_cache, scale: float, key_bias=None, kv_group: int = 1, pdl: bool = False):
    """q [B, H, D]; caches [>= B / kv_group, H, S, D]; key_bias [>= B / kv_group, S] additive or None
    (query row b reads row b // kv_group); pdl: launch with programmatic dependent launch; -> [B, H, D]."""
    return torch.ops.encdec.decode_cross_attention(q, k_cache, v_cache, float(scale), key_bias, int(kv_group),
                                                   bool(pdl))


def topk(x, k: int):
    """``torch.topk(x, k)`` over the rows of x [R, N] through the Triton two-stage kernel
    (``triton_kernels.row_topk``; equal values lowest index first) -> (values, int64 indices)."""
    return torch.ops.encdec.row_topk(x, int(k))
