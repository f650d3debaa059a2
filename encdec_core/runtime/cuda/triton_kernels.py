"""Triton kernels of the decoder step: fused linear (the small-batch step, M = 1..16; above 16 rows a
tiled kernel with split-K and producer-written norm statistics) and decode attention (every batch:
also called by the compiled step, through ``ops.py``).

A decoder layer written with these runs in about 8 kernels instead of about 19: one
``fused_linear`` per projection (pre-norm, bias, activation, gating and the residual add fused into
it) and one ``decode_attention`` per attention (cache write, scores, bias, softmax and the weighted
sum fused).

Numerics
--------
- Every kernel computes in fp32: norm statistics, the matmul accumulator, bias, activation, gating,
  the residual add, attention scores, the softmax and the weighted sum. bf16/fp16/fp32 inputs are
  up-cast on load.
- ``fused_linear`` rounds at exactly these points:
  1. the norm prologue reproduces ``encdec_core.layers.norm.Norm``: RMS: ``y = x*rsqrt(mean(x^2)+eps)``
     in fp32, rounded to the norm weight's dtype, multiplied by the norm weight and rounded to its
     dtype again (the eager product is in that dtype); layer: fp32 layer norm, rounded to the norm
     weight's dtype. A normalised residual (``residual_norm=``) is rounded the same way.
  2. the matmul input is cast to the weight dtype (as ``F.linear`` needs); products and the
     accumulation are fp32 (``tl.dot`` with fp32 weights runs with ``input_precision="ieee"``: no TF32).
  3. one final rounding of ``residual + act(x W^T + b)`` (gated: ``act(g + b0) * (u + b1)``) to the
     output dtype.
  The eager model instead rounds after each op (the linear output, the activation, the gate
  product and the residual sum are each rounded to the model dtype), and the fp16 ``RowLinear``
  scales its input by 1/256 before the matmul. The fused result is therefore slightly *more*
  accurate than eager and not bit-identical to it: expect differences of about one unit in the last
  place of the model dtype. fp32 accumulation also makes the fp16 overflow guard unnecessary here.
- ``decode_attention``: ``softmax(q.k * scale + bias) @ v`` with an online softmax (running max
  subtraction) in fp32, output rounded once to q's dtype. Keys whose bias is ``finfo.min`` get zero
  weight; a row whose keys are all at ``finfo.min`` gets uniform weights like ``torch.softmax``;
  a row with no finite score at all (e.g. every bias ``-inf``) returns zeros rather than NaN.
- Results are deterministic: fixed reduction orders. The tiled kernel's split-K uses an atomic
  counter only to elect the program that sums the splits' partials, which it does in split order.
- Tiled kernel (M > 16): norm statistics may come from the kernel that wrote the rows (per row and
  column tile, the sum and the sum of squared deviations from the tile mean of the stored values,
  merged with Chan's formula) instead of a second pass over the row: the same statistics up to fp32
  rounding.

Performance design (H100, M = 1..16)
------------------------------------
- ``fused_linear`` is a GEMV-shaped GEMM and is bound by reading the weight once. Each program owns a
  ``BLOCK_N`` slice of output columns for a ``BLOCK_M`` tile of rows (all rows when M <= 16) and
  walks K in ``BLOCK_K`` chunks, so every weight byte is read exactly once (M > 16 re-reads the
  weight once per 16-row tile, from L2). K and N are compile-time constants (model dimensions), so
  small K loops are fully unrolled (``UNROLL``): the weight loads of a program are independent and
  issued up front (memory-level parallelism without relying on the software pipeliner).
- M <= 2 (``BLOCK_M`` 1, 2) uses CUDA-core FMAs with ``BLOCK_N = 4`` (N = 1024 -> 256
  programs): the [BLOCK_N, BLOCK_K] weight tile is loaded once in its natural 16-byte-vector layout
  and reused for each row (``tl.static_range``); for M = 1 the products are accumulated elementwise
  and reduced over K once at the end, for M = 2 each row's partial dot products are reduced per
  chunk (intra-warp shuffles).
  M > 2 (``BLOCK_M = 16``, rows padded) uses ``tl.dot`` on [BLOCK_N=16, BLOCK_K] x [BLOCK_K, 16]
  tiles (4 warps): measured in the whole step, the FMA path with per-row reductions was
  compute-bound from M = 8 (twice the tensor-core path's time for bart-large).
- Programmatic dependent launch (``pdl=True``, Hopper+): a kernel is launched while its predecessor
  still runs; each program first issues the loads that do not depend on that predecessor, then
  ``griddepcontrol.wait``s, then lets its own successor launch and reads its inputs. Before the
  wait: ``fused_linear`` loads its weight slice (the first chunk into registers, at batch <= 2 the
  whole slice; the rest as L2 prefetches), the bias, the norm weights and, with
  ``residual_ready``, the residual with its pending norm; ``decode_attention`` loads ``pos``, its
  first tile of cached K/V rows and biases, and prefetches the later rows into L2. After the wait
  a kernel only reads its predecessor's output, computes and stores. Kernel ramp-up and DRAM
  latency overlap the previous kernel (bart-large batch 1: 0.569 -> 0.483 ms per step with the
  weights alone, 0.346 ms with everything above; a PDL kernel boundary itself costs < 0.9 us,
  ``benchmarks/chain_latency.py``).
- The norm prologue recomputes the row statistics in every program (x rows are <= 4096 elements and
  L2-resident), so no separate norm kernel and no stats buffer are needed. The same for the
  residual-norm epilogue ("post-LN done lazily": ``h = x + f(x)`` is stored un-normalised and each
  consumer normalises it on the fly).
- ``decode_attention`` runs one program per (batch, head) with an online softmax over key blocks of
  ``BLOCK_T``; in self-attention mode the loop bound ``pos + 1`` is read from a device tensor, so only
  the filled cache rows are read (no host sync, CUDA-graph friendly), and the new key/value row is
  written into the cache by the same kernel.
- No host synchronisation, no ``.item()``, no allocation except the output: everything is CUDA-graph
  capturable. Block sizes are picked by a small heuristic and can be overridden with ``config=``
  for tuning.

Triton interpreter note: under ``TRITON_INTERPRET=1`` (CPU tests) with NumPy 2.x, ``range()`` over a
runtime scalar fails, so the attention kernel then loops to the constexpr capacity (``LOOP_CAP``)
with the same masks; compiled on the GPU it loops to ``pos + 1`` (or T). The linear kernel has
compile-time loop bounds only.
"""
from __future__ import annotations

import torch

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # ImportError, or a broken install
    triton = None
    tl = None
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "fused_linear", "decode_attention", "row_topk", "linear_config", "attention_config",
           "ACTIVATIONS", "pdl_supported"]

# activation name -> constexpr code used by the kernels
ACTIVATIONS = {
    None: 0,
    "relu": 1,
    "gelu": 2,
    "gelu_new": 3,
    "gelu_pytorch_tanh": 3,
    "gelu_fast": 4,
    "silu": 5,
    "swish": 5,
    "tanh": 6,
}
_NORM_KINDS = {None: 0, "rms": 1, "layer": 2}


