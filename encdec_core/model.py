"""Encoder, Decoder and EncDecModel assembled from an EncDecConfig. No family is named here."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncDecConfig
from .errors import ConfigError, LimitError
from .layers.attention import CrossAttention, SelfAttention
from .layers.ffn import FFN
from .layers.linear import ColumnLinear, RowLinear, linear, pack_weight
from .layers.norm import Norm
from .layers.position import RelativeBias, RelativeBuckets, position_ids, sinusoidal_table
from .parallel.context import SINGLE, ParallelContext
from .runtime.kv_cache import DecoderState, KVCache


def padded_vocab(vocab: int, tp: int) -> int:
    return int(math.ceil(vocab / tp) * tp)


def neg_inf(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


class VocabEmbedding(nn.Module):
    """Token embedding, vocab-parallel under TP: each rank holds rows [start, start + local)."""

    def __init__(self, vocab: int, d: int, ctx: ParallelContext):
        super().__init__()
        self.vocab = vocab
        self.ctx = ctx
        local = padded_vocab(vocab, ctx.tp_size) // ctx.tp_size
        self.start = ctx.tp_rank * local
        self.weight = nn.Parameter(torch.empty(local, d))
        self._packed = None  # CPU inference: the lm_head product (EncDecModel.pack_cpu_weights)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.ctx.all_reduce(x)

    def logits(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T gathered over tp ranks, padding columns removed. weight: another copy of W with
        the same first rows (e.g. padded to more rows for aligned GEMMs) to multiply instead."""
        if weight is None:
            y = linear(x, self.weight, None, self._packed)
        else:
            y = linear(x, weight, None, None)
            local = self.weight.shape[0]
            if y.shape[-1] != local and self.ctx.distributed:
                y = y[..., :local]  # each rank's part must be its own slice before the gather
        return self.ctx.all_gather_last(y)[..., : self.vocab]


