"""CudaGraphRunner: the decoder step with static shapes, compiled and replayed from CUDA graphs.

What happens per step on the host: copy the step's tokens into a static buffer (skipped by the
fused greedy loop, which feeds its own argmax back inside the graph) and launch one captured graph.

- Self-attention K/V: one flat buffer per layer, viewed as [B_bucket, H, T_max, D]; the step writes
  row ``pos`` in place (``pos`` is a 0-dim device tensor advanced inside the graph).
- Cross-attention K/V: computed once per request at prefill into [B_bucket, H, S_bucket, D] views.
  With the Triton attention kernel the beams (or samples) of a request share one copy: query row b
  reads cross row b // beams (``decode_attention``'s ``kv_group``), so prefill writes one row per
  request instead of repeating it; other attention reads one expanded row per query row.
- Position bias: the decoder's full self-attention bias [H, T_max, T_max] (relative bias + causal
  mask, made by the model's own ``layer_biases``) is computed once; each step reads row ``pos``.
  Learned/sinusoidal positions come from the model's own ``embed`` with the device ``pos``.
- Attention over one query (``attention=``): ``"triton"`` (the default on CUDA with triton
  installed) calls the Triton decode-attention kernel as a custom op (``ops.py``): self-attention
  writes the new K/V row and reads rows 0..pos only, with T5's bias-table row; ``"math"`` (the
  default elsewhere) writes it as fp32 reductions that inductor fuses into a couple of kernels over
  all T_max rows; ``"sdpa"`` uses SDPA. Measured in the compiled step on an H200 (bart-large,
  batch 64 / 256): 1.22 / 2.49 ms per step with "math", 0.82 / 1.45 ms with "triton" (the padded
  lm_head below included).
- Every other op is the model's own module (norms, fused QKV / gated FFN linears, fp16 scaling of
  RowLinear inputs, logits), so numerics and fp16 overflow safety are the eager path's. On CUDA
  the logits use a copy of the output embedding padded to 64 rows when the vocabulary is not a
  multiple of 8 (``StaticDecoder.pad_lm_head``).
- Graphs are captured lazily per (batch bucket, source-length bucket) and share one memory pool.
- ``kernels="auto"`` (default; CUDA with triton installed): batch buckets up to ``fused_max_batch``
  run ``fused.FusedStep`` (8 Triton kernels per layer) instead of the compiled model step.
- Beam search without token-dependent processors runs whole steps (decoder step, processors, beam
  update, cache reorder) from one graph: ``beam_search``.
- Beam reordering (``beam_reorder="auto"``): where the step's self-attention is the Triton kernel,
  no cache row moves: a [B, T] int32 index names the cache row of every key position
  (TensorRT-LLM's cache indirection) and a beam step gathers that index (``_reorder``);
  elsewhere (``"copy"``) every layer's K/V rows are gathered (bart-large at 32 rows, 12 layers
  x 2 x 5.2 MB read and written per step). The fused greedy loop never
  reorders and reads the caches directly; so on the compiled path a batch bucket used both by
  greedy and by the runner interface / beam search compiles the step twice (with and without the
  index).
- ``beam_topk``: beam search's candidates (top 2 x beams over beams x vocabulary) from a two-stage
  Triton top-k ("triton"; equal scores lowest index first) or ``torch.topk``'s radix select
  ("torch"); "auto" (the default): triton on CUDA where Triton is installed. bart-large beam 4 x 8
  on an H200: 0.897 -> 0.850 ms per step end to end, 0.795 with ``beam.small_topk`` for the running
  beams (docs/performance.md, 2026-11-30 12:27-12:58).
- Tensor parallelism (pipeline size 1): each rank's static step holds its heads; the compiled step
  traces the model's all-reduces / all-gather (dynamo's functional collectives) and the CUDA graph
  captures them. ``tp_allreduce="symm"`` sends the small ones through symmetric memory
  (``parallel/symm.py``); "fused" also makes the Triton step's all-reduce, bias and residual add
  one kernel (``allreduce.py``); "auto" (the default) is "fused" where every rank can map its
  peers' GPU memory, else "nccl". ``kernels="triton"`` runs the Triton step under TP too (each
  row-parallel product an fp32 partial sum, all-reduced, added to the residual with one rounding);
  "auto" does so for batch buckets up to ``fused_max_batch`` with the fused all-reduce on a
  pre-norm decoder (2 x H200, flan-t5-xl shape: batch-1 step 1.13 ms against one GPU's 1.36;
  docs/performance.md, 2026-11-30 13:40-14:08), and keeps the compiled step otherwise.
- ``compile_options``: inductor config for the compiled step, given to ``torch.compile`` (so the
  step is compiled anew rather than reused from a runner of the same shapes with other options) and
  patched around every (re)compilation. None (the default) is ``default_compile_options``:
  ``{"triton.enable_pdl": True}`` for a single-rank model on a Hopper or newer GPU (inductor's own
  kernels launched with programmatic dependent launch: each waits only where it reads its
  predecessor's writes, so its start overlaps the predecessor's tail), else none; ``{}`` compiles
  without options, and ``ENCDEC_PDL=0`` switches PDL off everywhere. bart-large batch 64 on an H200:
  0.817 -> 0.759 ms per step, the same tokens as TORCHINDUCTOR_ENABLE_PDL=1 (docs/performance.md,
  2026-11-30 15:02-15:16). Not the default under tensor or pipeline parallelism (not measured there).
- ``attention_pdl``: the compiled step's Triton attention ops launched with programmatic dependent
  launch too (each loads its cached K/V while the GEMM before it ends, then waits for q). None (the
  default): wherever ``compile_options`` turn on inductor's PDL, for steps of up to 64 rows
  (``ops.ATTN_PDL_MAX_ROWS``; H200, 2026-11-30 16:48: bart-large / flan-t5-large batch 64 0.813 ->
  0.781 / 1.550 -> 1.483 ms per step, batch 256 1.5 % slower with it, so not there).
- ``fused_greedy`` (default True): ``generate(..., runner)`` hands greedy decoding to the fused loop
  (``greedy_search``: argmax, min length, forced first / last tokens and the token feedback in the
  graph) wherever its processors depend on the position only, and sampling to ``sample_search`` (the
  warpers and the draw in the graph too, the token loop's tokens for the same seed; top-k with top-p
  from the max(2k, 128) best scores instead of a sort of the whole vocabulary, the draw without
  ``torch.multinomial``'s checks: sampling requests 11-18 % faster at batch 1-64 on an H200,
  docs/performance.md 2026-12-02 04:20); False keeps
  generate's token loop (a host round trip per token). bart-large on an H200: the same tokens, 27.7 against 29.8 ms per
  request at batch 1, 60.5 against 66.5 at 64 (64 tokens; 2026-11-30 16:43).
- ``prefill_graphs`` (None, the default: on wherever the runner replays CUDA graphs on one rank): the
  prefill (encoder, every layer's cross K/V, the padding bias) replayed from one CUDA graph per
  (request rows, source) bucket, the sources copied into static buffers padded to the bucket, for
  batches the encoder runs in one call (mixed lengths that ``runtime.encode`` splits into length
  groups, and beams with expanded cross rows, keep the eager prefill). The eager prefill is
  launch-bound at small batches: bart-large on an H200 (docs/performance.md, 2026-11-30 18:45),
  prefill 3.70 -> 0.92 ms and the 64-token greedy request 23.9 -> 22.6 ms at batch 1, 5.62 -> 1.35
  and 50.0 -> 45.5 at batch 8, 6.93 -> 6.31 and 61.3 -> 60.7 at batch 64. The encoder then runs at
  the bucket's length: equal to the eager prefill up to rounding. Off on a CPU (no graphs, and the
  padding would only add work) and under tensor parallelism (the encoder's collectives are not
  captured; True is refused there).
"""
from __future__ import annotations

import contextlib
import copy
import math
import statistics
import threading
from dataclasses import dataclass

import torch

from ...errors import ConfigError, LimitError
from ..encode import encode_grouped
from ..logits import draw
from . import ops as cuda_ops

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# torch.compile options of the decoder step on a CPU (fp32): the weights are frozen into the
# compiled step (constant-folded, packed once by inductor) and the linears are autotuned between
# inductor's C++ micro-GEMM template and ATen's kernel. t5-small, 2-core AVX2 box, batch 1: 8.6-8.8
# ms per step against 17-22 ms for the eager step with oneDNN-packed weights (docs/performance.md).
CPU_COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}

# compilations dynamo may keep of one function: every batch bucket x source bucket x step variant
# (with / without the beam row index, the cross-row group) and every beam configuration is one, and
# several runners (models) in a process add theirs to the same functions
RECOMPILE_LIMIT = 1024


def _quiet_autotune() -> None:
    """Inductor's max-autotune writes a table of timings per autotuned GEMM to stderr (dozens of lines
    before a CPU run's first output); kept unless ENCDEC_DEBUG is set."""
    import os

    if os.environ.get("ENCDEC_DEBUG"):
        return
    try:
        import torch._inductor.select_algorithm as select_algorithm
    except ImportError:
        return
    if hasattr(select_algorithm, "PRINT_AUTOTUNE"):
        select_algorithm.PRINT_AUTOTUNE = False
    import torch._inductor.config as inductor_config

    if getattr(inductor_config, "max_autotune_report_choices_stats", False):  # its "Autotune Choices Stats" JSON
        inductor_config.max_autotune_report_choices_stats = False


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise dynamo's recompile limits to at least ``limit`` per function (never lower them). Its
    default, 8, made a compiled runner fail (``FailOnRecompileLimitHit``: the step compiles with
    fullgraph) at the ninth bucket combination on a CPU, where every bucket is its own static
    compilation, and would silently run the beam tail eagerly after eight beam configurations."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 8 * limit)


_THREAD = threading.local()


