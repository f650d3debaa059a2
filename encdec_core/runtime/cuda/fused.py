"""The decoder step in Triton kernels, for small batches: 8 kernels per layer (the runner uses it up to
``fused_max_batch`` rows, 16 by default; above 16 its GEMMs run on the tiled kernel).

``StaticDecoder.step`` runs the model's own modules (compiled by inductor): ~19 kernels per layer
at batch 1, each GEMV a cuBLAS launch plus separate norm / residual / activation kernels. This step
runs the same layer as

    norm + QKV GEMV  ->  self-attention (writes the new K/V row, reads rows 0..pos only)
    -> out-proj GEMV + residual  ->  norm + Q GEMV  ->  cross-attention  ->  out-proj + residual
    -> norm + FFN-in GEMV + activation (gated or not)  ->  FFN-out GEMV + residual

(``triton_kernels.fused_linear`` / ``decode_attention``). Pre-norm layers (T5, mBART) pass the norm
as the GEMV's prologue. Post-norm layers (BART) keep the residual stream *un-normalised*,
``h = norm_prev(h_prev) + f(...)``, and every consumer applies the pending norm itself: the next
GEMV in its prologue, the next residual add on its residual input. No kernel only normalises.

Numerics: every kernel accumulates in fp32 and rounds once, at its output; the eager path rounds
after each op (GEMV output, bias, activation, residual add). Results therefore agree with the
eager step to bf16/fp16 rounding, not bit for bit (fp32: ~1e-5). fp16 safety is kept: a pre-norm
fp16 residual stays fp32 and the FFN output is added to it in fp32 inside the kernel (it never
exists in fp16). The lm_head reads the final norm (T5's tied-embedding output scale folded into
its weight) in its prologue.
"""
from __future__ import annotations

import torch

from ...layers.norm import norm as apply_norm
from .triton_kernels import ACTIVATIONS, HAVE_TRITON, decode_attention, fused_linear, pdl_supported


def _spec(norm):
    return None if norm is None else (norm.kind, norm.weight, norm.bias, norm.eps)


def residual_sum(x, partial, bias, norm, out_dtype):
    """Tensor parallelism's residual add: ``norm(x) + (partial + bias)`` in fp32, rounded once to
    ``out_dtype`` -- the math ``fused_linear`` does in its epilogue on one rank (``partial``: the
    all-reduced fp32 sum of the ranks' products; ``norm``: None or the pending post-norm spec,
    applied as ``Norm.forward`` does, like the kernel's residual norm)."""
    r = x if norm is None else apply_norm(x, *norm)
    y = partial if bias is None else partial + bias.float()
    return (r.float() + y).to(out_dtype)


def unsupported_reason(model) -> str | None:
    """Why ``FusedStep`` cannot run this model (None when it can)."""
    if not HAVE_TRITON:
        return "triton is not installed"
    cfg, ctx = model.cfg, model.ctx
    if ctx.pp_size != 1:
        return "pipeline parallelism"
    if cfg.activation not in ACTIVATIONS:  # the activations fused_linear implements
        return f"activation {cfg.activation!r}"
    if not cfg.pre_norm("decoder") and cfg.final_norm("decoder"):
        return "a post-norm decoder with a final norm"
    if not cfg.pre_norm("decoder") and cfg.output_scale != 1.0:
        return "a post-norm decoder with an output scale"
    return None