class Layer(nn.Module):
    def __init__(self, cfg: EncDecConfig, side: str, ctx: ParallelContext, dtype):
        super().__init__()
        tp = ctx.tp_size
        heads = cfg.heads(side)
        if heads % tp:
            raise ConfigError(f"{side} heads {heads} are not divisible by tp_size {tp}")
        if cfg.ffn_dim(side) % tp:
            raise ConfigError(f"{side} ffn dim {cfg.ffn_dim(side)} is not divisible by tp_size {tp}")
        hl = heads // tp
        d, dh, scale = cfg.d_model, cfg.head_dim, cfg.softmax_scale
        norm = lambda: Norm(d, cfg.norm_type, cfg.norm_eps, cfg.norm_bias)  # noqa: E731
        self.pre_norm = cfg.pre_norm(side)
        self.self_attn = SelfAttention(d, hl, dh, cfg.linear_bias, scale, ctx)
        self.self_attn_norm = norm()
        self.is_decoder = side == "decoder"
        if self.is_decoder:
            self.cross_attn = CrossAttention(d, hl, dh, cfg.linear_bias, scale, ctx)
            self.cross_attn_norm = norm()
        self.ffn = FFN(d, cfg.ffn_dim(side) // tp, cfg.activation, cfg.gated_ffn, cfg.linear_bias, ctx)
        self.ffn_norm = norm()
        if cfg.position_type == "relative" and cfg.relative_bias_per_layer:
            self.rel_bias = RelativeBias(cfg.relative_num_buckets, hl)

    def _block(self, x, norm, fn):
        if self.pre_norm:
            return x + fn(norm(x))
        return norm(x + fn(x))

    def forward(self, x, self_bias, cache=None, li: int = 0, cross=None):
        x = self._block(x, self.self_attn_norm, lambda h: self.self_attn(h, self_bias, cache, li))
        if self.is_decoder:
            ck, cv, cb = cross
            x = self._block(x, self.cross_attn_norm, lambda h: self.cross_attn(h, ck, cv, cb))
        return self._block(x, self.ffn_norm, self.ffn)


class Stack(nn.Module):
    """Encoder or decoder stack. Owns the position provider; holds only this PP stage's layers."""

    def __init__(self, cfg: EncDecConfig, side: str, ctx: ParallelContext, dtype, embed: VocabEmbedding | None):
        super().__init__()
        self.cfg, self.side, self.ctx, self.dtype = cfg, side, ctx, dtype
        vocab = cfg.encoder_vocab_size if side == "encoder" else cfg.vocab_size
        if embed is None:
            self.embed_tokens = VocabEmbedding(vocab, cfg.d_model, ctx)
        self._shared = [embed]  # not a submodule: owned by the model
        d = cfg.d_model
        pt = cfg.position_type
        if pt == "learned":
            n = cfg.max_position_embeddings + cfg.position_offset
            if cfg.position_padding_aware:
                n = cfg.max_position_embeddings + cfg.pad_token_id + 1
            self.embed_positions = nn.Embedding(n, d)
        elif pt == "sinusoidal":
            self.register_buffer("sin_table", self._sin_table(), persistent=False)
            self._retired_tables: list[torch.Tensor] = []  # see ensure_positions
        elif pt == "relative":
            self.buckets = RelativeBuckets(side == "encoder", cfg.relative_num_buckets, cfg.relative_max_distance)
            if not cfg.relative_bias_per_layer:
                self.rel_bias = RelativeBias(cfg.relative_num_buckets, cfg.heads(side) // ctx.tp_size)
        if cfg.layernorm_embedding:
            self.layernorm_embedding = Norm(d, cfg.norm_type, cfg.norm_eps, cfg.norm_bias)
        self.layer_ids = list(ctx.layer_range(cfg.num_layers(side)))
        self.layers = nn.ModuleDict({str(i): Layer(cfg, side, ctx, dtype) for i in self.layer_ids})
        if cfg.final_norm(side):
            self.final_norm = Norm(d, cfg.norm_type, cfg.norm_eps, cfg.norm_bias)

    def _check_positions(self, length: int) -> None:
        """A host-side check of an eager call: ``length`` tokens fit the learned position table (else
        F.embedding's IndexError from inside torch). The graph runner checks its limits up front."""
        limit = self.cfg.max_position_embeddings
        if length > limit:
            what = "a source" if self.side == "encoder" else "an output (decoder start and prefix included)"
            raise LimitError(f"{what} of {length} tokens exceeds the model's learned positions "
                             f"(max_position_embeddings {limit}): expected at most {limit} tokens")

    def _sin_table(self) -> torch.Tensor:
        cfg = self.cfg
        n = cfg.max_position_embeddings + cfg.pad_token_id + 1
        return sinusoidal_table(n, cfg.d_model, cfg.pad_token_id).to(self.dtype)

    def init_buffers(self) -> None:
        if self.cfg.position_type == "sinusoidal":
            self.sin_table = self._sin_table().to(self.tokens.weight.device)

    def ensure_positions(self, n: int) -> None:
        """Sinusoidal positions for sequences of ``n`` tokens. The table starts at the config's
        max_position_embeddings and grows on demand as HF's FSMT grows it (a row does not depend on
        the table's size). A replaced table stays referenced: a captured CUDA graph or a compiled
        step may still read it (for the rows it was made for)."""
        if self.cfg.position_type != "sinusoidal":
            return
        rows = int(n) + self.cfg.pad_token_id + 1
        old = self.sin_table
        if rows <= old.shape[0] or old.is_meta:
            return
        self._retired_tables.append(old)
        self.sin_table = sinusoidal_table(rows, self.cfg.d_model, self.cfg.pad_token_id).to(
            device=old.device, dtype=old.dtype)

    @property
    def tokens(self) -> VocabEmbedding:
        return self._shared[0] if self._shared[0] is not None else self.embed_tokens

    def embed(self, ids: torch.Tensor, mask: torch.Tensor, past) -> torch.Tensor:
        cfg = self.cfg
        x = self.tokens(ids)
        if cfg.embedding_scale != 1.0:
            x = x * cfg.embedding_scale
        if cfg.position_type in ("learned", "sinusoidal"):
            pos = position_ids(mask, past, cfg.position_offset, cfg.position_padding_aware, cfg.pad_token_id)
            # a host count of tokens (eager calls): the learned table is checked against it, the sinusoid
            # table grows to it; a device ``past`` (the graph runner) and compiled code rely on the
            # runner's limits (and its ensure_positions)
            length = past + ids.shape[1] if isinstance(past, int) and not torch.compiler.is_compiling() else None
            if cfg.position_type == "learned":
                if length is not None:
                    self._check_positions(length)
                x = x + self.embed_positions(pos)
            else:
                if length is not None:
                    self.ensure_positions(length)
                x = x + F.embedding(pos, self.sin_table)
        if cfg.layernorm_embedding:
            x = self.layernorm_embedding(x)
        return x

    def relative_bias(self, q_len: int, k_len: int, q_offset, layer=None):
        buckets = self.buckets(q_len, k_len, q_offset, self.tokens.weight.device)
        table = layer.rel_bias if layer is not None else self.rel_bias
        return table(buckets)

    def layer_biases(self, base: torch.Tensor | None, q_len: int, k_len: int, q_offset):
        """The additive self-attention bias of each local layer: computed once per forward."""
        cfg = self.cfg
        lo = neg_inf(self.dtype)

        def fin(b):
            if b is None:
                return None
            b = b.clamp_min(lo).to(self.dtype) if b.dtype != self.dtype else b
            # the relative bias comes out of its embedding heads-last ([q, k, H] permuted): the fused
            # SDPA kernels on CUDA need the key dimension at stride 1, or attention falls back to the
            # math path (T5's encoder at 512 tokens: fp32 matmuls, 3-4x slower). Once per forward.
            return b.contiguous()

        if cfg.position_type != "relative":
            b = fin(base)
            return [b] * len(self.layer_ids)
        if not cfg.relative_bias_per_layer:
            rb = self.relative_bias(q_len, k_len, q_offset).float()
            b = fin(rb if base is None else rb + base)
            return [b] * len(self.layer_ids)
        out = []
        for i in self.layer_ids:
            rb = self.relative_bias(q_len, k_len, q_offset, self.layers[str(i)]).float()
            out.append(fin(rb if base is None else rb + base))
        return out

    @property
    def residual_dtype(self) -> torch.dtype:
        """fp16 safety: a pre-norm residual stream is kept in fp32 (T5's grows past 65504).

        Pre-norm layers read the residual only through a norm (computed in fp32, output in the
        weights' dtype), so the matmuls still run in fp16. Post-norm stacks keep ``dtype``.
        """
        if self.dtype == torch.float16 and self.cfg.pre_norm(self.side):
            return torch.float32
        return self.dtype

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        # the final norm reads the (fp32) residual: casting to fp16 first would overflow to inf
        x = self.ctx.stage_output(x.to(self.residual_dtype))
        if self.cfg.final_norm(self.side):
            x = self.final_norm(x)
        return x.to(self.dtype)


def padding_bias(mask: torch.Tensor, dtype) -> torch.Tensor:
    """[B, S] 1/0 mask -> additive [B, 1, 1, S] in fp32 (large negative on padding)."""
    return ((1.0 - mask[:, None, None, :].to(torch.float32)) * neg_inf(dtype))


class EncDecModel(nn.Module):
    def __init__(self, cfg: EncDecConfig, ctx: ParallelContext = SINGLE, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        self.cfg, self.ctx, self.dtype = cfg, ctx, dtype
        if cfg.shared_embeddings:
            if cfg.src_vocab_size not in (None, cfg.vocab_size):
                raise ConfigError(
                    f"shared_embeddings needs one vocabulary, got src {cfg.src_vocab_size} / tgt {cfg.vocab_size}")
            self.shared = VocabEmbedding(cfg.vocab_size, cfg.d_model, ctx)
            shared = self.shared
        else:
            shared = None
        self.encoder = Stack(cfg, "encoder", ctx, dtype, shared)
        self.decoder = Stack(cfg, "decoder", ctx, dtype, shared)
        if not cfg.tie_lm_head:
            self.lm_head = VocabEmbedding(cfg.vocab_size, cfg.d_model, ctx)
        if cfg.final_logits_bias:
            self.register_parameter("final_logits_bias", nn.Parameter(torch.zeros(cfg.vocab_size)))
        self.to(dtype=dtype)
        if device is not None:
            self.to(device)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.decoder.tokens.weight.device

    @property
    def output_embedding(self) -> VocabEmbedding:
        return self.decoder.tokens if self.cfg.tie_lm_head else self.lm_head

    # ------------------------------------------------------------------ encoder
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output [B, S, d]. ``attention_mask`` None: no position is padding, and attention
        gets no padding bias at all (BART's then runs without a mask, T5's with the relative bias
        broadcast over the batch instead of a [B, H, S, S] sum)."""
        if attention_mask is None:
            base, attention_mask = None, torch.ones_like(input_ids)
        else:
            base = padding_bias(attention_mask, self.dtype)
        enc = self.encoder
        pos_mask = attention_mask
        if self.cfg.position_padding_aware:
            # fairseq / HF FSMT: a pad token's position is the pad row, whether a mask says so or not
            pos_mask = attention_mask * input_ids.ne(self.cfg.pad_token_id).to(attention_mask.dtype)
        x = enc.embed(input_ids, pos_mask, 0).to(enc.residual_dtype)
        s = input_ids.shape[1]
        biases = enc.layer_biases(base, s, s, 0)
        x = self.ctx.stage_input(x)
        for b, i in zip(biases, enc.layer_ids):
            x = enc.layers[str(i)](x, b)
        return enc.finish(x)

    # ------------------------------------------------------------------ decoder
    def init_state(self, enc_out: torch.Tensor, attention_mask: torch.Tensor | None, max_len: int) -> DecoderState:
        """Cross K/V computed once from the encoder output; an empty self-attention cache."""
        b = enc_out.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones(enc_out.shape[:2], dtype=torch.long, device=enc_out.device)
        dec = self.decoder
        ks, vs = [], []
        for i in dec.layer_ids:
            k, v = dec.layers[str(i)].cross_attn.project_kv(enc_out)
            ks.append(k)
            vs.append(v)
        hl = self.cfg.decoder_heads // self.ctx.tp_size
        cache = KVCache(len(dec.layer_ids), b, hl, max_len, self.cfg.head_dim, self.dtype, enc_out.device)
        cross_bias = padding_bias(attention_mask, self.dtype).to(self.dtype)
        return DecoderState(cache, ks, vs, cross_bias)

    def decode(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """Run ``tokens`` [B, t] after the cached ones; returns fp32 logits [B, t, vocab]."""
        return self.logits(self.decode_hidden(tokens, state))

    def decode_hidden(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """``decode`` up to the decoder's final hidden states [B, t, d] (in the model dtype), before
        the output projection: ``logits(decode_hidden(...))`` is ``decode(...)``. Scoring uses it to
        project only the positions it needs, a few rows at a time (a [B, T, vocab] fp32 tensor of
        a 250k vocabulary does not fit)."""
        dec = self.decoder
        past = state.cache.length
        t = tokens.shape[1]
        x = dec.embed(tokens, torch.ones_like(tokens), past).to(dec.residual_dtype)
        causal = None
        if t > 1:
            q = torch.arange(t, device=tokens.device).unsqueeze(1) + past
            k = torch.arange(past + t, device=tokens.device).unsqueeze(0)
            causal = ((k > q).to(torch.float32) * neg_inf(self.dtype))[None, None]
        biases = dec.layer_biases(causal, t, past + t, past)
        x = self.ctx.stage_input(x)
        cross = state.cross_bias
        for li, (b, i) in enumerate(zip(biases, dec.layer_ids)):
            x = dec.layers[str(i)](x, b, state.cache, li, (state.cross_k[li], state.cross_v[li], cross))
        state.cache.advance(t)
        return dec.finish(x)

    def logits(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits; weight: a copy of the output embedding to multiply instead (see
        ``VocabEmbedding.logits``)."""
        if self.cfg.output_scale != 1.0:
            x = x * self.cfg.output_scale
        y = self.output_embedding.logits(x, weight).float()
        if self.cfg.final_logits_bias:
            y = y + self.final_logits_bias.float()
        return y

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None) -> torch.Tensor:
        """Teacher-forced logits [B, T, vocab] (fp32)."""
        enc = self.encode(input_ids, attention_mask)
        state = self.init_state(enc, attention_mask, decoder_input_ids.shape[1])
        return self.decode(decoder_input_ids, state)

    # ------------------------------------------------------------------ parameters
    def pack_cpu_weights(self) -> int:
        """fp32 on CPU: pack every linear weight and the lm_head into oneDNN's layout (a one-off
        copy, 1.5-3x faster GEMMs: see ``layers.linear.PackedWeight``; input embeddings are lookups
        and stay as they are). Idempotent; ENCDEC_CPU_PACK=0 turns it off. Returns how many packed."""
        import os

        if os.environ.get("ENCDEC_CPU_PACK", "1") == "0" or self.device.type != "cpu":
            return 0
        mods = [m for m in self.modules() if isinstance(m, (ColumnLinear, RowLinear))]
        mods.append(self.output_embedding)
        return sum(pack_weight(m) for m in mods)

    def init_buffers(self) -> None:
        self.encoder.init_buffers()
        self.decoder.init_buffers()

    def ensure_positions(self, n: int) -> None:
        """Position tables (sinusoidal ones grow; see ``Stack.ensure_positions``) for ``n`` tokens on
        either side. Runners that read the tables from compiled code or CUDA graphs call it once with
        their limits before they compile or capture."""
        self.encoder.ensure_positions(n)
        self.decoder.ensure_positions(n)

    def expected_shapes(self) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}


def build_model(cfg: EncDecConfig, ctx: ParallelContext = SINGLE, dtype=torch.float32, device="cpu",
                meta: bool = False) -> EncDecModel:
    if meta:
        with torch.device("meta"):
            return EncDecModel(cfg, ctx, dtype)
    return EncDecModel(cfg, ctx, dtype, device)