def thread_settings() -> None:
    """``allow_recompiles`` and ``_quiet_autotune`` in the calling thread, once per thread: dynamo's and
    inductor's config are per thread (torch 2.13), so what a runner set where it was built did not hold
    in ``encdec serve``'s scheduler thread or a stream's worker, where requests compile new buckets (the
    compiled CPU step failed at its ninth one there). Runner calls that may compile start with it."""
    if not getattr(_THREAD, "done", False):
        allow_recompiles()
        _quiet_autotune()
        _THREAD.done = True


def _round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


def _reorder(vw, n: int, index: torch.Tensor, pos: torch.Tensor, indirect: bool) -> None:
    """Beam search: the first ``n`` rows take the history of rows ``index``, after a step that wrote
    position ``pos - 1``.

    indirect (the Triton attention kernel's ``row_index``): cache row r wrote position ``pos - 1``
    of hypothesis r, so index row r first points there, then every index row takes row ``index[r]``:
    [n, T] int32 moves. Otherwise every layer's self-attention K/V rows are gathered."""
    if indirect:
        rows = vw.rows[:n]
        own = torch.arange(n, device=rows.device, dtype=rows.dtype).view(n, 1)
        rows.index_copy_(1, (pos - 1).view(1), own)
        rows.copy_(rows.index_select(0, index))
        return
    for t in vw.k + vw.v:
        t[:n].copy_(t[:n].index_select(0, index))


def default_compile_options(model, compile: bool = True, compile_mode: str | None = None) -> dict:
    """The compiled step's inductor options when a runner is given none: programmatic dependent
    launch (``triton.enable_pdl``) for a single-rank model compiled on a GPU that supports it
    (Hopper or newer, ``triton_kernels.pdl_supported``: not with ``ENCDEC_PDL=0``) without a
    compile mode (torch.compile takes a mode or options); else none."""
    from .triton_kernels import pdl_supported

    if (not compile or compile_mode or model.device.type != "cuda" or model.ctx.distributed
            or not pdl_supported(model.device)):
        return {}
    return {"triton.enable_pdl": True}


class _PatchedStep:
    """The compiled step called with inductor's config patched by ``options`` (``compile_options``:
    every (re)compilation sees them), e.g. ``{"triton.enable_pdl": True}`` (the default on Hopper:
    ``default_compile_options``)."""

    def __init__(self, compiled, options: dict):
        self.compiled, self.options = compiled, dict(options)

    def __call__(self, *args, **kwargs):
        import torch._inductor.config as inductor_config

        with inductor_config.patch(self.options):
            return self.compiled(*args, **kwargs)


def _has_config(cfg, dotted: str) -> bool:
    obj = cfg
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