class FusedStep:
    """Callable with ``StaticDecoder.step``'s signature and result (fp32 logits [B, V])."""

    def __init__(self, static_decoder):
        model = static_decoder.model
        why = unsupported_reason(model)
        if why is not None:
            raise NotImplementedError(f"the Triton decoder step does not support {why}")
        self.sd = static_decoder
        self.model = model
        cfg = model.cfg
        dec = model.decoder
        self.pre = cfg.pre_norm("decoder")
        self.res_dtype = dec.residual_dtype
        self.dtype = model.dtype
        self.act = cfg.activation
        self.vocab = cfg.vocab_size
        self.bias = static_decoder.kernel_bias
        final = dec.final_norm if cfg.final_norm("decoder") else None
        self.out_scale = cfg.output_scale
        self.final = None
        if final is not None:
            w = final.weight
            if self.out_scale != 1.0:  # fold the output scale into the final norm's weight
                w = (final.weight.float() * self.out_scale).to(final.weight.dtype)
            self.final = (final.kind, w, final.bias, final.eps)
        self.lm_bias = model.final_logits_bias if cfg.final_logits_bias else None
        self.layers = [dec.layers[str(i)] for i in static_decoder.layer_ids]
        # programmatic dependent launch (Hopper+): each kernel loads its weights, biases and norm
        # weights (attention: its first tile of cached K/V rows and biases) while the previous one
        # finishes. Safe here: no kernel of the step writes a weight, ``pos`` (advanced after the
        # last kernel) or a cache row another kernel reads next, except the attention kernel's own
        # new row. The residual inputs are read early too (``residual_ready``): the residual stream
        # of each out-projection / FFN-out is written two or more kernels before it.
        self.pdl = pdl_supported(model.device)
        self._embed = self._embed_tokens
        # tensor parallelism: each row-parallel product (out-projections, FFN-out) is this rank's
        # fp32 partial sum, all-reduced in fp32, then added to the residual in one rounding
        # (``residual_sum``): the single-rank kernel's math up to the order of the fp32 sum
        self.ctx = model.ctx
        self.tp = model.ctx.distributed
        self._residual_sum = residual_sum
        self.fused_ar = None  # enable_fused_allreduce: all-reduce + bias + residual in one kernel
        # split-K tile counters of the tiled kernel (batches above 16): each split-K GEMM leaves its
        # counters zero again, and the step's kernels run one after another, so one buffer serves all
        self.counters = torch.zeros(1 << 16, dtype=torch.int32, device=model.device)

    def _embed_tokens(self, tokens, pos):
        """The step's input rows [B, d_model]: the model's own embedding (token, scale, positions,
        embedding norm) in the residual dtype."""
        ids = tokens.unsqueeze(1)
        return self.model.decoder.embed(ids, torch.ones_like(ids), pos)[:, 0].to(self.res_dtype)

    def compile_embedding(self) -> None:
        """Let inductor fuse the embedding's ops (gather, scale, position rows, embedding norm: up to
        ~9 eager kernels for BART) into one or two kernels. The CUDA runner calls this when it
        compiles; the ops and their fp32 math are the model's own (inductor rounds once at the end)."""
        self._embed = torch.compile(self._embed_tokens, fullgraph=True, dynamic=False)
        if self.tp:  # the residual add of tensor parallelism: 3-5 eager kernels become one
            self._residual_sum = torch.compile(residual_sum, fullgraph=True, dynamic=False)

    def enable_fused_allreduce(self, max_rows: int) -> None:
        """Tensor parallelism on CUDA: the row-parallel blocks' all-reduce, bias and residual add run
        as one kernel (``allreduce.ResidualAllReduce``; pre-norm decoders, up to ``max_rows`` rows;
        others keep the all-reduce + ``residual_sum``). Collective: every rank calls it."""
        from .allreduce import ResidualAllReduce

        if self.tp and self.pre:
            self.fused_ar = ResidualAllReduce(self.ctx, self.model.cfg.d_model, max_rows)

    def _row_parallel(self, a, weight, bias, x, pending, st, lin):
        """An out-projection / FFN-out and its residual add: one kernel on one rank; under tensor
        parallelism the rank's fp32 product, the all-reduce, and ``residual_sum``. -> (x, stats)."""
        if not self.tp:
            return fused_linear(a, weight, bias, residual=x, residual_norm=pending, residual_stats=st,
                                out_dtype=self.res_dtype, residual_ready=True, return_stats=True, **lin)
        part = fused_linear(a, weight, None, out_dtype=torch.float32, **lin)
        if self.fused_ar is not None and pending is None and self.fused_ar.fits(part):
            return self.fused_ar(part, x, bias, self.res_dtype), None
        part = self.ctx.all_reduce(part)
        return self._residual_sum(x, part, bias, pending, self.res_dtype), None

    def __call__(self, tokens, pos, k, v, ck, cv, cross_bias, rows=None, group: int = 1):
        """``StaticDecoder.step``; rows: None or the [B, T] cache-row index of every key position
        (beam search with cache indirection, ``decode_attention``'s ``row_index``); group: query
        row b reads cross K/V row b // group (``decode_attention``'s ``kv_group``).

        Above 16 rows the GEMMs run on the tiled kernel, and each residual-stream producer also
        returns its rows' partial norm statistics (``st``), which the next norm prologue and
        residual norm merge instead of recomputing them (below 16 rows ``st`` stays None)."""
        model = self.model
        b = tokens.shape[0]
        x = self._embed(tokens, pos)
        dt, pre = self.dtype, self.pre
        pending = None  # post-norm: the norm the stored residual still needs
        st = None  # partial statistics of x's rows (from the kernel that wrote x)
        lin = dict(pdl=self.pdl, counters=self.counters)
        for li, layer in enumerate(self.layers):
            sa, ca, ffn = layer.self_attn, layer.cross_attn, layer.ffn
            hd = sa.h * sa.dh
            # self-attention
            qkv = fused_linear(x, sa.qkv.weight, sa.qkv.bias, norm=_spec(layer.self_attn_norm) if pre else pending,
                               norm_stats=st, out_dtype=dt, **lin)
            q = qkv[:, :hd].view(b, sa.h, sa.dh)
            kn = qkv[:, hd:2 * hd].view(b, sa.h, sa.dh)
            vn = qkv[:, 2 * hd:].view(b, sa.h, sa.dh)
            o = decode_attention(q, k[li], v[li], sa.scale, pos=pos, k_new=kn, v_new=vn, bias_table=self.bias[li],
                                 row_index=rows, pdl=self.pdl)
            x, st = self._row_parallel(o.reshape(b, hd), sa.out.weight, sa.out.bias, x, None if pre else pending,
                                       st, lin)
            pending = None if pre else _spec(layer.self_attn_norm)
            # cross-attention
            q = fused_linear(x, ca.q.weight, ca.q.bias, norm=_spec(layer.cross_attn_norm) if pre else pending,
                             norm_stats=st, out_dtype=dt, **lin).view(b, ca.h, ca.dh)
            o = decode_attention(q, ck[li], cv[li], ca.scale, key_bias=cross_bias, kv_group=group, pdl=self.pdl)
            x, st = self._row_parallel(o.reshape(b, hd), ca.out.weight, ca.out.bias, x, None if pre else pending,
                                       st, lin)
            pending = None if pre else _spec(layer.cross_attn_norm)
            # feed-forward
            h = fused_linear(x, ffn.wi.weight, ffn.wi.bias, norm=_spec(layer.ffn_norm) if pre else pending,
                             norm_stats=st, act=self.act, gated=ffn.gated, out_dtype=dt, **lin)
            x, st = self._row_parallel(h, ffn.wo.weight, ffn.wo.bias, x, None if pre else pending, st, lin)
            pending = None if pre else _spec(layer.ffn_norm)
        final = self.final if pre else pending
        if final is None and self.out_scale != 1.0:  # pre-norm without a final norm (rare)
            x = (x.to(dt) * self.out_scale)
            st = None
        # under TP: this rank's vocabulary slice, gathered, and the (full) logits bias after the gather
        logits = fused_linear(x, model.output_embedding.weight, None if self.tp else self.lm_bias, norm=final,
                              norm_stats=st, out_dtype=torch.float32, **lin)
        if self.tp:
            logits = self.ctx.all_gather_last(logits)
        logits = logits[:, : self.vocab]
        if self.tp and self.lm_bias is not None:
            logits = logits + self.lm_bias.float()
        pos.add_(1)
        return logits