def _interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under TRITON_INTERPRET=1 (the choice is made at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


if HAVE_TRITON:

    # ------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _tanh(y):
        # 2*sigmoid(2y) - 1: exact limits at +-inf, absolute error ~1e-7 near 0
        return 2.0 / (1.0 + tl.exp(-2.0 * y)) - 1.0

    @triton.jit
    def _apply_act(y, ACT: tl.constexpr):
        if ACT == 1:  # relu
            y = tl.maximum(y, 0.0)
        elif ACT == 2:  # gelu (erf)
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        elif ACT == 3:  # gelu, tanh approximation: 0.5*y*(1+tanh(u)) == y*sigmoid(2u)
            u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
            y = y / (1.0 + tl.exp(-2.0 * u))
        elif ACT == 4:  # gelu_fast: same with the model's constants
            u = y * 0.7978845608 * (1.0 + 0.044715 * y * y)
            y = y / (1.0 + tl.exp(-2.0 * u))
        elif ACT == 5:  # silu
            y = y / (1.0 + tl.exp(-y))
        elif ACT == 6:  # tanh
            y = _tanh(y)
        return y

    @triton.jit
    def _row_stats(ptr, rows, row_mask, stride_row, eps,
                   L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                   KIND: tl.constexpr):
        """Mean and 1/std (fp32, [BLOCK_M]) of rows of length L. KIND 1: RMS (mean = 0), 2: layer."""
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        if KIND == 2:
            acc = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
            for s0 in tl.static_range(0, L, BLOCK_S):
                cols = s0 + tl.arange(0, BLOCK_S)
                m = row_mask[:, None] & (cols < L)[None, :]
                v = tl.load(ptr + rows[:, None] * stride_row + cols[None, :], mask=m, other=0.0)
                acc += v.to(tl.float32)
            mean = tl.sum(acc, axis=1) / L
        acc2 = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
        for s0 in tl.static_range(0, L, BLOCK_S):
            cols = s0 + tl.arange(0, BLOCK_S)
            m = row_mask[:, None] & (cols < L)[None, :]
            v = tl.load(ptr + rows[:, None] * stride_row + cols[None, :], mask=m, other=0.0)
            v = v.to(tl.float32)
            if KIND == 2:
                v = tl.where(m, v - mean[:, None], 0.0)
            acc2 += v * v
        var = tl.sum(acc2, axis=1) / L
        rstd = 1.0 / tl.sqrt(var + eps)
        return mean, rstd

    @triton.jit
    def _normalize(v, mean, rstd, nw, nb, nd, KIND: tl.constexpr, HAS_NB: tl.constexpr):
        """Apply the norm to a tile ``v`` (mean / rstd / nw / nb already broadcastable to it).

        Returns the tile in the norm weight's dtype ``nd``, rounded like ``Norm.forward``."""
        vf = v.to(tl.float32)
        if KIND == 1:
            y = (vf * rstd).to(nd)
            h = (nw.to(tl.float32) * y.to(tl.float32)).to(nd)
        else:
            y = (vf - mean) * rstd * nw.to(tl.float32)
            if HAS_NB:
                y = y + nb.to(tl.float32)
            h = y.to(nd)
        return h

    @triton.jit
    def _prefetch_l2(ptrs):
        """Ask L2 to fetch the lines holding ``ptrs`` (a hint: no registers, no ordering)."""
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _prefetch_bytes(base, nbytes, LINES: tl.constexpr):
        """L2 prefetch of the contiguous byte range [base, base + nbytes), LINES 128-byte lines at most
        (a power of two >= the range's line count; the offsets are clamped inside the range)."""
        offs = tl.minimum(tl.arange(0, LINES) * 128, nbytes - 1)
        _prefetch_l2(base.to(tl.pointer_type(tl.int8), bitcast=True) + offs)

    @triton.jit
    def _pdl_sync():
        """Programmatic dependent launch: block until the previous kernel has finished (its writes
        visible), then let the next kernel's programs start (they prefetch, then block here)."""
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _pick(v, i, BLOCK_M: tl.constexpr):
        """Element i (constexpr) of the [BLOCK_M] vector v, as a scalar."""
        return tl.sum(tl.where(tl.arange(0, BLOCK_M) == i, v, 0.0), axis=0)

    @triton.jit
    def _load_w_chunk(k0, w_ptr, cols, col_mask, N: tl.constexpr, K: tl.constexpr,
                      BLOCK_K: tl.constexpr, GATED: tl.constexpr):
        """The [BLOCK_N, BLOCK_K] weight tile of chunk k0 (and its gate half's; else w twice)."""
        ks = k0 + tl.arange(0, BLOCK_K)
        wm = col_mask[:, None] & (ks < K)[None, :]
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=wm, other=0.0)  # [BN, BK]
        wu = w
        if GATED:
            wu = tl.load(w_ptr + (cols + N)[:, None] * K + ks[None, :], mask=wm, other=0.0)
        return w, wu

    @triton.jit
    def _norm_pair(w_ptr, b_ptr, idx, mask, HAS_B: tl.constexpr):
        """A norm's weight and bias at ``idx`` (without a bias: the weight twice, unused)."""
        w = tl.load(w_ptr + idx, mask=mask, other=0.0)
        if HAS_B:
            b = tl.load(b_ptr + idx, mask=mask, other=0.0)
        else:
            b = w
        return w, b

    @triton.jit
    def _load_norm_w(k0, nw_ptr, nb_ptr, K: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
                     HAS_NB: tl.constexpr):
        """The norm weight (and bias) of chunk k0; without a norm, a placeholder."""
        ks = k0 + tl.arange(0, BLOCK_K)
        if NORM != 0:
            nw, nb = _norm_pair(nw_ptr, nb_ptr, ks, ks < K, HAS_NB)
        else:
            nw = tl.zeros([BLOCK_K], dtype=tl.float32)
            nb = nw
        return nw, nb

    @triton.jit
    def _vec_stats(v, vmask, eps, L: tl.constexpr, KIND: tl.constexpr):
        """``_row_stats`` of one row already in registers (v [BLOCK] holds the whole row)."""
        vf = v.to(tl.float32)
        mean = 0.0
        if KIND == 2:
            mean = tl.sum(vf, axis=0) / L
            vf = tl.where(vmask, vf - mean, 0.0)
        var = tl.sum(vf * vf, axis=0) / L
        return mean, 1.0 / tl.sqrt(var + eps)

    @triton.jit
    def _dot_acc(acc, a, b, W_FP32: tl.constexpr):
        """acc + a @ b with fp32 accumulation; fp32 weights in IEEE precision (no TF32)."""
        if W_FP32:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        return acc

    @triton.jit
    def _linear_chunk(k0, w, wu, nw, nb, acc, acc_u, acc3, acc3_u, x_ptr, w_ptr, nw_ptr, mean, rstd, eps,
                      row0, M, stride_xm,
                      N: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                      NORM: tl.constexpr, HAS_NB: tl.constexpr, GATED: tl.constexpr,
                      USE_DOT: tl.constexpr, W_FP32: tl.constexpr, ONE_PASS: tl.constexpr):
        """One BLOCK_K chunk with its weight tile(s) w / wu and norm weights nw / nb already loaded.
        Accumulators are [BLOCK_N, BLOCK_M] (column-major tile of the output); with BLOCK_M == 1 on
        the FMA path, the products are summed elementwise in acc3 [BLOCK_N, BLOCK_K] instead and
        reduced over K once after the loop. ONE_PASS (FMA path, the whole row in this one chunk):
        the norm statistics come from the row loaded here (mean / rstd are unused)."""
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        wdt = w_ptr.dtype.element_ty
        if USE_DOT:
            rows = row0 + tl.arange(0, BLOCK_M)
            xm = (rows < M)[:, None] & kmask[None, :]
            xv = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=xm, other=0.0)
            if NORM != 0:
                xv = _normalize(xv, mean[:, None], rstd[:, None], nw[None, :], nb[None, :],
                                nw_ptr.dtype.element_ty, NORM, HAS_NB)
            a_t = tl.trans(xv.to(wdt))  # [BK, BM], the matmul input in the weight dtype
            acc = _dot_acc(acc, w, a_t, W_FP32)
            if GATED:
                acc_u = _dot_acc(acc_u, wu, a_t, W_FP32)
        else:
            wf = w.to(tl.float32)
            if GATED:
                wuf = wu.to(tl.float32)
            for mi in tl.static_range(BLOCK_M):
                row = row0 + mi
                xv = tl.load(x_ptr + row * stride_xm + ks, mask=kmask & (row < M), other=0.0)
                if NORM != 0:
                    if ONE_PASS:
                        mu, rs = _vec_stats(xv, kmask, eps, K, NORM)
                    else:
                        mu = _pick(mean, mi, BLOCK_M)
                        rs = _pick(rstd, mi, BLOCK_M)
                    xv = _normalize(xv, mu, rs, nw, nb, nw_ptr.dtype.element_ty, NORM, HAS_NB)
                a = xv.to(wdt).to(tl.float32)[None, :]  # the matmul input in the weight dtype
                if BLOCK_M == 1:
                    acc3 += wf * a
                    if GATED:
                        acc3_u += wuf * a
                else:
                    sel = (tl.arange(0, BLOCK_M) == mi)[None, :]
                    acc = tl.where(sel, acc + tl.sum(wf * a, axis=1)[:, None], acc)
                    if GATED:
                        acc_u = tl.where(sel, acc_u + tl.sum(wuf * a, axis=1)[:, None], acc_u)
        return acc, acc_u, acc3, acc3_u

    # ------------------------------------------------------------------------------------------
    # kernel 1: fused linear
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _load_residual(res_ptr, rw_ptr, rb_ptr, rows, row_mask, cols, col_mask, stride_rm, res_eps,
                       N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SN: tl.constexpr,
                       RES_NORM: tl.constexpr, HAS_RB: tl.constexpr):
        """The [BLOCK_N, BLOCK_M] residual tile in fp32, normalised first when RES_NORM."""
        om = col_mask[:, None] & row_mask[None, :]
        r = tl.load(res_ptr + rows[None, :] * stride_rm + cols[:, None], mask=om, other=0.0)
        if RES_NORM != 0:
            r_mean, r_rstd = _row_stats(res_ptr, rows, row_mask, stride_rm, res_eps, N, BLOCK_M,
                                        BLOCK_SN, RES_NORM)
            rw, rb = _norm_pair(rw_ptr, rb_ptr, cols, col_mask, HAS_RB)
            r = _normalize(r, r_mean[None, :], r_rstd[None, :], rw[:, None], rb[:, None],
                           rw_ptr.dtype.element_ty, RES_NORM, HAS_RB)
        return r.to(tl.float32)

    @triton.jit
    def _fused_linear_kernel(
        x_ptr, w_ptr, b_ptr, nw_ptr, nb_ptr, res_ptr, rw_ptr, rb_ptr, out_ptr,
        M, stride_xm, stride_rm, stride_om, eps, res_eps,
        N: tl.constexpr, K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_SK: tl.constexpr, BLOCK_SN: tl.constexpr,
        NORM: tl.constexpr, HAS_NB: tl.constexpr, HAS_BIAS: tl.constexpr,
        ACT: tl.constexpr, GATED: tl.constexpr,
        HAS_RES: tl.constexpr, RES_NORM: tl.constexpr, HAS_RB: tl.constexpr, RES_EARLY: tl.constexpr,
        USE_DOT: tl.constexpr, W_FP32: tl.constexpr, UNROLL: tl.constexpr,
        PDL: tl.constexpr, W_BYTES: tl.constexpr, PF_LINES: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        row0 = pid_m * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        # FMA path with the whole row in one chunk: norm statistics from that chunk's x
        ONE_PASS: tl.constexpr = (NORM != 0) and (not USE_DOT) and (BLOCK_K >= K)

        # Loads that do not depend on the previous kernel are issued first: the weights (chunk 0 into
        # registers; with PDL the rest of this program's rows into L2), the norm weights of chunk 0,
        # the bias and, with RES_EARLY, the residual (with its norm). With PDL all of them are in
        # flight before the wait for the previous kernel.
        if PDL:
            if pid_m == 0:
                n_rows = tl.minimum(N - pid_n * BLOCK_N, BLOCK_N)
                _prefetch_bytes(w_ptr + pid_n * BLOCK_N * K, n_rows * K * W_BYTES, PF_LINES)
                if GATED:
                    _prefetch_bytes(w_ptr + (N + pid_n * BLOCK_N) * K, n_rows * K * W_BYTES, PF_LINES)
        w0, wu0 = _load_w_chunk(0, w_ptr, cols, col_mask, N, K, BLOCK_K, GATED)
        nw0, nb0 = _load_norm_w(0, nw_ptr, nb_ptr, K, BLOCK_K, NORM, HAS_NB)
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            bias_u = bias
            if GATED:
                bias_u = tl.load(b_ptr + N + cols, mask=col_mask, other=0.0).to(tl.float32)
        if HAS_RES and RES_EARLY:
            r = _load_residual(res_ptr, rw_ptr, rb_ptr, rows, row_mask, cols, col_mask, stride_rm, res_eps,
                               N, BLOCK_M, BLOCK_SN, RES_NORM, HAS_RB)
        if PDL:
            _pdl_sync()

        # prologue: per-row norm statistics of x (each program recomputes them; rows are tiny)
        if NORM != 0 and not ONE_PASS:
            mean, rstd = _row_stats(x_ptr, rows, row_mask, stride_xm, eps, K, BLOCK_M, BLOCK_SK, NORM)
        else:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
            rstd = mean

        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        E3: tl.constexpr = BLOCK_K if (BLOCK_M == 1 and not USE_DOT) else 1
        acc3 = tl.zeros([BLOCK_N, E3], dtype=tl.float32)
        acc3_u = tl.zeros([BLOCK_N, E3], dtype=tl.float32)
        acc, acc_u, acc3, acc3_u = _linear_chunk(
            0, w0, wu0, nw0, nb0, acc, acc_u, acc3, acc3_u, x_ptr, w_ptr, nw_ptr, mean, rstd, eps,
            row0, M, stride_xm, N, K, BLOCK_M, BLOCK_K, NORM, HAS_NB, GATED, USE_DOT, W_FP32, ONE_PASS)
        if UNROLL:
            for k0 in tl.static_range(BLOCK_K, K, BLOCK_K):
                w, wu = _load_w_chunk(k0, w_ptr, cols, col_mask, N, K, BLOCK_K, GATED)
                nw, nb = _load_norm_w(k0, nw_ptr, nb_ptr, K, BLOCK_K, NORM, HAS_NB)
                acc, acc_u, acc3, acc3_u = _linear_chunk(
                    k0, w, wu, nw, nb, acc, acc_u, acc3, acc3_u, x_ptr, w_ptr, nw_ptr, mean, rstd, eps,
                    row0, M, stride_xm, N, K, BLOCK_M, BLOCK_K, NORM, HAS_NB, GATED, USE_DOT, W_FP32, ONE_PASS)
        else:
            for k0 in range(BLOCK_K, K, BLOCK_K):
                w, wu = _load_w_chunk(k0, w_ptr, cols, col_mask, N, K, BLOCK_K, GATED)
                nw, nb = _load_norm_w(k0, nw_ptr, nb_ptr, K, BLOCK_K, NORM, HAS_NB)
                acc, acc_u, acc3, acc3_u = _linear_chunk(
                    k0, w, wu, nw, nb, acc, acc_u, acc3, acc3_u, x_ptr, w_ptr, nw_ptr, mean, rstd, eps,
                    row0, M, stride_xm, N, K, BLOCK_M, BLOCK_K, NORM, HAS_NB, GATED, USE_DOT, W_FP32, ONE_PASS)
        if E3 > 1:
            acc += tl.sum(acc3, axis=1)[:, None]
            if GATED:
                acc_u += tl.sum(acc3_u, axis=1)[:, None]

        # epilogue, all fp32, on the [BLOCK_N, BLOCK_M] tile
        if HAS_BIAS:
            acc += bias[:, None]
            if GATED:
                acc_u += bias_u[:, None]
        y = _apply_act(acc, ACT)
        if GATED:
            y = y * acc_u
        om = col_mask[:, None] & row_mask[None, :]
        if HAS_RES:
            if not RES_EARLY:
                r = _load_residual(res_ptr, rw_ptr, rb_ptr, rows, row_mask, cols, col_mask, stride_rm,
                                   res_eps, N, BLOCK_M, BLOCK_SN, RES_NORM, HAS_RB)
            y = r + y
        tl.store(out_ptr + rows[None, :] * stride_om + cols[:, None],
                 y.to(out_ptr.dtype.element_ty), mask=om)

    # ------------------------------------------------------------------------------------------
    # kernel 1b: fused linear for many rows (M > 16): tiles, split-K, producer-written norm stats
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _partial_stats(st_ptr, rows, row_mask, eps, L: tl.constexpr, NT: tl.constexpr, TILE: tl.constexpr,
                       BLOCK_NT: tl.constexpr, BLOCK_M: tl.constexpr, KIND: tl.constexpr):
        """Mean and 1/std (fp32, [BLOCK_M]) of rows of length L from the partial statistics a producer
        wrote (``STATS_OUT``): st [M, NT, 2] fp32, per row and tile of TILE columns the sum and the sum
        of squared deviations from the tile's mean, merged here (Chan et al.; fixed order)."""
        t = tl.arange(0, BLOCK_NT)
        tm = t < NT
        m = row_mask[:, None] & tm[None, :]
        base = st_ptr + rows[:, None] * (2 * NT) + 2 * t[None, :]
        s = tl.load(base, mask=m, other=0.0)
        q = tl.load(base + 1, mask=m, other=0.0)
        c = tl.where(tm, tl.minimum(L - t * TILE, TILE), 1).to(tl.float32)[None, :]
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        if KIND == 2:
            mean = tl.sum(s, axis=1) / L
            d = s / c - mean[:, None]
            var = tl.sum(q + tl.where(m, c * d * d, 0.0), axis=1) / L
        else:  # RMS: the mean of squares, sum over tiles of M2 + sum^2 / count
            var = tl.sum(q + s * s / c, axis=1) / L
        rstd = 1.0 / tl.sqrt(var + eps)
        return mean, rstd

    @triton.jit
    def _gemm_epilogue(acc, acc_u, pid_n, rows, row_mask, cols, col_mask,
                       b_ptr, res_ptr, rw_ptr, rb_ptr, rs_ptr, out_ptr, so_ptr,
                       stride_rm, stride_om, res_eps,
                       N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
                       HAS_RES: tl.constexpr, RES_NORM: tl.constexpr, HAS_RB: tl.constexpr,
                       R_NT: tl.constexpr, R_TILE: tl.constexpr, BLOCK_RNT: tl.constexpr, BLOCK_SN: tl.constexpr,
                       STATS_OUT: tl.constexpr, NT_OUT: tl.constexpr):
        """Bias, activation / gating, the (normalised) residual, the store and, with STATS_OUT, this
        tile's partial row statistics of the stored (rounded) output, on the [BLOCK_M, BLOCK_N] fp32
        accumulator."""
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_u += tl.load(b_ptr + N + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        y = _apply_act(acc, ACT)
        if GATED:
            y = y * acc_u
        om = row_mask[:, None] & col_mask[None, :]
        if HAS_RES:
            r = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=om, other=0.0)
            if RES_NORM != 0:
                if R_NT > 0:
                    r_mean, r_rstd = _partial_stats(rs_ptr, rows, row_mask, res_eps, N, R_NT, R_TILE, BLOCK_RNT,
                                                    BLOCK_M, RES_NORM)
                else:
                    r_mean, r_rstd = _row_stats(res_ptr, rows, row_mask, stride_rm, res_eps, N, BLOCK_M,
                                                BLOCK_SN, RES_NORM)
                rw, rb = _norm_pair(rw_ptr, rb_ptr, cols, col_mask, HAS_RB)
                r = _normalize(r, r_mean[:, None], r_rstd[:, None], rw[None, :], rb[None, :],
                               rw_ptr.dtype.element_ty, RES_NORM, HAS_RB)
            y = r.to(tl.float32) + y
        yo = y.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], yo, mask=om)
        if STATS_OUT:
            yf = tl.where(om, yo.to(tl.float32), 0.0)
            cnt = tl.minimum(N - pid_n * BLOCK_N, BLOCK_N).to(tl.float32)
            s = tl.sum(yf, axis=1)
            dev = tl.where(om, yf - (s / cnt)[:, None], 0.0)
            m2 = tl.sum(dev * dev, axis=1)
            sp = so_ptr + rows * (2 * NT_OUT) + 2 * pid_n
            tl.store(sp, s, mask=row_mask)
            tl.store(sp + 1, m2, mask=row_mask)

    @triton.jit
    def _gemm_kernel(
        x_ptr, w_ptr, w_desc, b_ptr, nw_ptr, nb_ptr, xs_ptr, res_ptr, rw_ptr, rb_ptr, rs_ptr,
        out_ptr, so_ptr, ws_ptr, cnt_ptr,
        M, stride_xm, stride_rm, stride_om, eps, res_eps,
        N: tl.constexpr, K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr, K_SPLIT: tl.constexpr,
        NORM: tl.constexpr, HAS_NB: tl.constexpr,
        X_NT: tl.constexpr, X_TILE: tl.constexpr, BLOCK_XNT: tl.constexpr, BLOCK_SK: tl.constexpr,
        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
        HAS_RES: tl.constexpr, RES_NORM: tl.constexpr, HAS_RB: tl.constexpr,
        R_NT: tl.constexpr, R_TILE: tl.constexpr, BLOCK_RNT: tl.constexpr, BLOCK_SN: tl.constexpr,
        STATS_OUT: tl.constexpr, W_FP32: tl.constexpr, W_TMA: tl.constexpr,
        PDL: tl.constexpr, W_BYTES: tl.constexpr, PF_ROW_LINES: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        k_lo = pid_k * K_SPLIT
        if PDL:
            # this program's weight slice (BLOCK_N rows x K_SPLIT columns) into L2 while the previous
            # kernel finishes (one M tile does it; the others read it from L2)
            if pid_m == 0:
                j = tl.minimum(k_lo + tl.arange(0, PF_ROW_LINES) * (128 // W_BYTES), K - 1)
                cc = tl.minimum(cols, N - 1)
                _prefetch_l2(w_ptr + cc[:, None] * K + j[None, :])
                if GATED:
                    _prefetch_l2(w_ptr + (cc + N)[:, None] * K + j[None, :])
            _pdl_sync()
        if NORM != 0:
            if X_NT > 0:
                mean, rstd = _partial_stats(xs_ptr, rows, row_mask, eps, K, X_NT, X_TILE, BLOCK_XNT, BLOCK_M, NORM)
            else:
                mean, rstd = _row_stats(x_ptr, rows, row_mask, stride_xm, eps, K, BLOCK_M, BLOCK_SK, NORM)
        wdt = w_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kk in range(0, K_SPLIT, BLOCK_K):  # compile-time bounds: software-pipelined (num_stages)
            ks = k_lo + kk + tl.arange(0, BLOCK_K)
            kmask = ks < K
            a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_mask[:, None] & kmask[None, :],
                        other=0.0)
            if NORM != 0:
                nw, nb = _norm_pair(nw_ptr, nb_ptr, ks, kmask, HAS_NB)
                a = _normalize(a, mean[:, None], rstd[:, None], nw[None, :], nb[None, :],
                               nw_ptr.dtype.element_ty, NORM, HAS_NB)
            a = a.to(wdt)
            wm = col_mask[:, None] & kmask[None, :]
            if W_TMA:  # the weight tile by the tensor-memory accelerator (out-of-range K: zeros)
                w = w_desc.load([pid_n * BLOCK_N, k_lo + kk])
            else:
                w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=wm, other=0.0)
            acc = _dot_acc(acc, a, tl.trans(w), W_FP32)
            if GATED:
                # (with TMA, a first-half tile's rows past N read gate rows: their columns are masked)
                if W_TMA:
                    wu = w_desc.load([N + pid_n * BLOCK_N, k_lo + kk])
                else:
                    wu = tl.load(w_ptr + (cols + N)[:, None] * K + ks[None, :], mask=wm, other=0.0)
                acc_u = _dot_acc(acc_u, a, tl.trans(wu), W_FP32)
        NT_OUT: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        if SPLIT > 1:
            # split-K: every split stores its fp32 partial; the last of a tile's splits to arrive (a
            # per-tile counter) sums them in split order (deterministic), runs the epilogue and
            # resets the counter for the next call
            NTOT: tl.constexpr = 2 * N if GATED else N
            om = row_mask[:, None] & col_mask[None, :]
            wp = ws_ptr + rows[:, None] * NTOT + cols[None, :]
            tl.store(wp + pid_k * M * NTOT, acc, mask=om)
            if GATED:
                tl.store(wp + pid_k * M * NTOT + N, acc_u, mask=om)
            tl.debug_barrier()  # every thread's partial is stored before the counter moves
            tile = pid_m * NT_OUT + pid_n
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT - 1:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for sk in tl.static_range(SPLIT):
                    acc += tl.load(wp + sk * M * NTOT, mask=om, other=0.0, cache_modifier=".cg")
                    if GATED:
                        acc_u += tl.load(wp + sk * M * NTOT + N, mask=om, other=0.0, cache_modifier=".cg")
                tl.store(cnt_ptr + tile, 0)
                _gemm_epilogue(acc, acc_u, pid_n, rows, row_mask, cols, col_mask,
                               b_ptr, res_ptr, rw_ptr, rb_ptr, rs_ptr, out_ptr, so_ptr, stride_rm, stride_om, res_eps,
                               N, BLOCK_M, BLOCK_N, HAS_BIAS, ACT, GATED, HAS_RES, RES_NORM, HAS_RB,
                               R_NT, R_TILE, BLOCK_RNT, BLOCK_SN, STATS_OUT, NT_OUT)
        else:
            _gemm_epilogue(acc, acc_u, pid_n, rows, row_mask, cols, col_mask,
                           b_ptr, res_ptr, rw_ptr, rb_ptr, rs_ptr, out_ptr, so_ptr, stride_rm, stride_om, res_eps,
                           N, BLOCK_M, BLOCK_N, HAS_BIAS, ACT, GATED, HAS_RES, RES_NORM, HAS_RB,
                           R_NT, R_TILE, BLOCK_RNT, BLOCK_SN, STATS_OUT, NT_OUT)

    # ------------------------------------------------------------------------------------------
    # kernel 2: decode attention (one query per (batch, head))
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, kn_ptr, vn_ptr, bt_ptr, kb_ptr, ri_ptr,
        scale, H, T, G,
        s_qb, s_qh, s_qd,
        s_kb, s_kh, s_kt, s_kd,
        s_vb, s_vh, s_vt, s_vd,
        s_ob, s_oh, s_od,
        s_knb, s_knh, s_knd,
        s_vnb, s_vnh, s_vnd,
        s_bth, s_btq, s_btt,
        s_kbb, s_kbt,
        s_rib, s_rit,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
        SELF: tl.constexpr, HAS_BT: tl.constexpr, HAS_KB: tl.constexpr, HAS_RI: tl.constexpr,
        LOOP_CAP: tl.constexpr,
        PDL: tl.constexpr, ROW_LINES: tl.constexpr, LINE_ELEMS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        k_head = k_ptr + h * s_kh
        v_head = v_ptr + h * s_vh
        # the cache row (and key-bias row) of query row b: its own, or with G > 1 (cross-attention
        # shared by a request's G beams / samples) row b // G
        bk = b // G
        k_base = k_head + bk * s_kb
        v_base = v_head + bk * s_vb
        if SELF:
            pos = tl.load(pos_ptr)  # with PDL: the caller guarantees the previous kernel leaves it alone
            n = pos + 1
        else:
            pos = T
            n = T
        # Key tile 0 (the cached K/V rows and the biases of keys 0..BLOCK_T-1) does not depend on the
        # previous kernel: loaded first, with PDL before the wait. Self-attention: row `pos` is the
        # new row, taken from registers below, so the kernel never reads its own write.
        kt0, vt0, bt0, kb0 = _attn_load_tile(0, k_head, v_head, bt_ptr, kb_ptr, ri_ptr, bk, h, pos, n, d, dmask,
                                             s_kb, s_kt, s_kd, s_vb, s_vt, s_vd,
                                             s_bth, s_btq, s_btt, s_kbb, s_kbt, s_rib, s_rit,
                                             BLOCK_T, SELF, HAS_BT, HAS_KB, HAS_RI)
        if PDL:
            # L2 prefetch of the cached rows after tile 0 (up to pos-1, or T-1; not through a row
            # index), then wait for the previous kernel (which produced q and the new K/V row)
            if not HAS_RI:
                j = tl.minimum(tl.arange(0, ROW_LINES) * LINE_ELEMS, D - 1)
                for t0 in range(BLOCK_T, pos, 64):
                    t = t0 + tl.arange(0, 64)
                    t = tl.minimum(t, pos - 1)
                    _prefetch_l2(k_base + t[:, None] * s_kt + j[None, :] * s_kd)
                    _prefetch_l2(v_base + t[:, None] * s_vt + j[None, :] * s_vd)
            _pdl_sync()
        q = tl.load(q_ptr + b * s_qb + h * s_qh + d * s_qd, mask=dmask, other=0.0).to(tl.float32)

        if SELF:
            kn = tl.load(kn_ptr + b * s_knb + h * s_knh + d * s_knd, mask=dmask, other=0.0)
            vn = tl.load(vn_ptr + b * s_vnb + h * s_vnh + d * s_vnd, mask=dmask, other=0.0)
            kn = kn.to(k_ptr.dtype.element_ty)
            vn = vn.to(v_ptr.dtype.element_ty)
            tl.store(k_base + pos * s_kt + d * s_kd, kn, mask=dmask)
            tl.store(v_base + pos * s_vt + d * s_vd, vn, mask=dmask)
            knf = kn.to(tl.float32)
            vnf = vn.to(tl.float32)
        else:
            knf = q
            vnf = q

        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        m_i, l_i, acc = _attn_update(0, kt0, vt0, bt0, kb0, q, knf, vnf, pos, n, scale, m_i, l_i, acc,
                                     BLOCK_T, SELF)
        # GPU (LOOP_CAP == 0): loop to n = pos + 1 (or T), i.e. only the filled rows. Interpreter:
        # to the constexpr capacity with the same masks (range() over a runtime scalar fails there;
        # the bound is written inline because the interpreter turns every assignment into a tensor).
        for t0 in range(BLOCK_T, LOOP_CAP if LOOP_CAP > 0 else n, BLOCK_T):
            kt, vt, bt, kb = _attn_load_tile(t0, k_head, v_head, bt_ptr, kb_ptr, ri_ptr, bk, h, pos, n, d, dmask,
                                             s_kb, s_kt, s_kd, s_vb, s_vt, s_vd,
                                             s_bth, s_btq, s_btt, s_kbb, s_kbt, s_rib, s_rit,
                                             BLOCK_T, SELF, HAS_BT, HAS_KB, HAS_RI)
            m_i, l_i, acc = _attn_update(t0, kt, vt, bt, kb, q, knf, vnf, pos, n, scale, m_i, l_i, acc,
                                         BLOCK_T, SELF)
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        o = acc / l_safe
        tl.store(o_ptr + b * s_ob + h * s_oh + d * s_od, o.to(o_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def _attn_load_tile(t0, k_head, v_head, bt_ptr, kb_ptr, ri_ptr, b, h, pos, n, d, dmask,
                        s_kb, s_kt, s_kd, s_vb, s_vt, s_vd,
                        s_bth, s_btq, s_btt, s_kbb, s_kbt, s_rib, s_rit,
                        BLOCK_T: tl.constexpr, SELF: tl.constexpr, HAS_BT: tl.constexpr,
                        HAS_KB: tl.constexpr, HAS_RI: tl.constexpr):
        """Keys t0..t0+BLOCK_T-1: the cached K and V rows of head h (``k_head`` / ``v_head``: the
        caches offset to head h; self-attention: positions < pos only; zeros elsewhere) in the cache
        dtype, and the fp32 bias-table row / key bias (zeros without). The cache row is b, or with
        HAS_RI (cache indirection, beam search) ``row_index[b, t]`` for position t."""
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < n
        if SELF:
            ldmask = t < pos
        else:
            ldmask = tmask
        m2 = ldmask[:, None] & dmask[None, :]
        if HAS_RI:
            row = tl.load(ri_ptr + b * s_rib + t * s_rit, mask=ldmask, other=0).to(tl.int64)[:, None]
        else:
            row = b
        kt = tl.load(k_head + row * s_kb + t[:, None] * s_kt + d[None, :] * s_kd, mask=m2, other=0.0)
        vt = tl.load(v_head + row * s_vb + t[:, None] * s_vt + d[None, :] * s_vd, mask=m2, other=0.0)
        bt = tl.zeros([BLOCK_T], dtype=tl.float32)
        kb = bt
        if HAS_BT:
            bt = tl.load(bt_ptr + h * s_bth + pos * s_btq + t * s_btt, mask=tmask, other=0.0).to(tl.float32)
        if HAS_KB:
            kb = tl.load(kb_ptr + b * s_kbb + t * s_kbt, mask=tmask, other=0.0).to(tl.float32)
        return kt, vt, bt, kb

    @triton.jit
    def _attn_update(t0, kt, vt, bt, kb, q, knf, vnf, pos, n, scale, m_i, l_i, acc,
                     BLOCK_T: tl.constexpr, SELF: tl.constexpr):
        """Online-softmax step over one key tile (loaded by ``_attn_load_tile``)."""
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < n
        kt = kt.to(tl.float32)
        if SELF:
            kt = tl.where((t == pos)[:, None], knf[None, :], kt)
        s = tl.sum(kt * q[None, :], axis=1) * scale
        s += bt
        s += kb
        s = tl.where(tmask, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        vt = vt.to(tl.float32)
        if SELF:
            vt = tl.where((t == pos)[:, None], vnf[None, :], vt)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        return m_new, l_i, acc


    # ------------------------------------------------------------------------------------------
    # kernel 3: top-k of each row (beam search's candidates), in two stages
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _topk_select(v, idx, out_v_ptr, out_i_ptr, K: tl.constexpr):
        """Store the K largest of v (fp32) with their idx, in (value descending, index ascending)
        order: K rounds of max, then the smallest index holding it, which leaves the candidates."""
        alive = idx == idx
        for r in tl.static_range(K):
            m = tl.max(tl.where(alive, v, -float("inf")), axis=0)
            pick = tl.min(tl.where(alive & (v == m), idx, 2147483647), axis=0)
            tl.store(out_v_ptr + r, m.to(out_v_ptr.dtype.element_ty))
            tl.store(out_i_ptr + r, pick.to(out_i_ptr.dtype.element_ty))
            alive = alive & (idx != pick)

    @triton.jit
    def _topk_chunk_kernel(x_ptr, cv_ptr, ci_ptr, N, stride_x, C, K: tl.constexpr, CH: tl.constexpr):
        """Stage 1: the top K of chunk c (CH columns) of row r -> candidates [R, C, K]. Columns past
        N are -inf with indices >= N, so they rank after every real column."""
        r = tl.program_id(0)
        c = tl.program_id(1)
        offs = c * CH + tl.arange(0, CH)
        v = tl.load(x_ptr + r.to(tl.int64) * stride_x + offs, mask=offs < N, other=-float("inf")).to(tl.float32)
        base = (r * C + c) * K
        _topk_select(v, offs, cv_ptr + base, ci_ptr + base, K)

    @triton.jit
    def _topk_merge_kernel(cv_ptr, ci_ptr, ov_ptr, oi_ptr, M, K: tl.constexpr, BLOCK: tl.constexpr):
        """Stage 2: the top K of row r's M = C * K candidates, in the same order."""
        r = tl.program_id(0)
        j = tl.arange(0, BLOCK)
        m = j < M
        v = tl.load(cv_ptr + r * M + j, mask=m, other=-float("inf"))
        idx = tl.load(ci_ptr + r * M + j, mask=m, other=2147483647)
        _topk_select(v, idx, ov_ptr + r * K, oi_ptr + r * K, K)


# ----------------------------------------------------------------------------------------------
# Python wrappers
# ----------------------------------------------------------------------------------------------


# decided once at import (a plain bool: torch.compile can trace the wrappers, it cannot ask type())
_ATTN_INTERPRETED = HAVE_TRITON and _interpreted(_decode_attention_kernel)
_LINEAR_INTERPRETED = HAVE_TRITON and _interpreted(_fused_linear_kernel)


def pdl_supported(device) -> bool:
    """Whether the kernels can use programmatic dependent launch on ``device``: compiled (not the
    interpreter) on a Hopper or newer GPU, unless ``ENCDEC_PDL=0``."""
    import os

    device = torch.device(device)
    if not HAVE_TRITON or _LINEAR_INTERPRETED or device.type != "cuda" or os.environ.get("ENCDEC_PDL") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _launch_options(cfg: dict, pdl: bool) -> dict:
    """Launch keywords of a kernel: its warps (and pipeline stages when the config sets them), and
    programmatic dependent launch when ``pdl``."""
    launch = {"num_warps": cfg["num_warps"]}
    if "num_stages" in cfg:
        launch["num_stages"] = cfg["num_stages"]
    if pdl:
        launch["launch_pdl"] = True
    return launch


def _require_triton():
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed: the fused Triton kernels are unavailable")


def linear_config(M: int, N: int, K: int, gated: bool = False, weight_bytes: int = 2,
                  pdl: bool = False) -> dict:
    """Default block sizes for ``fused_linear`` (N: output columns per half when gated;
    weight_bytes: bytes per weight element; pdl: launched with programmatic dependent launch).

    Measured in the whole decoder step on an H100 (bf16, ``benchmarks/sweep_step.py``,
    docs/performance.md):

    - M <= 2: CUDA-core FMAs, ``BLOCK_N = 4`` rows of the weight per program (N = 1024 -> 256
      programs). With PDL and half weights the program's whole [4, K] slice is one chunk
      (``BLOCK_K`` = next power of two of K), loaded into registers before the kernel waits for its
      predecessor, with enough warps that a thread holds at most 64 weight elements (bart-large
      batch 1: 0.517 -> 0.484 ms per step). Otherwise ``BLOCK_K`` 512 with 4 warps for N <= 1024
      (K <= 1024) and the lm_head, 1 warp for N in [2048, 8192] or K > 1024 (``tune_triton.py``),
      and one warp's worth of 16-byte loads for fp32 weights.
    - 2 < M <= 16: the tensor-core path, rows padded to ``BLOCK_M = 16``, ``BLOCK_N = 16``,
      ``BLOCK_K = 256``, 4 warps. The FMA path re-reduces every row per chunk and is compute-bound
      there: bart-large batch 8 took 1.95 ms per step with it and 0.98 ms with this one (the
      inductor-compiled step: 0.97 ms).
    - M > 16 (``BIG``: the tiled kernel ``_gemm_kernel``; the runner uses it only where
      ``fused_max_batch`` is raised above 16): ``BLOCK_M`` up to 64 rows x ``BLOCK_N = 64`` tiles, a
      software-pipelined (3 stages) loop of 128-wide K chunks, 4 warps, and split-K (``SPLIT_K``, a
      power of two) until there are about 256 programs with at least 128 columns of K per split
      (bart-large batch 64: QKV 4, out-proj 8, FFN-in 4, FFN-out 8). The splits' fp32 partials are
      summed in split order by the tile's last program (deterministic). Norm statistics come from
      the producer (``norm_stats`` / ``residual_stats``) where the caller passes them, instead of
      each program recomputing them. bart-large's Triton step on an H200 (``sweep_step.py``,
      2026-11-30): batch 32 / 64 / 256 0.949 / 1.303 / 2.520 ms per step (64-wide K chunks: 1.000 /
      1.430 / 3.129; no split-K: 1.196 / 1.510 / 2.950; the tiled kernel before split-K and
      statistics: 1.017 / 1.394 / 2.543). Still behind the compiled step's cuBLAS GEMMs
      (0.71 / 0.82 / 1.36 ms): the GEMMs take ~10-16 us each in the profile against cuBLAS's ~5,
      and the lm_head 97 us, so the runner keeps batches above 16 on the compiled step. Alone
      (``tune_triton.py --big --rotate 8``, batch 64): out-proj 5.6-6.9 us against cuBLAS's 3.7,
      FFN-out 9.5-10.3 against 8.4; the lm_head (N >= 16384) takes 128-column tiles and 8 warps
      (47.6 us against 74.7 with 64 x 4; cuBLAS on the unpadded 50265 rows: 135.7).
      ``W_TMA`` (config only): the weight tiles through a tensor descriptor (Hopper's
      tensor-memory accelerator) instead of masked pointer loads; in the bart-large step on an
      H200 it changed nothing at batch 64 (1.293 against 1.286 ms) and took 2 % off at 256.
    - UNROLL: K loop unrolled (all weight loads of a program independent) when it has at most 8
      chunks (M <= 2) or 4 chunks (M > 2); otherwise a rolled loop (software-pipelined with
      num_stages on the dot path).
    - BLOCK_SK / BLOCK_SN: chunk of the norm-statistics loops over K / N, sized so the
      [BLOCK_M, BLOCK_S] tile is about 32 registers per thread (BLOCK_M*BLOCK_S <= 1024*num_warps).
    """
    if M > 16:
        block_m = min(64, _next_pow2(M))
        wide = N >= 16384  # the lm_head: 128-column tiles, 8 warps
        cfg = dict(BLOCK_M=block_m, BLOCK_N=128 if wide else 64, BLOCK_K=min(128, max(16, _next_pow2(K))),
                   USE_DOT=True, num_warps=8 if wide else 4, num_stages=3, BIG=True)
        cfg["SPLIT_K"] = split_k_default(M, N, K, block_m, cfg["BLOCK_N"], cfg["BLOCK_K"])
    elif M > 2:
        block_m = 16
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=min(256, max(16, _next_pow2(K))), USE_DOT=True,
                   num_warps=4)
    else:
        block_m = _next_pow2(M)
        num_warps = 1
        block_n = 4
        block_k = 32 * max(1, 16 // weight_bytes)  # one warp's 16-byte loads
        if weight_bytes == 2:
            block_k = 512
            num_warps = 1 if (K > 1024 or 2048 <= N <= 8192) else 4
            if pdl:
                block_k = _next_pow2(K)
                num_warps = slice_warps(block_n, block_k, gated, num_warps)
        cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(block_k, max(16, _next_pow2(K))), USE_DOT=False,
                   num_warps=num_warps)
    cfg["UNROLL"] = M <= 16 and _cdiv(K, cfg["BLOCK_K"]) <= _max_unroll(block_m)
    _stats_blocks(cfg, N, K)
    return cfg


def split_k_default(M: int, N: int, K: int, block_m: int, block_n: int, block_k: int,
                    target: int = 256, min_chunk: int = 128, max_split: int = 8) -> int:
    """Split-K factor of the tiled kernel: the largest power of two (at most ``max_split``) that keeps
    the programs at or below about ``target`` and every split at least ``min_chunk`` (and one
    BLOCK_K) wide."""
    tiles = _cdiv(N, block_n) * _cdiv(M, block_m)
    split = 1
    while (split * 2 <= max_split and tiles * split * 2 <= target
           and K // (split * 2) >= max(min_chunk, block_k)):
        split *= 2
    return split


def slice_warps(block_n: int, block_k: int, gated: bool, min_warps: int, per_thread: int = 64) -> int:
    """Warps (at least ``min_warps``, at most 8) for a program that holds its [block_n, block_k]
    weight tile (two with ``gated``) in registers, at most ``per_thread`` elements per thread."""
    elems = block_n * block_k * (2 if gated else 1)
    return min(8, max(min_warps, _next_pow2(_cdiv(elems, 32 * per_thread))))


def _max_unroll(block_m: int) -> int:
    # more unrolled chunks hoist more weight loads into registers: 8 chunks at M <= 2 (K = 4096
    # half), 4 on the dot path
    return 8 if block_m <= 2 else 4


def _stats_blocks(cfg: dict, N: int, K: int) -> None:
    budget = max(16, 1024 * cfg["num_warps"] // cfg["BLOCK_M"])
    cfg["BLOCK_SK"] = min(_next_pow2(K), budget)
    cfg["BLOCK_SN"] = min(_next_pow2(N), budget)


def _parse_norm(norm, length: int, what: str):
    if norm is None:
        return 0, None, None, 0.0
    kind, w, b, eps = norm
    if kind not in ("rms", "layer"):
        raise ValueError(f"{what}: norm kind must be 'rms' or 'layer', got {kind!r}")
    if w.shape != (length,) or not w.is_contiguous():
        raise ValueError(f"{what}: norm weight must be contiguous [{length}], got {tuple(w.shape)}")
    if kind == "rms":
        b = None
    if b is not None and (b.shape != (length,) or not b.is_contiguous()):
        raise ValueError(f"{what}: norm bias must be contiguous [{length}], got {tuple(b.shape)}")
    return _NORM_KINDS[kind], w, b, float(eps)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 norm=None, act: str | None = None, gated: bool = False,
                 residual: torch.Tensor | None = None, residual_norm=None,
                 out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                 config: dict | None = None, pdl: bool = False,
                 residual_ready: bool = False, norm_stats: torch.Tensor | None = None,
                 residual_stats: torch.Tensor | None = None, return_stats: bool = False,
                 counters: torch.Tensor | None = None):
    """``out = [norm_r(residual) +] act(norm(x) @ W^T + b)`` (gated: ``act(g) * u``), one kernel.

    x: [M, K], last-dim stride 1 (row stride free: may be a column slice of a wider buffer).
    weight: [N_total, K] contiguous (torch Linear layout); gated: rows [W0; W1], N = N_total // 2.
    bias: [N_total] contiguous or None. norm / residual_norm: None or (kind, weight, bias|None, eps)
    with kind "rms" or "layer" (norm over K for x, over N for the residual). residual: [M, N] with
    last-dim stride 1 or None. Output [M, N] in out_dtype (default x.dtype), or written into ``out``
    ([M, N], last-dim stride 1). ``out`` must not overlap x; it may alias ``residual`` only when
    ``residual_norm`` is None (each program then reads and writes only its own elements).
    config: optional overrides of ``linear_config`` (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_SK, BLOCK_SN,
    USE_DOT, UNROLL, num_warps, num_stages). No host sync; CUDA-graph capturable.
    pdl: launch with programmatic dependent launch (ignored where ``pdl_supported`` is False): the
    kernel starts while the previous kernel on the stream still runs, loads its weights, and waits
    for that kernel before it reads anything else. The caller guarantees that the kernel launched
    just before this one writes neither ``weight`` nor ``bias`` nor the norm weights.
    residual_ready: with PDL, the residual (and its norm statistics) is read before the wait as
    well; the caller guarantees that the kernel launched just before this one does not write it
    (it may have been written by any earlier kernel: that one has finished by the time this kernel
    starts, since its successor waited for it before letting this kernel launch).

    Many rows (M > 16, the tiled kernel; config ``BIG``):
    return_stats: also return the partial row statistics of the output, ``(out, stats)``: stats is
    an fp32 [M, tiles, 2] tensor (per row and BLOCK_N-column tile: the sum and the sum of squared
    deviations from the tile mean, of the values as stored), or None where the small-batch kernel
    ran. norm_stats / residual_stats: such a tensor for x's rows / the residual's rows (written by
    the kernel that produced them): the norm prologue / residual norm merges them instead of
    recomputing the statistics from the rows; ignored by the small-batch kernel and without the
    corresponding norm. Neither may be the tensor this call returns (it is new).
    counters: split-K (config ``SPLIT_K`` > 1) needs one int32 counter per output tile, zero on
    entry; the kernel leaves them zero. None: a zeroed tensor is allocated per call (a memset).
    The tiled kernel reads the residual after the PDL wait whatever ``residual_ready`` says (only
    the tile's last split needs it).
    """
    _require_triton()
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("fused_linear: x must be [M, K] with last-dim stride 1")
    M, K = x.shape
    if weight.dim() != 2 or weight.shape[1] != K or not weight.is_contiguous():
        raise ValueError(f"fused_linear: weight must be contiguous [N, {K}], got {tuple(weight.shape)}")
    n_total = weight.shape[0]
    if gated and n_total % 2:
        raise ValueError("fused_linear: gated weight needs an even number of rows")
    N = n_total // 2 if gated else n_total
    if bias is not None and (bias.shape != (n_total,) or not bias.is_contiguous()):
        raise ValueError(f"fused_linear: bias must be contiguous [{n_total}]")
    if act not in ACTIVATIONS:
        raise ValueError(f"fused_linear: unknown activation {act!r}")
    norm_kind, nw, nb, eps = _parse_norm(norm, K, "norm")
    res_kind, rw, rb, res_eps = _parse_norm(residual_norm, N, "residual_norm")
    if residual is not None:
        if residual.shape != (M, N) or residual.stride(1) != 1:
            raise ValueError(f"fused_linear: residual must be [{M}, {N}] with last-dim stride 1")
    elif residual_norm is not None:
        raise ValueError("fused_linear: residual_norm needs residual")
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    elif out.shape != (M, N) or out.stride(1) != 1:
        raise ValueError(f"fused_linear: out must be [{M}, {N}] with last-dim stride 1")
    if M == 0:
        return (out, None) if return_stats else out

    pdl = bool(pdl) and pdl_supported(x.device)
    cfg = linear_config(M, N, K, gated, weight.element_size(), pdl)
    if _LINEAR_INTERPRETED and not config:
        # the interpreter's cost is per program: wide tiles (same code path, fewer programs)
        cfg.update(BLOCK_N=min(64, _next_pow2(N)), BLOCK_K=min(512, max(16, _next_pow2(K))), UNROLL=False)
        _stats_blocks(cfg, N, K)
    if config:
        unknown = set(config) - set(cfg) - {"num_stages", "BIG", "SPLIT_K", "W_TMA"}
        if unknown:
            raise ValueError(f"fused_linear: unknown config keys {sorted(unknown)}")
        cfg.update(config)
        if cfg.get("BIG") and "SPLIT_K" not in config and {"BLOCK_M", "BLOCK_N", "BLOCK_K"} & set(config):
            cfg["SPLIT_K"] = split_k_default(M, N, K, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"])
        if {"BLOCK_M", "BLOCK_N", "BLOCK_K"} & set(config) and "USE_DOT" not in config:
            cfg["USE_DOT"] = cfg["BLOCK_M"] >= 16 and cfg["BLOCK_N"] >= 16 and cfg["BLOCK_K"] >= 16
        if "BLOCK_K" in config and "UNROLL" not in config:
            cfg["UNROLL"] = _cdiv(K, cfg["BLOCK_K"]) <= _max_unroll(cfg["BLOCK_M"])
        if "BLOCK_SK" not in config or "BLOCK_SN" not in config:
            stats = dict(cfg)
            _stats_blocks(stats, N, K)
            cfg["BLOCK_SK"] = config.get("BLOCK_SK", stats["BLOCK_SK"])
            cfg["BLOCK_SN"] = config.get("BLOCK_SN", stats["BLOCK_SN"])
    if (cfg["USE_DOT"] or cfg.get("BIG")) and min(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) < 16:
        raise ValueError("fused_linear: USE_DOT / BIG need BLOCK_M, BLOCK_N and BLOCK_K >= 16")
    launch = _launch_options(cfg, pdl)
    w_bytes = weight.element_size()
    if cfg.get("BIG"):
        return _launch_big(x, weight, bias, out, cfg, launch, pdl, norm_kind, nw, nb, eps, act, gated,
                           residual, res_kind, rw, rb, res_eps, norm_stats if norm_kind else None,
                           residual_stats if res_kind else None, return_stats, counters)
    if norm_stats is not None:
        _stats_tile(norm_stats, M, K, "norm_stats")
    if residual_stats is not None:
        _stats_tile(residual_stats, M, N, "residual_stats")

    dummy = x
    grid = (_cdiv(N, cfg["BLOCK_N"]), _cdiv(M, cfg["BLOCK_M"]))
    _fused_linear_kernel[grid](
        x, weight, bias if bias is not None else dummy,
        nw if nw is not None else dummy, nb if nb is not None else dummy,
        residual if residual is not None else dummy,
        rw if rw is not None else dummy, rb if rb is not None else dummy, out,
        M, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        eps, res_eps,
        N=N, K=K,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_SK=cfg["BLOCK_SK"], BLOCK_SN=cfg["BLOCK_SN"],
        NORM=norm_kind, HAS_NB=nb is not None, HAS_BIAS=bias is not None,
        ACT=ACTIVATIONS[act], GATED=bool(gated),
        HAS_RES=residual is not None, RES_NORM=res_kind, HAS_RB=rb is not None,
        RES_EARLY=residual is not None and (not pdl or bool(residual_ready)),
        USE_DOT=bool(cfg["USE_DOT"]), W_FP32=weight.dtype == torch.float32,
        UNROLL=bool(cfg["UNROLL"]),
        PDL=pdl, W_BYTES=w_bytes, PF_LINES=_next_pow2(_cdiv(cfg["BLOCK_N"] * K * w_bytes, 128)),
        **launch,
    )
    return (out, None) if return_stats else out


def _stats_tile(stats: torch.Tensor, M: int, L: int, what: str) -> tuple[int, int]:
    """(tiles, tile width) of a partial-statistics tensor over rows of length L (see
    ``fused_linear``'s return_stats); the width is the power of two the producer's BLOCK_N was."""
    if (stats.dim() != 3 or stats.shape[0] != M or stats.shape[2] != 2 or stats.dtype != torch.float32
            or not stats.is_contiguous()):
        raise ValueError(f"fused_linear: {what} must be a contiguous float32 [{M}, tiles, 2] tensor, got "
                         f"{stats.dtype} {tuple(stats.shape)}")
    nt = stats.shape[1]
    tile = 1
    while _cdiv(L, tile) > nt:
        tile *= 2
    if nt < 1 or _cdiv(L, tile) != nt:
        raise ValueError(f"fused_linear: {what} has {nt} tiles: no power-of-two tile splits {L} columns so")
    return nt, tile


def _launch_big(x, weight, bias, out, cfg, launch, pdl, norm_kind, nw, nb, eps, act, gated,
                residual, res_kind, rw, rb, res_eps, norm_stats, residual_stats, return_stats, counters):
    """``fused_linear`` on the tiled kernel (M > 16): split-K, producer-written norm statistics."""
    M, K = x.shape
    N = out.shape[1]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    split = int(cfg.get("SPLIT_K", 1))
    if split < 1 or split & (split - 1):
        raise ValueError(f"fused_linear: SPLIT_K={split}: expected a power of two")
    k_split = _cdiv(_cdiv(K, split), bk) * bk  # every split a whole number of BLOCK_K chunks
    split = _cdiv(K, k_split)
    x_nt = x_tile = r_nt = r_tile = 0
    if norm_stats is not None:
        x_nt, x_tile = _stats_tile(norm_stats, M, K, "norm_stats")
    if residual_stats is not None:
        r_nt, r_tile = _stats_tile(residual_stats, M, N, "residual_stats")
    nt_out = _cdiv(N, bn)
    grid = (nt_out, _cdiv(M, bm), split)
    stats = None
    if return_stats:
        stats = torch.empty((M, nt_out, 2), dtype=torch.float32, device=x.device)
    dummy = x
    ws = cnt = dummy
    if split > 1:
        ws = torch.empty((split, M, weight.shape[0]), dtype=torch.float32, device=x.device)
        tiles = grid[0] * grid[1]
        if counters is None:
            cnt = torch.zeros(tiles, dtype=torch.int32, device=x.device)
        else:
            if counters.dtype != torch.int32 or counters.dim() != 1 or counters.numel() < tiles \
                    or counters.device != x.device:
                raise ValueError(f"fused_linear: counters must be an int32 vector of >= {tiles} zeros on {x.device}")
            cnt = counters
    w_bytes = weight.element_size()
    w_desc = dummy
    if cfg.get("W_TMA"):
        from triton.tools.tensor_descriptor import TensorDescriptor

        if (K * w_bytes) % 16 or weight.data_ptr() % 16:
            raise ValueError(f"fused_linear: W_TMA needs a 16-byte aligned weight and row ({K} x {w_bytes} bytes)")
        w_desc = TensorDescriptor.from_tensor(weight, [bn, bk])
    _gemm_kernel[grid](
        x, weight, w_desc, bias if bias is not None else dummy,
        nw if nw is not None else dummy, nb if nb is not None else dummy,
        norm_stats if x_nt else dummy,
        residual if residual is not None else dummy,
        rw if rw is not None else dummy, rb if rb is not None else dummy,
        residual_stats if r_nt else dummy,
        out, stats if stats is not None else dummy, ws, cnt,
        M, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), eps, res_eps,
        N=N, K=K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split, K_SPLIT=k_split,
        NORM=norm_kind, HAS_NB=nb is not None,
        X_NT=x_nt, X_TILE=max(1, x_tile), BLOCK_XNT=_next_pow2(max(1, x_nt)), BLOCK_SK=cfg["BLOCK_SK"],
        HAS_BIAS=bias is not None, ACT=ACTIVATIONS[act], GATED=bool(gated),
        HAS_RES=residual is not None, RES_NORM=res_kind, HAS_RB=rb is not None,
        R_NT=r_nt, R_TILE=max(1, r_tile), BLOCK_RNT=_next_pow2(max(1, r_nt)), BLOCK_SN=cfg["BLOCK_SN"],
        STATS_OUT=stats is not None, W_FP32=weight.dtype == torch.float32, W_TMA=bool(cfg.get("W_TMA")),
        PDL=pdl, W_BYTES=w_bytes, PF_ROW_LINES=_next_pow2(_cdiv(k_split * w_bytes, 128)),
        **launch,
    )
    return (out, stats) if return_stats else out


# above this many query rows decode_attention defaults to 1 warp and small key tiles (attention_config)
ATTN_SMALL_TILE_ROWS = 64
# above this many query rows (and up to ATTN_SMALL_TILE_ROWS) self-attention uses 32-key tiles, 1 warp
ATTN_SELF_MID_ROWS = 32


def attention_config(D: int, T: int | None = None, self_mode: bool = True, pdl: bool = False,
                     batch: int | None = None) -> dict:
    """Default block sizes for ``decode_attention`` (T: keys in the cache, self_mode: self-attention,
    pdl: launched with PDL, batch: query rows), 4 warps, 2 above 16 rows, 1 above 64 (self-attention:
    above 32).

    - self-attention: BLOCK_T*BLOCK_D <= 4096 (32 fp32 registers per thread for a key tile),
      BLOCK_T in [16, 64]: the filled rows grow by one per step.
    - cross-attention: up to 128 keys in one tile (BLOCK_T*BLOCK_D <= 8192), so a source of <= 128
      tokens is one tile, loaded before the PDL wait. Measured in the whole step (bart-large, H100,
      ``sweep_step.py``, policy ``attn-x128w4``): batch 1 0.419 -> 0.404 ms, batch 8 unchanged;
      8 warps instead of 4 were no better.
    - above 16 rows (the compiled step's buckets) 2 warps: more programs resident per SM. Measured
      in the step (bart-large, H200, ``sweep_step.py`` policy ``inductor+attn-w2``, 2026-11-30):
      batch 256 1.455 -> 1.371 ms, batch 64 0.819 -> 0.813, batch 32 0.708 -> 0.704.
    - above 64 rows (``ATTN_SMALL_TILE_ROWS``) 1 warp, self-attention on 16-key tiles and
      cross-attention on 32-key tiles: more, smaller programs resident. Measured in the step (H200,
      ``sweep_step.py`` policy ``inductor+attn-s16w1c32w1``, 2026-11-30 18:53): batch 256 bart-large
      1.378 -> 1.309 ms, flan-t5-large 2.516 -> 2.505 (2.638 -> 2.494 in a second run, 19:14); at
      batch 64 it was slower for flan-t5-large (1.489 -> 1.570), so not there.
    - self-attention above 32 rows up to 64 (``ATTN_SELF_MID_ROWS``): 32-key tiles, 1 warp. Measured
      in the step (H200, ``sweep_step.py`` policy ``inductor+attn-s32w1`` alternated with the
      default in one process, 2026-12-01 15:08): batch 64 flan-t5-large 1.614 / 1.615 -> 1.551 /
      1.552 ms, bart-large 0.835 / 0.836 -> 0.822 / 0.820; at batch 32 bart-large was 0.5 % slower
      (0.710 / 0.711 -> 0.715 / 0.717), so not there. (A sweep on another H200, 2026-11-30 18:53,
      had flan-t5-large at 64 rows slower with it, 1.489 -> 1.583, with the default timed first in
      its process, which runs slower.)
    """
    rows = 0 if batch is None else batch
    if rows > ATTN_SMALL_TILE_ROWS:
        block_t, warps = (16 if self_mode else 32), 1
    elif self_mode and rows > ATTN_SELF_MID_ROWS:
        block_t, warps = 32, 1
    else:
        cap = 4096 if self_mode else 8192
        block_t = max(16, min(64 if self_mode else 128, cap // _next_pow2(D)))
        warps = 2 if rows > 16 else 4
    if T is not None and not self_mode:
        block_t = max(16, min(block_t, _next_pow2(T)))
    return dict(BLOCK_T=block_t, num_warps=warps)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, *,
                     pos: torch.Tensor | None = None, k_new: torch.Tensor | None = None,
                     v_new: torch.Tensor | None = None, bias_table: torch.Tensor | None = None,
                     key_bias: torch.Tensor | None = None, row_index: torch.Tensor | None = None,
                     kv_group: int = 1, out: torch.Tensor | None = None, config: dict | None = None,
                     pdl: bool = False) -> torch.Tensor:
    """One-query attention per (batch, head): ``softmax(q.k * scale + bias) @ v`` in fp32.

    q: [B, H, D] (any strides). k_cache / v_cache: [B, H, T, D] (any strides; T = capacity or
    source length). Self-attention mode (``pos`` a 0-dim / 1-element int tensor on the device,
    never read on the host): k_new / v_new [B, H, D] are written into row ``pos`` of the caches,
    then keys 0..pos are attended; bias_table: None or [Hb, T, T] (Hb 1 or H), row ``pos`` is added.
    Cross-attention mode (pos None): all T keys; key_bias: None or [B, T] additive.
    row_index: None or an int32 / int64 [B, >= T] tensor (self-attention only; cache indirection for
    beam search): key position t < pos of query row b is read from cache row ``row_index[b, t]``
    (values in [0, B)), so a beam step moves an index table instead of the caches; the new row is
    still written at row b, position pos.
    kv_group (cross-attention only): query row b reads cache row (and key_bias row) ``b // kv_group``:
    the beams (or samples) of a request share one copy of its cross K/V; the caches then need at
    least ceil(B / kv_group) rows.
    Output: [B, H, D] in q's dtype, or written into ``out`` ([B, H, D], any strides).
    config: optional overrides (BLOCK_T, num_warps). No host sync; CUDA-graph capturable.
    pdl: programmatic dependent launch (see ``fused_linear``): the kernel reads ``pos``, its first
    tile of cached rows with their bias-table row / key bias, and prefetches the later cached rows
    into L2 before it waits for the previous kernel, so the caller guarantees that the kernel
    launched just before this one writes neither ``pos`` nor the cache rows 0..pos-1
    (cross-attention: any cache row) nor ``bias_table`` / ``key_bias`` / ``row_index``. With
    ``row_index`` the later cached rows are not prefetched into L2.
    """
    _require_triton()
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("decode_attention: q [B, H, D], k_cache / v_cache [B, H, T, D]")
    B, H, D = q.shape
    T = k_cache.shape[2]
    self_mode = pos is not None
    G = int(kv_group)
    if G < 1 or (G > 1 and self_mode):
        raise ValueError(f"decode_attention: kv_group={kv_group}: expected 1, or >= 1 for cross-attention (pos None)")
    rows = B if G == 1 else -(-B // G)
    if (k_cache.shape[0] != B if G == 1 else k_cache.shape[0] < rows) or k_cache.shape[1] != H \
            or k_cache.shape[3] != D:
        raise ValueError(f"decode_attention: cache shape {tuple(k_cache.shape)} does not match q {tuple(q.shape)}"
                         + (f" with kv_group {G} (>= {rows} rows)" if G > 1 else ""))
    if self_mode:
        if k_new is None or v_new is None:
            raise ValueError("decode_attention: self-attention mode needs k_new and v_new")
        if k_new.shape != (B, H, D) or v_new.shape != (B, H, D):
            raise ValueError("decode_attention: k_new / v_new must be [B, H, D]")
        if pos.numel() != 1:
            raise ValueError("decode_attention: pos must hold one position")
        if key_bias is not None:
            raise ValueError("decode_attention: key_bias is for cross-attention (pos None)")
        if row_index is not None and (row_index.dim() != 2 or row_index.shape[0] != B or row_index.shape[1] < T
                                      or row_index.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"decode_attention: row_index must be an integer [{B}, >= {T}] tensor, "
                             f"got {row_index.dtype} {tuple(row_index.shape)}")
    else:
        if k_new is not None or v_new is not None or bias_table is not None or row_index is not None:
            raise ValueError("decode_attention: k_new / v_new / bias_table / row_index need pos (self-attention)")
    if bias_table is not None:
        if bias_table.dim() != 3 or bias_table.shape[0] not in (1, H) or bias_table.shape[1] < T \
                or bias_table.shape[2] < T:
            raise ValueError(f"decode_attention: bias_table must be [1|{H}, {T}, {T}]")
    if key_bias is not None and (key_bias.dim() != 2 or key_bias.shape[0] < rows or key_bias.shape[1] < T):
        raise ValueError(f"decode_attention: key_bias must be [{rows}, {T}]")
    if out is None:
        out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    elif out.shape != (B, H, D):
        raise ValueError(f"decode_attention: out must be [{B}, {H}, {D}]")
    if B * H == 0:
        return out

    pdl = bool(pdl) and pdl_supported(q.device)
    cfg = attention_config(D, T, self_mode, pdl, B)
    if config:
        unknown = set(config) - set(cfg) - {"num_stages"}
        if unknown:
            raise ValueError(f"decode_attention: unknown config keys {sorted(unknown)}")
        cfg.update(config)
    launch = _launch_options(cfg, pdl)
    esz = k_cache.element_size()

    kn = k_new if self_mode else q
    vn = v_new if self_mode else q
    bt = bias_table if bias_table is not None else q
    kb = key_bias if key_bias is not None else q
    if bias_table is not None:
        bt_strides = (bias_table.stride(0) if bias_table.shape[0] > 1 else 0,
                      bias_table.stride(1), bias_table.stride(2))
    else:
        bt_strides = (0, 0, 0)
    kb_strides = (key_bias.stride(0), key_bias.stride(1)) if key_bias is not None else (0, 0)
    ri = row_index if row_index is not None else q
    ri_strides = (row_index.stride(0), row_index.stride(1)) if row_index is not None else (0, 0)
    _decode_attention_kernel[(B * H,)](
        q, k_cache, v_cache, out, pos if self_mode else q, kn, vn, bt, kb, ri,
        float(scale), H, T, G,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        *kn.stride(), *vn.stride(), *bt_strides, *kb_strides, *ri_strides,
        D=D, BLOCK_D=_next_pow2(D), BLOCK_T=cfg["BLOCK_T"],
        SELF=self_mode, HAS_BT=bias_table is not None, HAS_KB=key_bias is not None,
        HAS_RI=row_index is not None,
        LOOP_CAP=T if _ATTN_INTERPRETED else 0,
        PDL=pdl, ROW_LINES=_next_pow2(_cdiv(D * esz, 128)), LINE_ELEMS=max(1, 128 // esz),
        **launch,
    )
    return out


def row_topk(x: torch.Tensor, k: int, chunk: int | None = None):
    """The ``k`` largest values of each row of ``x`` [R, N] and their column indices, like
    ``torch.topk(x, k)``: values [R, k] in x's dtype, sorted descending, indices [R, k] int64.
    Equal values come lowest index first (``torch.topk`` leaves their order unspecified). NaN is
    not supported.

    Two kernels: every ``chunk`` columns of a row (default 2048, at least k) keep their own top k,
    then one program per row takes the top k of those candidates. For beam search's [batch,
    beams x vocabulary] scores (bart-large 8 x 4: [8, 201060]) this replaces the radix select of
    ``torch.topk``. Needs 1 <= k <= N and x's last dimension contiguous. No host sync; CUDA-graph
    capturable."""
    _require_triton()
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"row_topk: x must be [R, N] with last-dim stride 1, got {tuple(x.shape)}")
    R, N = x.shape
    k = int(k)
    if not 1 <= k <= N:
        raise ValueError(f"row_topk: k={k}: expected 1 <= k <= {N} (the row length)")
    ch = int(chunk) if chunk else min(2048, _next_pow2(N))
    if ch & (ch - 1) or ch < k:
        raise ValueError(f"row_topk: chunk={ch}: expected a power of two >= k={k}")
    values = torch.empty((R, k), dtype=x.dtype, device=x.device)
    indices = torch.empty((R, k), dtype=torch.int64, device=x.device)
    if R == 0:
        return values, indices
    C = _cdiv(N, ch)
    cv = torch.empty((R, C, k), dtype=torch.float32, device=x.device)
    ci = torch.empty((R, C, k), dtype=torch.int32, device=x.device)
    _topk_chunk_kernel[(R, C)](x, cv, ci, N, x.stride(0), C, K=k, CH=ch, num_warps=4)
    _topk_merge_kernel[(R,)](cv, ci, values, indices, C * k, K=k, BLOCK=_next_pow2(C * k), num_warps=4)
    return values, indices