class _CpuCompiledStep:
    """The torch.compile'd step called with inductor's config patched by ``options`` (so that every
    (re)compilation sees them: ``torch.compile(options=...)`` did not apply ``freezing`` /
    ``max_autotune`` here, and the CPU step stayed at the eager speed, torch 2.13). If the first
    compilation fails (an inductor error; a missing C++ compiler is refused before, by the runner),
    it warns once and runs ``fallback``, the same step uncompiled, from then on: a failed compile
    executes nothing."""

    def __init__(self, compiled, fallback, options: dict):
        self.compiled, self.fallback = _PatchedStep(compiled, options), fallback
        self.state = "new"  # new -> ok | failed

    def __call__(self, *args, **kwargs):
        if self.state == "failed":
            return self.fallback(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as exc:
            if self.state == "ok":
                raise
            import warnings

            warnings.warn(f"compiling the CPU decoder step failed ({type(exc).__name__}: {str(exc)[:200]}); "
                          "running it uncompiled")
            self.state = "failed"
            return self.fallback(*args, **kwargs)
        self.state = "ok"
        return out


def _check_cpp_compiler() -> None:
    """Inductor's CPU code is C++: without a working compiler every compiled piece of the runner fails
    (the step falls back to eager, the others did not), so the compiled CPU runner is refused up front."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except RuntimeError as exc:
        from ...errors import EncDecError

        raise EncDecError(f"the compiled CPU runner needs a C++ compiler (inductor compiles its step to C++) and "
                          f"none works ({str(exc).splitlines()[0][:200]}); install g++ (or set CXX), or use the "
                          f"eager runner (--runner eager)") from None


def _first_possible_end(min_steps: int, forced_first_ids, eos_ids) -> int:
    """The first decoding step (0-based) after which an output may have ended. While a min length
    suppresses EOS (``min_steps`` steps) none can, unless a forced first token is itself an EOS id:
    the loops skip their "finished?" check there, so the host does not wait for the GPU
    (summarisation presets ask for 56+ tokens)."""
    if set(forced_first_ids or ()) & set(eos_ids):
        return 0
    return max(0, int(min_steps))


def _bucket(n: int, buckets, limit: int, what: str) -> int:
    if n > limit:
        raise LimitError(f"{what} {n} exceeds the runner's limit {limit}")
    for b in buckets:
        if b >= n:
            return min(b, limit)
    if n <= limit:
        return limit
    raise LimitError(f"{what} {n} exceeds the runner's limit {limit}")


def attend_one_query(q, k, v, bias, scale: float):
    """q [B,H,1,D]; k/v [B,H,T,D]; bias broadcastable to [B,H,T]; fp32 reductions -> [B,H,D]."""
    s = (q.float() * k.float()).sum(-1) * scale  # [B,H,T]
    if bias is not None:
        s = s + bias.float()
    p = torch.softmax(s, dim=-1)
    return (p.unsqueeze(-1) * v.float()).sum(-2).to(q.dtype)


def attend_sdpa(q, k, v, bias, scale: float):
    b, h = q.shape[0], q.shape[1]
    mask = None if bias is None else bias.to(q.dtype).unsqueeze(-2).expand(b, h, 1, k.shape[2])
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o[:, :, 0]


ATTENTION = {"math": attend_one_query, "sdpa": attend_sdpa}
# "triton": the Triton decode-attention kernel as a custom op (``ops.py``): self-attention writes the
# new K/V row and reads rows 0..pos only; "auto": triton on CUDA where installed, else math
ATTENTION_KINDS = ("auto", "triton", *ATTENTION)


def _resolve_attention(attention: str, device) -> str:
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention={attention!r}: expected one of {sorted(ATTENTION_KINDS)}")
    from .triton_kernels import HAVE_TRITON

    if attention == "triton" and not HAVE_TRITON:
        raise ValueError("attention='triton' needs triton installed")
    if attention == "auto":
        return "triton" if HAVE_TRITON and torch.device(device).type == "cuda" else "math"
    return attention


@dataclass
class _Views:
    """The static tensors one (batch bucket, source bucket) graph reads and writes."""

    tokens: torch.Tensor  # [B] long
    k: list
    v: list
    ck: list
    cv: list
    cross_bias: torch.Tensor  # [B, S] in the model dtype
    rows: torch.Tensor  # [B, T] int32: the cache row of each key position (beam search, Triton attention)
    out_tokens: torch.Tensor  # [B, T] long (fused greedy)
    finished: torch.Tensor  # [B] bool (fused greedy)


class StaticDecoder:
    """Static buffers for a runner's limits and the functional decoder step over them."""

    def __init__(self, model, max_batch: int, max_len: int, max_input_len: int, attention: str = "auto"):
        cfg, ctx = model.cfg, model.ctx
        if ctx.pp_size != 1:
            raise NotImplementedError(
                f"the CUDA graph runner serves pipeline size 1, got pp_size {ctx.pp_size}: under pipeline "
                "parallelism use the eager runner (it runs the same loop on every rank)")
        self.model, self.cfg = model, cfg
        dec = model.decoder
        self.layer_ids = list(dec.layer_ids)
        self.L = len(self.layer_ids)
        self.H = cfg.decoder_heads // ctx.tp_size  # this rank's heads under tensor parallelism
        self.D = cfg.head_dim
        self.max_batch = int(max_batch)
        self.T = _round_up(max(int(max_len), 1), 16)
        self.max_len = int(max_len)
        self.S = _round_up(max(int(max_input_len), 1), 16)
        self.attention = _resolve_attention(attention, model.device)
        self.attend = ATTENTION.get(self.attention)
        dev, dt = model.device, model.dtype
        self.device, self.dtype = dev, dt
        n_self = self.max_batch * self.H * self.T * self.D
        n_cross = self.max_batch * self.H * self.S * self.D
        self._k = [torch.zeros(n_self, dtype=dt, device=dev) for _ in range(self.L)]
        self._v = [torch.zeros(n_self, dtype=dt, device=dev) for _ in range(self.L)]
        self._ck = [torch.zeros(n_cross, dtype=dt, device=dev) for _ in range(self.L)]
        self._cv = [torch.zeros(n_cross, dtype=dt, device=dev) for _ in range(self.L)]
        self._cross_bias = torch.zeros(self.max_batch * self.S, dtype=dt, device=dev)
        self._rows = torch.zeros(self.max_batch * self.T, dtype=torch.int32, device=dev)
        self._tokens = torch.zeros(self.max_batch, dtype=torch.long, device=dev)
        self._out = torch.zeros(self.max_batch * self.T, dtype=torch.long, device=dev)
        self._finished = torch.zeros(self.max_batch, dtype=torch.bool, device=dev)
        self.pos = torch.zeros((), dtype=torch.long, device=dev)
        self.eos = torch.full((), cfg.eos_token_id, dtype=torch.long, device=dev)
        self.pad = torch.full((), cfg.pad_token_id, dtype=torch.long, device=dev)
        self.min_steps = torch.zeros((), dtype=torch.long, device=dev)  # EOS suppressed while pos < this
        self.forced_bos = torch.full((self.max_batch,), -1, dtype=torch.long, device=dev)  # first token per row (-1: none)
        self.forced_eos = torch.full((), -1, dtype=torch.long, device=dev)  # token at step last_step
        self.last_step = torch.full((), -1, dtype=torch.long, device=dev)
        self.bias = self._bias_tables()
        # bias rows for the Triton attention kernel (this step's op and FusedStep): it reads keys
        # 0..pos only, so a causal mask alone is redundant; only a relative position bias needs them
        self.kernel_bias = self.bias if cfg.position_type == "relative" else [None] * self.L
        self.lm_weight = None  # pad_lm_head()
        # the Triton attention ops launched with programmatic dependent launch (the runner's
        # attention_pdl): each loads its cached K/V while the kernel before it ends
        self.attn_pdl = False

    @torch.no_grad()
    def pad_lm_head(self) -> None:
        """Keep a copy of the output embedding padded to a multiple of 64 rows for the step's logits,
        when the vocabulary is not a multiple of 8 (BART's 50265, mBART's 250027): the [B, V] product
        then has a row stride cuBLAS can vectorise (unpadded it ran several times slower on an H200,
        bart-large: 136 us at batch 64, 286 us at 256, against about 25 / 50 us). Costs one
        vocabulary x d_model copy of the weight; later changes to the model's weight are not seen.
        Under tensor parallelism the rank's vocabulary slice is padded (BART's 50266 / 2 = 25133
        rows) and ``VocabEmbedding.logits`` drops the padding columns before the gather."""
        w = self.model.output_embedding.weight
        if w.shape[0] % 8 == 0:
            return
        pad = w.new_zeros(_round_up(w.shape[0], 64), w.shape[1])
        pad[: w.shape[0]] = w
        self.lm_weight = pad

    # ------------------------------------------------------------------ precomputed tables
    @torch.no_grad()
    def _bias_tables(self) -> list:
        """Per local layer: the decoder self-attention bias [H|1, T, T] (relative bias + causal)."""
        dec, T = self.model.decoder, self.T
        q = torch.arange(T, device=self.device).unsqueeze(1)
        k = torch.arange(T, device=self.device).unsqueeze(0)
        causal = ((k > q).to(torch.float32) * torch.finfo(self.dtype).min)[None, None]
        biases = dec.layer_biases(causal, T, T, 0)
        uniq: dict[int, torch.Tensor] = {}
        out = []
        for b in biases:
            if id(b) not in uniq:
                uniq[id(b)] = b[0].contiguous()
            out.append(uniq[id(b)])
        return out

    def views(self, b: int, s: int) -> _Views:
        H, T, D = self.H, self.T, self.D
        nk, nc = b * H * T * D, b * H * s * D
        return _Views(
            tokens=self._tokens[:b],
            k=[x[:nk].view(b, H, T, D) for x in self._k],
            v=[x[:nk].view(b, H, T, D) for x in self._v],
            ck=[x[:nc].view(b, H, s, D) for x in self._ck],
            cv=[x[:nc].view(b, H, s, D) for x in self._cv],
            cross_bias=self._cross_bias[: b * s].view(b, s),
            rows=self._rows[: b * T].view(b, T),
            out_tokens=self._out[: b * T].view(b, T),
            finished=self._finished[:b],
        )

    # ------------------------------------------------------------------ the step
    @staticmethod
    def reset_rows(vw: _Views) -> None:
        """Every key position of row r in cache row r (no beam reordering yet)."""
        b = vw.rows.shape[0]
        vw.rows.copy_(torch.arange(b, device=vw.rows.device, dtype=vw.rows.dtype).view(b, 1).expand_as(vw.rows))

    def step(self, tokens, pos, k, v, ck, cv, cross_bias, rows=None, group: int = 1):
        """One decoder step for ``tokens`` [B] at position ``pos`` (0-dim device tensor).

        Writes K/V row ``pos`` of every layer and returns fp32 logits [B, V]. Shapes are static.
        rows: None, or (``attention="triton"``) the [B, T] cache row of every key position (beam
        search by cache indirection). group (``attention="triton"``): query row b reads cross K/V
        and cross-bias row b // group (a request's beams share one copy).
        """
        if (rows is not None or group != 1) and self.attention != "triton":
            raise ValueError("StaticDecoder.step: rows (cache indirection) and group (shared cross K/V) need "
                             "attention='triton'")
        model, dec = self.model, self.model.decoder
        b = tokens.shape[0]
        ids = tokens.unsqueeze(1)
        x = dec.embed(ids, torch.ones_like(ids), pos)
        x = model.ctx.stage_input(x)
        pos1 = pos.view(1)
        cb = cross_bias.unsqueeze(1)  # [B,1,S]
        for li, i in enumerate(self.layer_ids):
            layer = dec.layers[str(i)]
            # the math / SDPA attention's bias row (the Triton kernel reads the table itself)
            row = None if self.attention == "triton" else self.bias[li].index_select(1, pos1).squeeze(1).unsqueeze(0)

            def self_attn(h, layer=layer, li=li, row=row):
                sa = layer.self_attn
                q, kk, vv = sa.qkv(h).split(sa.h * sa.dh, dim=-1)
                if self.attention == "triton":
                    shape = (b, sa.h, sa.dh)
                    o = cuda_ops.self_attention(q.view(shape), k[li], v[li], sa.scale, pos, kk.view(shape),
                                                vv.view(shape), self.kernel_bias[li], rows, self.attn_pdl)
                    return sa.out(o.reshape(b, 1, sa.h * sa.dh))
                q = q.view(b, 1, sa.h, sa.dh).transpose(1, 2)
                k[li].index_copy_(2, pos1, kk.view(b, 1, sa.h, sa.dh).transpose(1, 2))
                v[li].index_copy_(2, pos1, vv.view(b, 1, sa.h, sa.dh).transpose(1, 2))
                o = self.attend(q, k[li], v[li], row, sa.scale)
                return sa.out(o.reshape(b, 1, sa.h * sa.dh))

            def cross_attn(h, layer=layer, li=li):
                ca = layer.cross_attn
                if self.attention == "triton":
                    o = cuda_ops.cross_attention(ca.q(h).view(b, ca.h, ca.dh), ck[li], cv[li], ca.scale, cross_bias,
                                                 group, self.attn_pdl)
                    return ca.out(o.reshape(b, 1, ca.h * ca.dh))
                q = ca.q(h).view(b, 1, ca.h, ca.dh).transpose(1, 2)
                o = self.attend(q, ck[li], cv[li], cb, ca.scale)
                return ca.out(o.reshape(b, 1, ca.h * ca.dh))

            x = layer._block(x, layer.self_attn_norm, self_attn)
            x = layer._block(x, layer.cross_attn_norm, cross_attn)
            x = layer._block(x, layer.ffn_norm, layer.ffn)
        x = dec.finish(x)
        logits = model.logits(x, weight=self.lm_weight)[:, 0]
        pos.add_(1)
        return logits

    def greedy_select(self, logits, tokens, pos, out_tokens, finished, eos, pad, min_steps, forced_bos,
                      forced_eos, last_step):
        """After a step (``pos`` already advanced): argmax with EOS suppressed before ``min_steps``,
        the forced first / last token (HF's forced BOS / EOS), finished rows emit ``pad`` (HF's greedy
        semantics); record the token and feed it back into ``tokens``. All on the device."""
        p = pos - 1
        col = torch.arange(logits.shape[-1], device=logits.device) == eos
        nxt = logits.masked_fill(col & (p < min_steps), float("-inf")).argmax(-1)
        nxt = torch.where((p == 0) & (forced_bos >= 0), forced_bos, nxt)
        nxt = torch.where((p == last_step) & (forced_eos >= 0), forced_eos, nxt)
        nxt = torch.where(finished, pad, nxt)
        out_tokens.index_copy_(1, p.view(1), nxt.unsqueeze(1))
        finished.logical_or_(nxt == eos)
        tokens.copy_(nxt)
        return nxt


TP_ALLREDUCE = ("auto", "nccl", "symm", "fused")


def tp_allreduce_default() -> str:
    """``CudaGraphRunner``'s tensor-parallel all-reduce when none is given: ``ENCDEC_TP_ALLREDUCE``
    (one of TP_ALLREDUCE), else "auto"."""
    import os

    v = os.environ.get("ENCDEC_TP_ALLREDUCE", "").strip().lower() or "auto"
    if v not in TP_ALLREDUCE:
        raise ConfigError(f"ENCDEC_TP_ALLREDUCE={os.environ['ENCDEC_TP_ALLREDUCE']!r}: expected one of "
                          f"{', '.join(TP_ALLREDUCE)}")
    return v


class CudaGraphRunner:
    """The runner interface of ``encdec_core.runtime.generation.generate`` on CUDA graphs.

    ``prefill(input_ids, attention_mask, expand, max_len)`` runs the encoder, fills the cross K/V of
    each request ``expand`` times (beams, return sequences) and resets the step position;
    ``step(tokens [N]) -> fp32 logits [N, V]`` (a view of a static buffer, valid until the next
    step); ``reorder(index [N])`` moves self-attention K/V rows (beam search).
    """

    def __init__(self, model, max_batch: int, max_len: int, max_input_len: int = 512, *,
                 compile: bool = True, attention: str = "auto", batch_buckets=DEFAULT_BATCH_BUCKETS,
                 dynamic: bool | None = None, use_graphs: bool = True, compile_mode: str | None = None,
                 compile_encoder: bool | None = None, kernels: str = "auto", fused_max_batch: int = 16,
                 beam_reorder: str = "auto", encoder_launch_cost: int | None = None,
                 compile_options: dict | None = None, beam_topk: str = "auto", tp_allreduce: str | None = None,
                 fused_greedy: bool = True, attention_pdl: bool | None = None, prefill_graphs: bool | None = None):
        cpu = model.device.type == "cpu"
        if model.device.type != "cuda" and use_graphs:
            raise ValueError(f"CUDA graphs need a model on CUDA, got {model.device}: pass use_graphs=False "
                             "(on a CPU, compile=True runs the inductor-compiled static step)")
        if model.device.type != "cuda" and compile and not cpu:
            raise ValueError(f"compile=True serves CUDA and CPU models, got {model.device}")
        self.model = model
        # sinusoidal position tables sized for the limits before any step is compiled or captured
        # (eager calls grow them on demand; a graph keeps reading the table it was captured with)
        ensure = getattr(model, "ensure_positions", None)
        if ensure is not None:
            ensure(max(int(max_len), int(max_input_len)))
        # run-time LoRA (runtime/lora.py): the bank's hooks add each row's update to the model's own
        # linear layers, which the compiled step and the encoder call (the Triton step does not); the
        # adapter uid of each source row and of each decoder row sit in static buffers
        self._lora = getattr(model, "lora_bank", None)
        # generate's greedy decoding through the fused loop (greedy_search) instead of its token loop
        # (2026-11-30 16:44, H200: the same tokens, bart-large 2-6 ms less per request of 64 tokens);
        # False keeps the token loop
        self.fused_greedy = bool(fused_greedy)
        if compile_options is None:
            compile_options = default_compile_options(model, compile, compile_mode)
        self.compile_options = dict(compile_options)
        if compile_options:
            import torch._inductor.config as inductor_config

            unknown = [k for k in compile_options if not _has_config(inductor_config, k)]
            if unknown:
                raise ValueError(f"compile_options: unknown inductor options {unknown}")
            if not compile:
                raise ValueError("compile_options needs compile=True")
        # beam search: "index" moves a [B, T] cache-row index that the Triton attention kernel reads
        # through (no K/V row is copied), "copy" moves every layer's cache rows; "auto": index
        # wherever the step's self-attention is the Triton kernel
        if beam_reorder not in ("auto", "index", "copy"):
            raise ValueError(f"beam_reorder={beam_reorder!r}: expected 'auto', 'index' or 'copy'")
        self.beam_reorder = beam_reorder
        # beam search in the graph: the candidates' top-k by torch.topk or the Triton two-stage kernel
        # (``triton_kernels.row_topk``: equal scores lowest index first); "auto": triton on CUDA
        if beam_topk not in ("auto", "torch", "triton"):
            raise ValueError(f"beam_topk={beam_topk!r}: expected 'auto', 'torch' or 'triton'")
        if beam_topk == "auto":
            beam_topk = "triton" if model.device.type == "cuda" and cuda_ops.HAVE_TRITON else "torch"
        if beam_topk == "triton" and not cuda_ops.HAVE_TRITON:
            raise ValueError("beam_topk='triton' needs triton installed")
        self.beam_topk = beam_topk
        # tensor parallelism: the step's all-reduces through NCCL, or ("symm") small ones through
        # PyTorch's symmetric memory (parallel/symm.py: 6-9 us against NCCL's 16-18 us on 2 x H200;
        # collective set-up: every rank builds its runner with the same option)
        # "fused": "symm", and the Triton step's row-parallel blocks add bias and residual inside the
        # all-reduce kernel (runtime/cuda/allreduce.py: one PDL kernel instead of two plain ones);
        # "auto": "fused" where every tensor-parallel rank can map its peers' memory, else "nccl"
        # None: the ENCDEC_TP_ALLREDUCE environment variable, else "auto" (a switch for deployments)
        tp_allreduce = tp_allreduce_default() if tp_allreduce is None else tp_allreduce
        if tp_allreduce not in TP_ALLREDUCE:
            raise ValueError(f"tp_allreduce={tp_allreduce!r}: expected one of {', '.join(TP_ALLREDUCE)}")
        if tp_allreduce == "auto":
            from ...parallel.symm import choose_tp_allreduce

            tp_allreduce = choose_tp_allreduce(model.ctx)
        if tp_allreduce in ("symm", "fused") and model.ctx.tp_size > 1:
            if model.device.type != "cuda":
                raise ValueError(f"tp_allreduce={tp_allreduce!r} needs CUDA devices, got {model.device}")
            from ...parallel.symm import enable_symm_allreduce

            enable_symm_allreduce(model.ctx)
        self.tp_allreduce = tp_allreduce
        # token-rows a further encoder call is worth when grouping mixed source lengths (None: the
        # device's default, 0: one call for the whole batch; ``runtime.encode.plan_groups``)
        if self._lora is not None:
            if encoder_launch_cost not in (None, 0):
                raise ValueError("encoder_launch_cost: run-time LoRA encodes a batch in one call (its rows are "
                                 "the requests' rows), so only None or 0 is accepted")
            encoder_launch_cost = 0
        self.encoder_launch_cost = encoder_launch_cost
        self.dec = StaticDecoder(model, max_batch, max_len, max_input_len, attention)
        # graph keys of the current request: ("lora",) appended where one of its requests names an
        # adapter; otherwise the graphs hold no adapter kernels (the base model's step)
        self._lkey: tuple = ()
        if self._lora is not None:
            self._lora_src = torch.full((max_batch,), -1, dtype=torch.long, device=model.device)
            self._lora_rows = torch.full((max_batch,), -1, dtype=torch.long, device=model.device)
        # the compiled step's Triton attention launched with programmatic dependent launch (its cached
        # K/V loaded while the GEMM before it ends); None: wherever inductor's kernels use PDL
        # (compile_options' triton.enable_pdl, the default on Hopper for one rank)
        from .triton_kernels import pdl_supported

        pdl_ok = compile and self.dec.attention == "triton" and pdl_supported(model.device)
        if attention_pdl is None:
            attention_pdl = pdl_ok and bool(self.compile_options.get("triton.enable_pdl"))
        elif attention_pdl and not pdl_ok:
            raise ValueError("attention_pdl=True needs compile=True, the Triton attention (attention='auto' or "
                             f"'triton', got {self.dec.attention!r}) and a GPU with programmatic dependent "
                             "launch (Hopper or newer, ENCDEC_PDL not 0)")
        self.dec.attn_pdl = bool(attention_pdl)
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.use_graphs = use_graphs
        self._compile = compile
        if compile and cpu:
            _check_cpp_compiler()
        if compile:
            allow_recompiles()
            kw = {"fullgraph": True, "dynamic": dynamic}
            if cpu and dynamic is None:
                kw["dynamic"] = False  # one step per batch bucket, like the CUDA graphs
            self._select = torch.compile(self.dec.greedy_select, **kw)
            if compile_mode:
                kw["mode"] = compile_mode
            elif compile_options:
                # options make the compiler backend differ from a default runner's, so dynamo compiles
                # this step anew: with the patch alone it reused a step that another runner of the
                # same shapes had compiled earlier in the process, and the options never applied.
                # (torch.compile takes a mode or options: with a compile_mode only the patch applies)
                kw["options"] = dict(compile_options)
            self._step = torch.compile(self.dec.step, **kw)
            if cpu and not compile_mode:
                _quiet_autotune()
                cpu_options = dict(CPU_COMPILE_OPTIONS)
                if self._lora is not None:
                    # freezing folds module buffers into constants: the adapter uid of each row, a
                    # buffer the bank fills per batch, kept its first batch's values (wrong outputs
                    # from the second batch on)
                    cpu_options["freezing"] = False
                self._step = _CpuCompiledStep(self._step, self.dec.step, {**cpu_options, **(compile_options or {})})
            elif compile_options:
                self._step = _PatchedStep(self._step, compile_options)
        else:
            self._step, self._select = self.dec.step, self.dec.greedy_select
        # kernels: "inductor" (the compiled model step), "triton" (FusedStep for batch buckets up to
        # fused_max_batch: 8 Triton kernels per layer; runs interpreted on CPU for checks), or "auto"
        # (triton on CUDA when installed and the model is supported, else inductor). Under tensor
        # parallelism "auto" is triton only with the fused residual all-reduce on a pre-norm decoder
        # (the form measured on 2 x H200: flan-t5-xl shape, batch 1 / 8 steps 1.13 / 2.05 ms against
        # one GPU's 1.36 / 2.77 and the compiled TP step's 2.51 / 2.53); otherwise inductor
        if kernels not in ("inductor", "triton", "auto"):
            raise ValueError(f"kernels={kernels!r}: expected 'inductor', 'triton' or 'auto'")
        if self._lora is not None:
            if kernels == "triton":
                raise ValueError("kernels='triton': the Triton decoder step does not apply run-time LoRA "
                                 "adapters (kernels='inductor' or 'auto' does)")
            kernels = "inductor"
        if kernels == "auto" and model.ctx.distributed:
            fused_tp = tp_allreduce == "fused" and model.ctx.tp_size > 1 and model.cfg.pre_norm("decoder")
            kernels = "auto" if fused_tp else "inductor"
        self._fused = None
        self.fused_max_batch = int(fused_max_batch)
        if kernels != "inductor":
            from .fused import FusedStep, unsupported_reason

            why = unsupported_reason(model)
            if why is not None and kernels == "triton":
                raise ValueError(f"kernels='triton': the Triton decoder step does not support {why}")
            if why is None and (model.device.type == "cuda" or kernels == "triton"):
                self._fused = FusedStep(self.dec)
                if tp_allreduce == "fused" and model.ctx.tp_size > 1:
                    self._fused.enable_fused_allreduce(self.fused_max_batch)
                if compile:
                    self._fused.compile_embedding()
        if model.device.type == "cuda" and (self._fused is None or self.dec.max_batch > self.fused_max_batch):
            self.dec.pad_lm_head()  # the static step serves some batch buckets
        self._encode = model.encode
        if cpu:
            # the encoder (and the cross K/V at prefill) stays eager on a CPU, on oneDNN-packed weights
            model.pack_cpu_weights()
        if (compile and not cpu) if compile_encoder is None else compile_encoder:
            self._encode = torch.compile(model.encode, dynamic=True)
        # the prefill (encoder, cross K/V, padding bias) as one CUDA graph per (request rows, source)
        # bucket on static source buffers, for batches the encoder would run in one call; without
        # graphs (use_graphs=False) the same padded prefill runs uncompiled (a check of its logic)
        if prefill_graphs and model.ctx.distributed:
            raise ValueError("prefill_graphs=True serves a single rank (the encoder's collectives are not "
                             "captured)")
        if prefill_graphs is None:
            prefill_graphs = use_graphs and not model.ctx.distributed
        self.prefill_graphs = bool(prefill_graphs)
        self._src_ids = self._src_mask = None
        self._graphs: dict = {}
        self._pool = None
        self._cur = None  # (bucket B, bucket S, N)
        self._group = 1  # rows sharing one cross K/V row (prefill's expand, with Triton attention)
        self.steps = 0
        self.stream = None

    @property
    def attention_pdl(self) -> bool:
        """Whether the compiled step's attention ops launch with programmatic dependent launch."""
        return self.dec.attn_pdl

    @classmethod
    def for_engine(cls, engine, **kw) -> "CudaGraphRunner":
        """A runner sized by an engine's build limits (batch x beams, input length, output length + 1
        for the decoder start token): ``engine.generate_ids(ids, runner=CudaGraphRunner.for_engine(engine))``.
        On a CPU engine: the compiled static step without graphs (``use_graphs=False``)."""
        lim = engine.limits
        kw.setdefault("use_graphs", engine.model.device.type == "cuda")
        try:
            return cls(engine.model, lim.max_batch_size * max(1, lim.max_beam_width), lim.max_output_len + 1,
                       lim.max_input_len, **kw)
        except (RuntimeError, OverflowError, TypeError, MemoryError) as exc:
            # the static caches and buffers for limits too large to allocate: say which limits
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if not (isinstance(exc, (torch.OutOfMemoryError, MemoryError, OverflowError))
                    or any(w in text for w in ("allocate", "out of memory", "Overflow", "too large"))):
                raise
            from ...errors import LimitError

            where = getattr(engine, "engine_dir", "the engine")
            raise LimitError(
                f"{where}: the runner preallocates its caches for the engine's limits (batch {lim.max_batch_size} "
                f"x beams {lim.max_beam_width}, input {lim.max_input_len}, output {lim.max_output_len}) and "
                f"could not ({type(exc).__name__}: {text[:200]}); build the engine with smaller limits") from None

    # ------------------------------------------------------------------ request setup
    def _lora_fill(self, b: int, expand: int) -> None:
        """Run-time LoRA: the adapter uid of each of ``b`` source rows and of their ``b * expand``
        decoder rows (a request's beams / samples follow it) into the static buffers; -1 (none) for
        the rest and for every row while no ``lora_bank.rows(uids)`` is active. A batch where no
        request names an adapter runs the graphs without adapter kernels (``_lkey``)."""
        if self._lora is None:
            return
        self._lkey = ("lora",) if self._lora.any_adapter else ()
        if not self._lkey:
            return
        uids = self._lora.request_uids(b)
        self._lora_src.fill_(-1)
        self._lora_rows.fill_(-1)
        if uids is not None:
            self._lora_src[:b].copy_(uids)
            self._lora_rows[: b * expand].copy_(uids.repeat_interleave(expand))

    def _lora_rows_active(self, idx):
        """A context with the run-time LoRA row index ``idx`` (a view of a static buffer; None: no
        adapter) active."""
        return contextlib.nullcontext() if self._lora is None else self._lora.static_rows(idx)

    def _lora_idx(self, buf_name: str, rows: int, on: bool):
        """The view of static uid buffer ``buf_name`` for ``rows`` rows, or None (no adapter)."""
        return getattr(self, buf_name)[:rows] if self._lora is not None and on else None

    def _lora_rows_of(self, fn, idx):
        """``fn`` run with the run-time LoRA row index ``idx`` active (None: no adapter)."""
        if self._lora is None:
            return fn

        def wrapped():
            with self._lora_rows_active(idx):
                return fn()
        return wrapped

    @property
    def source_buckets(self) -> tuple[int, ...]:
        """The source lengths graphs are captured for: 16, 32, 64, ... below the max input length, and
        the max input length itself (an input runs in the smallest bucket that holds it)."""
        out, b = [], 16
        while b < self.dec.S:
            out.append(b)
            b *= 2
        return (*out, self.dec.S)

    def _source_bucket(self, s: int) -> int:
        if s > self.dec.S:
            raise LimitError(f"input length {s} exceeds the runner's max input length {self.dec.S}")
        return next(b for b in self.source_buckets if b >= s)

    def _encode_rows(self, input_ids, attention_mask):
        if self._encode is not self.model.encode:
            try:
                return self._encode(input_ids, attention_mask)
            except Exception as exc:  # an inductor failure must not fail the request
                import warnings

                warnings.warn(f"compiled encoder failed ({type(exc).__name__}: {exc}); using the eager encoder")
                self._encode = self.model.encode
        return self.model.encode(input_ids, attention_mask)

    @torch.no_grad()
    def encode(self, input_ids, attention_mask=None):
        """Encoder output and the mask it goes with: trailing all-padding columns dropped, and rows of
        mixed lengths encoded in length groups (``runtime.encode``; ``encoder_launch_cost``)."""
        return encode_grouped(self._encode_rows, input_ids, attention_mask, self.encoder_launch_cost)

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None, expand: int = 1, max_len: int | None = None):
        thread_settings()  # every request starts here, in whichever thread runs it
        d = self.dec
        self._check_fused_allreduce()  # the previous request (beam search, sampling) ran to the end
        dev = d.device
        if max_len is not None and max_len > d.max_len:  # before the encoder runs
            raise LimitError(f"decoder length {max_len} exceeds the runner's max length {d.max_len}")
        input_ids = input_ids.to(dev)
        attention_mask = None if attention_mask is None else attention_mask.to(dev)
        n = input_ids.shape[0] * expand
        bb = _bucket(n, self.batch_buckets, d.max_batch, "batch size (requests x beams)")
        self._lora_fill(input_ids.shape[0], expand)
        # the Triton cross-attention reads row b // group: a request's beams share one copy of its
        # cross K/V and padding bias; other attention reads one expanded copy per row
        group = expand if expand > 1 and self._triton_attention(bb) else 1
        rep = expand // group
        rows = n // group
        if self.prefill_graphs and rep == 1:
            sb = self._prefill_static(input_ids, attention_mask)
            if sb is not None:
                return self._prefill_done(d.views(bb, sb), bb, sb, n, group, rows, max_len)
        src = self._lora_idx("_lora_src", input_ids.shape[0], bool(self._lkey))
        with self._lora_rows_active(src):
            enc, mask = self.encode(input_ids, attention_mask)
        s = enc.shape[1]
        sb = self._source_bucket(s)
        vw = d.views(bb, sb)
        dec = self.model.decoder
        for li, i in enumerate(d.layer_ids):
            with self._lora_rows_active(src):
                k, v = dec.layers[str(i)].cross_attn.project_kv(enc)
            if rep > 1:
                k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
            vw.ck[li][:rows, :, :s].copy_(k)
            vw.cv[li][:rows, :, :s].copy_(v)
        lo = torch.finfo(d.dtype).min
        cb = (1.0 - mask.to(torch.float32)) * lo
        if rep > 1:
            cb = cb.repeat_interleave(rep, 0)
        vw.cross_bias[:rows, :s].copy_(cb)
        vw.cross_bias[:rows, s:].fill_(lo)
        return self._prefill_done(vw, bb, sb, n, group, rows, max_len)

    def _prefill_done(self, vw: _Views, bb: int, sb: int, n: int, group: int, rows: int, max_len) -> int:
        """The prefill's bookkeeping after the cross K/V and padding bias of ``rows`` rows are in place."""
        d = self.dec
        vw.cross_bias[rows:].zero_()
        d.reset_rows(vw)
        d.pos.zero_()
        self._cur = (bb, sb, n)
        self._group = group
        self.steps = 0
        self.max_steps = max_len if max_len is not None else d.max_len
        return n

    def _prefill_static(self, input_ids, attention_mask) -> int | None:
        """``prefill_graphs``: the sources copied into static buffers padded to the (request rows,
        source) bucket, then the encoder, every layer's cross K/V and the padding bias from one CUDA
        graph (captured at a bucket's first request). Returns the source bucket, or None where the
        eager prefill serves the batch (mixed lengths that ``encode`` splits into length groups).

        The encoder runs at the bucket's length, so the outputs equal the eager prefill's up to the
        rounding of kernels of another shape (padding is masked: the softmax gives it exact zeros).
        Padding rows of the bucket hold one pad token each (no all-masked row)."""
        from ..encode import length_groups, row_lengths

        d = self.dec
        b = input_ids.shape[0]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        lens = row_lengths(mask).tolist()  # one host read, as encode's
        s = max(1, max(lens))
        sb = self._source_bucket(s)
        groups = length_groups(lens, self.encoder_launch_cost, d.device.type)
        if groups is not None and len(groups) > 1:
            return None
        rb = _bucket(b, self.batch_buckets, d.max_batch, "batch size")
        if self._src_ids is None:  # flat, so that every bucket's view is contiguous (as encode's inputs)
            self._src_ids = torch.zeros(d.max_batch * d.S, dtype=torch.long, device=d.device)
            self._src_mask = torch.zeros(d.max_batch * d.S, dtype=torch.long, device=d.device)
        pad = self.model.cfg.pad_token_id
        ids, msk = self._src_views(rb, sb)
        ids.fill_(pad)
        msk.zero_()
        ids[:b, :s].copy_(input_ids[:, :s])
        msk[:b, :s].copy_(mask[:, :s])
        msk[b:, 0] = 1
        key = ("prefill", rb, sb, 1) + self._lkey
        ent = self._graphs.get(key)
        if ent is None:
            try:
                ent = self._graphs[key] = self._graph(self._prefill_fn(rb, sb, bool(self._lkey)))
            except Exception as exc:  # a prefill that cannot be captured must not fail the request
                import warnings

                warnings.warn(f"capturing the prefill failed ({type(exc).__name__}: {str(exc)[:200]}); "
                              "the eager prefill serves this runner from now on")
                self.prefill_graphs = False
                return None
        g, fn = ent
        if g is None:
            fn()
        else:
            g.replay()
        return sb

    def _src_views(self, rb: int, sb: int):
        """The static source ids and mask of bucket (rb, sb): contiguous [rb, sb] views."""
        return self._src_ids[: rb * sb].view(rb, sb), self._src_mask[: rb * sb].view(rb, sb)

    def _prefill_fn(self, rb: int, sb: int, lora: bool = False):
        """The graphed prefill of bucket (rb request rows, sb source positions): row r of every cache
        and of the padding bias sits at the same place in any batch bucket's view of source bucket sb.
        lora: with the run-time adapters of the source rows' uids."""
        d, dec = self.dec, self.model.decoder
        vw = d.views(rb, sb)
        ids, msk = self._src_views(rb, sb)
        lo = torch.finfo(d.dtype).min

        def fn():
            enc = self._encode_rows(ids, msk)
            for li, i in enumerate(d.layer_ids):
                k, v = dec.layers[str(i)].cross_attn.project_kv(enc)
                vw.ck[li].copy_(k)
                vw.cv[li].copy_(v)
            vw.cross_bias.copy_((1.0 - msk.to(torch.float32)) * lo)
            # nothing returned: the encoder output is a temporary of the graph, its pool memory free
            # for the next capture (no graph keeps a [rows, source, d_model] output alive per bucket)
        return self._lora_rows_of(fn, self._lora_idx("_lora_src", rb, lora))

    # ------------------------------------------------------------------ graphs
    def _step_fn(self, bb: int):
        """The step that serves batch bucket ``bb``: the Triton step for small buckets when enabled."""
        if self._fused is not None and bb <= self.fused_max_batch:
            return self._fused
        return self._step

    def _args(self, vw: _Views):
        d = self.dec
        return (vw.tokens, d.pos, vw.k, vw.v, vw.ck, vw.cv, vw.cross_bias)

    @staticmethod
    def _step_kw(vw: _Views, indirect: bool, group: int) -> dict:
        """The step's keywords: read the self caches through the row index (beam search), and the
        cross K/V of row b from row b // group (shared by a request's beams)."""
        kw = {"rows": vw.rows} if indirect else {}
        if group > 1:
            kw["group"] = group
        return kw

    def _triton_attention(self, bb: int) -> bool:
        """Whether the step of batch bucket ``bb`` attends through the Triton kernel."""
        return self._step_fn(bb) is self._fused or self.dec.attention == "triton"

    def _indirect(self, bb: int) -> bool:
        """Whether the step of batch bucket ``bb`` reads the self-attention caches through the Triton
        kernel, so that beam search moves the [B, T] row index instead of every layer's cache rows."""
        triton = self._triton_attention(bb)
        if self.beam_reorder == "index" and not triton:
            raise ValueError("beam_reorder='index' needs the Triton attention kernel (attention='triton' or "
                             "the Triton step)")
        return triton and self.beam_reorder != "copy"

    def _graph(self, fn, restore=None, warm_pos: int = 0, warm: bool = False):
        """Warm ``fn`` up (compiling it) on a side stream, from decoder position ``warm_pos``, capture
        it into a CUDA graph in the shared pool and call ``restore()`` afterwards (the warm-up runs
        change the static state). Returns (graph, output of fn) or (None, fn) without graphs, where
        ``warm`` runs fn once first (the compiled step compiles then, not at its first request)."""
        if not self.use_graphs:
            if warm:
                self.dec.pos.fill_(warm_pos)
                fn()
                if restore is not None:
                    restore()
            return (None, fn)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):  # compile + warm up
                self.dec.pos.fill_(warm_pos)
                out = fn()
        torch.cuda.current_stream().wait_stream(s)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            out = fn()
        if restore is not None:
            restore()
        return (g, out)

    @torch.no_grad()
    def _capture(self, key, warm: bool = False):
        kind, bb, sb, group = key[:4]  # then ("lora",) for the graphs with run-time adapters
        d = self.dec
        vw = d.views(bb, sb)
        step = self._step_fn(bb)
        if kind == "step":  # the runner interface: generate's loops, beam search with reorder()
            kw = self._step_kw(vw, self._indirect(bb), group)
            fn = lambda: step(*self._args(vw), **kw)  # noqa: E731
        else:  # fused greedy: one row per request (group 1)
            def fn():
                logits = step(*self._args(vw))
                self._select(logits, vw.tokens, d.pos, vw.out_tokens, vw.finished, d.eos, d.pad, d.min_steps,
                             d.forced_bos[:bb], d.forced_eos, d.last_step)
                return logits
        fn = self._lora_rows_of(fn, self._lora_idx("_lora_rows", bb, len(key) > 4))
        return self._graph(fn, self._restorer(vw), warm=warm)

    def _restorer(self, vw):
        """A function that puts back the position, tokens and finished flags of ``vw`` as they are now
        (a fused loop's capture warms up on them)."""
        d = self.dec
        saved = [d.pos.clone(), vw.tokens.clone(), vw.finished.clone()]

        def restore():
            for t, v in zip((d.pos, vw.tokens, vw.finished), saved):
                t.copy_(v)
        return restore

    def _run(self, kind: str):
        bb, sb, n = self._cur
        key = (kind, bb, sb, self._group) + self._lkey
        ent = self._graphs.get(key)
        if ent is None:
            ent = self._graphs[key] = self._capture(key)
        g, out = ent
        if g is None:
            return out()
        g.replay()
        return out

    @torch.no_grad()
    def warmup(self, batch_sizes=(1,), source_lens=(16,), kinds=("step",), eos: int | None = None,
               pad: int | None = None):
        """Compile and capture ahead of time (keeps compilation out of timed regions and requests).
        kinds: "step" (the runner interface) and/or "greedy" (the fused greedy loop). With
        ``prefill_graphs`` the prefill graph of each (batch, source) bucket is captured too (batch
        sizes count request rows there). Without graphs (the compiled step on a CPU) each step runs
        once, so that it is compiled here."""
        thread_settings()
        self.set_eos_pad(eos, pad)
        self._lkey = ()  # the graphs without run-time adapters
        for b in batch_sizes:
            for s in source_lens:
                bb = _bucket(b, self.batch_buckets, self.dec.max_batch, "batch size")
                sb = self._source_bucket(s)
                if self.prefill_graphs and ("prefill", bb, sb, 1) not in self._graphs:  # its key: bucket of b rows
                    tok = min(self.model.cfg.vocab_size - 1, self.model.cfg.pad_token_id + 1)
                    self._prefill_static(torch.full((b, s), tok, dtype=torch.long, device=self.dec.device), None)
                for kind in kinds:
                    if (kind, bb, sb, 1) not in self._graphs:
                        self._graphs[(kind, bb, sb, 1)] = self._capture((kind, bb, sb, 1), warm=True)

    def set_eos_pad(self, eos: int | None = None, pad: int | None = None) -> None:
        cfg = self.model.cfg
        self.dec.eos.fill_(cfg.eos_token_id if eos is None else eos)
        self.dec.pad.fill_(cfg.pad_token_id if pad is None else pad)

    # ------------------------------------------------------------------ the runner interface
    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decoder position for the prefilled rows -> fp32 logits [n, V]. With CUDA graphs the
        logits are a view of the graph's static output: the next step overwrites them (clone to keep)."""
        if self._cur is None:
            raise RuntimeError("prefill() first")
        bb, sb, n = self._cur
        if self.steps >= self.dec.max_len:
            raise LimitError(f"decoder length {self.steps + 1} exceeds the runner's max length {self.dec.max_len}")
        vw_tokens = self.dec._tokens[:n]
        vw_tokens.copy_(tokens.view(-1), non_blocking=True)
        out = self._run("step")
        self.steps += 1
        return out[:n]

    @torch.no_grad()
    def reorder(self, index: torch.Tensor) -> None:
        bb, sb, n = self._cur
        _reorder(self.dec.views(bb, sb), n, index.to(self.dec.device), self.dec.pos, self._indirect(bb))

    # ------------------------------------------------------------------ beam search in the graph
    @torch.no_grad()
    def beam_search(self, gc, batch: int, max_len: int, pipeline, prefix: torch.Tensor,
                    check_every: int | None = None):
        """Beam search (``encdec_core.runtime.beam``) with the whole step in one CUDA graph: decoder
        step, log-softmax, the position-dependent logits processors, the beam update and the
        self-attention cache reorder. The host replays the graph and reads the stop flag every
        ``check_every`` steps (the result is the same as stopping at once: see ``beam``'s docstring;
        None: ``_check_every``, 4 on a GPU). ``generate`` calls this for a runner after ``prefill``
        when the pipeline is ``static``."""
        from ..beam import BeamState
        from ..generation import feed_prefix

        if self._cur is None:
            raise RuntimeError("prefill() first")
        d = self.dec
        bb, sb, n = self._cur
        nb, prompt = gc.num_beams, prefix.shape[1]
        if n != batch * nb:
            raise ValueError(f"beam_search: prefill expanded to {n} rows, expected batch {batch} x beams {nb}")
        bos = pipeline.forced_bos
        pipe_sig = (pipeline.min_length if pipeline.eos_mask is not None else None, pipeline.max_length,
                    "rows" if isinstance(bos, torch.Tensor) else bos,
                    pipeline.forced_eos_ids)
        group = self._group
        # one graph per batch bucket, not per request count: it holds cap = bb // nb requests, and a
        # batch of fewer runs the rest as padding requests (BeamState's active count), so a server
        # sees at most one capture per (bucket, options) and reuses it for every batch size in it
        cap = bb // nb
        rows = cap * nb
        key = ("beam", bb, sb, group, cap, nb, max_len, prompt, gc.eos_token_ids, gc.pad_token_id, gc.length_penalty,
               str(gc.early_stopping), pipe_sig) + self._lkey
        pad_prefix = prefix if rows == n else torch.cat([prefix, prefix[-1:].expand(rows - n, prompt)])
        ent = self._graphs.get(key)
        if ent is None:
            st = BeamState(gc, cap, max_len, prompt, d.device, padded=True)
            if self.beam_topk == "triton":
                st.topk = cuda_ops.topk
            st.reset(pad_prefix, batch)
            pipe = pipeline
            if isinstance(bos, torch.Tensor):  # per-row forced first tokens: a buffer of the bucket's rows,
                pipe = copy.copy(pipeline)      # valid ids already for the capture's warm-up steps
                pipe.forced_bos = torch.cat([bos, bos[-1:].expand(rows - n)])
            vw = d.views(bb, sb)
            step = self._step_fn(bb)
            indirect = self._indirect(bb)
            kw = self._step_kw(vw, indirect, group)

            def tail(logits):
                logp = torch.log_softmax(logits[:rows].float(), dim=-1)
                st.update(pipe.at_position(logp, d.pos), d.pos)
                _reorder(vw, rows, st.src_index, d.pos, indirect)
                vw.tokens[:rows].copy_(st.tokens(d.pos))

            if self._compile:  # ~100 small eager kernels become a few fused ones
                tail = torch.compile(tail, dynamic=False)

            def fn():
                tail(step(*self._args(vw), **kw))
                return st.go_on

            fn = self._lora_rows_of(fn, self._lora_idx("_lora_rows", bb, bool(self._lkey)))
            g, out = self._graph(fn, warm_pos=prompt - 1)  # the beam update needs a length >= prompt
            ent = self._graphs[key] = (g, out, st, pipe)
        g, fn, st, pipe = ent
        if isinstance(bos, torch.Tensor):  # per-request forced first tokens: the captured buffer takes them
            pipe.forced_bos[:n].copy_(bos)
            pipe.forced_bos[n:].copy_(bos[-1:].expand(rows - n))
        st.reset(pad_prefix, batch)
        d.reset_rows(d.views(bb, sb))  # the capture's warm-up steps moved the row index
        d.pos.zero_()
        self.steps = 0
        feed_prefix(self, prefix)  # a decoder prefix: every beam has the same one
        d._tokens[:rows].copy_(pad_prefix[:, -1])
        check_every = self._check_every(check_every, 4)
        first_end = _first_possible_end(pipeline.min_length - prompt if pipeline.eos_mask is not None else 0,
                                        pipeline.forced_bos_ids, gc.eos_token_ids)
        for i in range(max_len - prompt):
            if g is None:
                fn()
            else:
                g.replay()
            self.steps += 1
            if (i + 1) % check_every == 0 and i >= first_end and not self._beams_go_on(st):
                break
        return st.result(gc.num_return_sequences)

    @staticmethod
    def _beams_go_on(st) -> bool:
        """The host's check in ``beam_search``: some request is still searching (waits for the GPU)."""
        return bool(st.go_on)

    @torch.no_grad()
    def ready_steps(self, input_ids, attention_mask=None, steps: int = 32) -> None:
        """Prefill ``input_ids`` for ``steps`` fused-greedy steps that EOS never ends, replay (or capture)
        the step once and rewind to position 0: the next ``steps`` calls of ``_run("greedy")`` are the
        steps ``time_step`` times (a profiler can wrap them the same way). ``set_eos_pad()`` restores
        the model's EOS afterwards."""
        self.set_eos_pad(-1, None)
        self.prefill(input_ids, attention_mask, 1, steps)
        bb, sb, n = self._cur
        vw = self.dec.views(bb, sb)
        vw.tokens.fill_(self.model.cfg.decoder_start_token_id)
        vw.finished.zero_()
        self.dec.min_steps.zero_()
        self.dec.forced_bos.fill_(-1)
        self.dec.forced_eos.fill_(-1)
        self._run("greedy")  # capture / warm
        self.dec.pos.zero_()

    @torch.no_grad()
    def time_step(self, input_ids, attention_mask=None, steps: int = 32, repeats: int = 3) -> float:
        """Median device time (ms) of one decode step: ``steps`` fused-greedy graph replays timed with
        CUDA events after a prefill (EOS never ends the run). Captures the graph first if needed.
        On a CPU: the wall time of one (compiled) step."""
        import time

        cuda = self.dec.device.type == "cuda"
        times = []
        for _ in range(repeats + 1):
            self.ready_steps(input_ids, attention_mask, steps)
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
            else:
                t0 = time.perf_counter()
            for _ in range(steps):
                self._run("greedy")
            if cuda:
                e1.record()
                e1.synchronize()
                ms = e0.elapsed_time(e1)
            else:
                ms = (time.perf_counter() - t0) * 1e3
            times.append(ms / steps)
        self.set_eos_pad()
        return statistics.median(times[1:])

    # ------------------------------------------------------------------ fused greedy
    @torch.no_grad()
    def greedy(self, input_ids, attention_mask=None, max_new_tokens: int = 20, start_token: int | None = None,
               eos: int | None = None, pad: int | None = None, check_every: int | None = None,
               min_new_tokens: int = 0, forced_bos_token_id: int | None = None,
               forced_eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding with argmax, EOS and token feedback inside the graph; the host checks
        "all finished" every ``check_every`` steps (None: 8 on a GPU, every step on a CPU) once more
        than ``min_new_tokens`` tokens are out
        (results are the same as checking every step: finished rows only emit ``pad``).
        ``min_new_tokens`` suppresses EOS before that many tokens (HF's
        MinNewTokensLengthLogitsProcessor); ``forced_bos_token_id`` / ``forced_eos_token_id`` force
        the first / the last token (HF's processors of those names). Returns [B, 1 + steps] starting
        with the start token. ``generate`` reaches the same loop through ``greedy_search``."""
        cfg = self.model.cfg
        n = self.prefill(input_ids, attention_mask, 1, max_new_tokens)  # checks the length limit first
        return self._greedy_loop(
            n, max_new_tokens, cfg.decoder_start_token_id if start_token is None else start_token,
            cfg.eos_token_id if eos is None else eos, cfg.pad_token_id if pad is None else pad, check_every,
            min_new_tokens, forced_bos_token_id, forced_eos_token_id)

    def greedy_search_serves(self, gc, pipeline, prefix: torch.Tensor) -> bool:
        """Whether ``generate`` hands greedy decoding to ``greedy_search``: the runner was built with
        ``fused_greedy=True`` (the default) and the fused loop gives the token loop's result there
        (argmax without sampling, processors that depend on the position only: min length, forced first / last token,
        no repetition penalty or n-gram ban; one EOS id at most, one forced last token at most, a
        decoder prefix of the start token alone)."""
        return not gc.do_sample and self._fused_loop_serves(gc, pipeline, prefix)

    def _fused_loop_serves(self, gc, pipeline, prefix: torch.Tensor) -> bool:
        """What the fused greedy and sampling loops share: built with ``fused_greedy``, processors that
        depend on the position only, one EOS id at most, one forced last token at most, the start token
        alone as the decoder prefix."""
        return (self.fused_greedy and pipeline.position_only and prefix.shape[1] == 1 and len(gc.eos_token_ids) <= 1
                and (pipeline.forced_eos is None or pipeline.forced_eos.numel() == 1))

    @torch.no_grad()
    def greedy_search(self, gc, rows: int, max_len: int, pipeline, prefix: torch.Tensor,
                      check_every: int | None = None, start: int | None = None) -> torch.Tensor:
        """``generate``'s greedy decoding after ``prefill`` (where ``greedy_search_serves``): the fused
        loop of ``greedy`` (argmax, the processors and the token feedback inside the CUDA graph, a
        host check every ``check_every`` steps) instead of a host round trip per token. ``max_len``
        and the pipeline's min length count the start token, as ``generate`` does; forced first
        tokens may differ per row (mBART target languages: -1 = none). ``start``: the token every row's
        prefix holds, as the caller knows it on the host (``generate`` does); None reads the prefix back
        from the device (a host sync after the prefill) and refuses rows that start differently.
        Returns [rows, 1 + steps]."""
        if self._cur is None:
            raise RuntimeError("prefill() first")
        if not self.greedy_search_serves(gc, pipeline, prefix):
            raise ValueError("greedy_search: needs a runner with fused_greedy=True and a generation config "
                             "without sampling, repetition penalty / n-gram ban, several EOS ids or a decoder prefix")
        n, eos, pad, start, min_new = self._fused_setup("greedy_search", gc, rows, pipeline, prefix, start)
        forced_eos = None if pipeline.forced_eos_ids is None else pipeline.forced_eos_ids[0]
        return self._greedy_loop(n, max_len - 1, start, eos, pad, check_every, min_new,
                                 pipeline.forced_bos, forced_eos, pipeline.forced_bos_ids)

    def _fused_setup(self, who: str, gc, rows: int, pipeline, prefix: torch.Tensor, start: int | None):
        """What the fused greedy and sampling loops read before their first step: (rows, EOS id or -1,
        pad id, the start token, new tokens before EOS is allowed). ``start`` None reads the prefix
        back from the device (a host sync) and refuses rows that start differently."""
        n = self._cur[2]
        if n != rows or prefix.shape[0] != rows:
            raise ValueError(f"{who}: prefill holds {n} rows, expected {rows}")
        eos = gc.eos_token_ids[0] if gc.eos_token_ids else -1
        pad = gc.pad_id if gc.pad_id is not None else self.model.cfg.pad_token_id
        min_new = max(0, pipeline.min_length - 1) if pipeline.eos_mask is not None else 0
        if start is None:
            firsts = set(prefix[:, 0].tolist())
            if len(firsts) != 1:
                raise ValueError(f"{who}: the rows' prefixes start with different tokens {sorted(firsts)}: "
                                 f"the fused loop feeds one start token to every row")
            start = firsts.pop()
        return n, eos, pad, int(start), min_new

    def sample_search_serves(self, gc, pipeline, prefix: torch.Tensor) -> bool:
        """Whether ``generate`` hands sampling to ``sample_search``: as ``greedy_search_serves``, with
        the draw in place of the argmax (processors that depend on the position only, then sampling's
        warpers: temperature, top-k, top-p)."""
        return gc.do_sample and gc.num_beams == 1 and self._fused_loop_serves(gc, pipeline, prefix)

    @torch.no_grad()
    def sample_search(self, gc, rows: int, max_len: int, pipeline, prefix: torch.Tensor, generator=None,
                      check_every: int | None = None, start: int | None = None) -> torch.Tensor:
        """``generate``'s sampling after ``prefill`` (where ``sample_search_serves``): the decoder step,
        the processors at the device position, the warpers, the draw, EOS bookkeeping and the token
        feedback in one CUDA graph; the host replays it and checks every ``check_every`` steps (8 on a
        GPU). The same tokens as generate's token loop with the same ``generator`` (None: torch's
        global one): the graph draws from the device's default generator, which holds ``generator``'s
        state for the loop (handed back to it afterwards), with the token loop's ops on the same
        [rows, vocab] shapes, so one graph per row count (within the batch bucket) and options. The
        generator ends further on than the token loop leaves it where the last row finished between two
        host checks (the loop drew for the steps up to the check), so the next unseeded request's draws
        differ from the token loop's; seeded requests are unaffected.
        Returns [rows, 1 + steps]; an output whose every token the options exclude raises
        ``nothing_to_sample`` naming its step, as the token loop does. Top-k with top-p runs through
        ``top_k_top_p``: where a live row's candidates overflowed (ties at the k-th score reaching past
        them, or a nan score), the position and the generator go back to where the loop began and this
        returns None, for the token loop to do the request."""
        from ..generation import nothing_to_sample

        if self._cur is None:
            raise RuntimeError("prefill() first")
        if not self.sample_search_serves(gc, pipeline, prefix):
            raise ValueError("sample_search: needs a runner with fused_greedy=True and a sampling config "
                             "without repetition penalty / n-gram ban / bad words / suppressed tokens, several EOS "
                             "ids or a decoder prefix")
        d = self.dec
        bb, sb, _ = self._cur
        n, eos, pad, start, min_new = self._fused_setup("sample_search", gc, rows, pipeline, prefix, start)
        bos = pipeline.forced_bos
        pipe_sig = (pipeline.min_length if pipeline.eos_mask is not None else None, pipeline.max_length,
                    "rows" if isinstance(bos, torch.Tensor) else bos, pipeline.forced_eos_ids,
                    pipeline.temperature, pipeline.top_k, pipeline.top_p, pipeline.min_keep)
        # the graph keeps this call's pipeline: its min-length ban is of these EOS ids (as beam_search's key)
        key = ("sample", bb, sb, self._group, n, gc.eos_token_ids, pipe_sig) + self._lkey
        vw = d.views(bb, sb)
        self.set_eos_pad(eos, pad)
        cuda = d.device.type == "cuda"
        default = torch.cuda.default_generators[d.device.index or 0] if cuda else None
        ent = self._graphs.get(key)
        if ent is None:
            pipe = pipeline
            if isinstance(bos, torch.Tensor):  # per-row forced first tokens: a buffer the graph reads
                pipe = copy.copy(pipeline)
                pipe.forced_bos = bos.view(-1).clone()
            starved = torch.full((), -1, dtype=torch.long, device=d.device)  # first step with nothing to draw
            inexact = torch.zeros((), dtype=torch.bool, device=d.device)  # top_k_top_p's overflow in a live row
            step = self._step_fn(bb)
            kw = self._step_kw(vw, self._indirect(bb), self._group)
            own = [None]  # the generator of the call in progress (eager replays; a graph draws from the default)

            def fn():
                logits = step(*self._args(vw), **kw)
                self._sample_select(logits[:n], vw, n, d.pos, d.eos, d.pad, pipe, starved, inexact,
                                    None if self.use_graphs else own[0])
                return starved

            fn = self._lora_rows_of(fn, self._lora_idx("_lora_rows", bb, bool(self._lkey)))
            rng = default.get_state() if cuda else None  # the capture's warm-up draws must not count
            try:
                g, out = self._graph(fn, self._restorer(vw))
            finally:
                if rng is not None:
                    default.set_state(rng)
            ent = self._graphs[key] = (g, out, pipe, starved, inexact, own)
        g, fn, pipe, starved, inexact, own = ent
        if isinstance(bos, torch.Tensor):
            pipe.forced_bos.copy_(bos.view(-1))
        starved.fill_(-1)
        inexact.zero_()
        pos0 = d.pos.clone()  # where the token loop starts if this loop's draws are not exact
        # the generator the draws come from, as the loop begins (the token loop's start if the draws are not
        # exact; with a graph, the default generator holds it meanwhile)
        rng0 = (generator if generator is not None else default).get_state() if cuda else None
        vw.tokens[:n].fill_(start)
        vw.finished.zero_()
        vw.finished[n:].fill_(True)
        check_every = self._check_every(check_every, 8)
        first_end = _first_possible_end(min_new, pipeline.forced_bos_ids, (eos,))
        steps = max_len - 1
        swap = g is not None and generator is not None
        if swap:  # the graph draws from the default generator: it holds the caller's state meanwhile
            mine = default.get_state()
            default.set_state(rng0)
        own[0] = generator
        done = 0
        redo = False
        try:
            for i in range(steps):
                if g is None:
                    fn()
                else:
                    g.replay()
                done = i + 1
                if done % check_every == 0 and done < steps:
                    bad, all_done, redo = torch.stack((starved, vw.finished[:n].all().long(),
                                                       inexact.long())).tolist()
                    if redo:
                        break
                    if bad >= 0:
                        raise nothing_to_sample(gc, bad + 1)
                    if i >= first_end and all_done:
                        break
            if not redo:
                bad, redo = torch.stack((starved, inexact.long())).tolist()
                if bad >= 0 and not redo:
                    raise nothing_to_sample(gc, bad + 1)
        finally:
            own[0] = None
            if swap:
                generator.set_state(default.get_state())
                default.set_state(mine)
        if redo:  # the token loop redoes the request from the same state (only CUDA sets inexact)
            d.pos.copy_(pos0)
            if rng0 is not None:
                (generator if generator is not None else default).set_state(rng0)
            return None
        return self._fused_result(vw, n, done, eos, start)

    @staticmethod
    def _sample_select(logits, vw, n: int, pos, eos, pad, pipeline, starved, inexact, generator) -> None:
        """After a step (``pos`` advanced): generate's sampling step for rows [:n] with the position on
        the device (the token loop's results on the same shapes: its ops, but top-k with top-p through
        ``top_k_top_p``, which sets ``inexact`` where it may differ, and ``draw`` for
        ``torch.multinomial``); record and feed back the token."""
        p = pos - 1
        scores, overflow = pipeline.warp_candidates(pipeline.at_position(logits.float(), pos))
        finished = vw.finished[:n]
        if overflow is not None:
            inexact.logical_or_((overflow & ~finished).any())
        dead = torch.isneginf(scores).all(dim=-1) & ~finished
        probs = torch.where(dead.unsqueeze(1), 1.0, torch.softmax(scores, dim=-1))
        nxt = torch.where(finished, pad, draw(probs, generator))
        vw.out_tokens[:n].index_copy_(1, p.view(1), nxt.unsqueeze(1))
        starved.copy_(torch.where((starved < 0) & dead.any(), p, starved))
        finished.logical_or_(nxt == eos)
        vw.tokens[:n].copy_(nxt)

    def _check_every(self, check_every: int | None, gpu_default: int) -> int:
        """Steps between the host's "all finished" checks: as given, else ``gpu_default`` where the
        steps run asynchronously on a GPU (a check waits for it) and 1 elsewhere (on a CPU a check
        costs nothing, and every step after the last row finished is wasted work)."""
        if check_every is not None:
            return max(1, int(check_every))
        return gpu_default if self.dec.device.type == "cuda" else 1

    def _greedy_loop(self, n: int, max_new_tokens: int, start: int, eos: int, pad: int, check_every: int | None,
                     min_new_tokens: int, forced_bos, forced_eos: int | None,
                     forced_ids: frozenset | None = None) -> torch.Tensor:
        """The fused greedy loop over the ``n`` prefilled rows. ``forced_bos``: None, one id, or a
        per-row LongTensor [n] (-1 = none); ``forced_ids``: its ids on the host where the caller has them
        (else a per-row tensor is read back)."""
        d = self.dec  # max_new_tokens is within the limits: prefill checked them
        check_every = self._check_every(check_every, 8)
        self.set_eos_pad(eos, pad)
        d.min_steps.fill_(int(min_new_tokens))
        bb, sb, _ = self._cur
        if isinstance(forced_bos, torch.Tensor):
            d.forced_bos[:n].copy_(forced_bos.view(-1))
            if forced_ids is None:
                forced_ids = set(forced_bos.view(-1).tolist())
        else:
            d.forced_bos[:n].fill_(-1 if forced_bos is None else int(forced_bos))
            forced_ids = {forced_bos}
        d.forced_bos[n:].fill_(-1)
        d.forced_eos.fill_(-1 if forced_eos is None else int(forced_eos))
        d.last_step.fill_(int(max_new_tokens) - 1)
        vw = d.views(bb, sb)
        vw.tokens.fill_(start)
        vw.finished.zero_()
        vw.finished[n:].fill_(True)
        done = 0
        first_end = _first_possible_end(min_new_tokens, forced_ids, (eos,))
        for i in range(max_new_tokens):
            self._run("greedy")
            done = i + 1
            if done % check_every == 0 and i >= first_end and done < max_new_tokens and self._all_finished(vw):
                break
        return self._fused_result(vw, n, done, eos, start)

    def _fused_result(self, vw, n: int, done: int, eos: int, start: int) -> torch.Tensor:
        """A fused loop's [n, 1 + steps] after ``done`` steps: the start token, then the tokens up to the
        step where the last row finished (HF's length; one host read)."""
        self.steps = done
        out = vw.out_tokens[:n, :done]
        if done:
            first = torch.where(out == eos, torch.arange(done, device=out.device), done).min(1).values
            out = out[:, : min(done, int(first.max()) + 1)]  # first.max() is done where a row never ended
        head = torch.full((n, 1), start, dtype=torch.long, device=out.device)
        self._check_fused_allreduce()
        return torch.cat([head, out], 1)

    @staticmethod
    def _all_finished(vw) -> bool:
        """The host's check in ``greedy``: every row has finished (waits for the GPU)."""
        return bool(vw.finished.all())

    def _check_fused_allreduce(self) -> None:
        """Raise if a fused tensor-parallel all-reduce gave up waiting for a peer (its results, and
        every step's after it, are wrong): checked after ``greedy`` and before each prefill."""
        if self._fused is not None and self._fused.fused_ar is not None:
            self._fused.fused_ar.check()
