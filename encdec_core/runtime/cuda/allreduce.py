"""Tensor parallelism's residual add in one kernel: all-reduce + bias + residual (the Triton step).

Under tensor parallelism each row-parallel block of the Triton decoder step (out-projections,
FFN-out) leaves the rank's fp32 partial product. Without this module the step then runs two more
kernels per block: the symmetric-memory all-reduce (``parallel/symm.py``, 6-7 µs on 2 x H200 at
batch 1) and a compiled ``residual_sum``; neither takes part in programmatic dependent launch, so
the Triton step's overlap of one kernel's start with its predecessor's tail is lost 3 times a layer.

``ResidualAllReduce`` does it in one Triton kernel that the step launches like its others:

- Each rank owns two symmetric-memory tensors (``torch.distributed._symmetric_memory``), exchanged
  once: ``data`` [2, world, max_rows, N] fp32 and ``flags`` [2, world, programs] int32.
- Program p owns columns [p * BLOCK_N, (p + 1) * BLOCK_N) of every row. It *pushes* its partial
  slice into every peer's ``data[parity, my_rank]`` (stores over NVLink, no multicast), then sets
  its flag in every peer's ``flags[parity, my_rank, p]`` (compare-and-swap 0 -> 1, release, system
  scope: spinning until the previous signal there was consumed), then waits for every peer's flag
  in its own memory (compare-and-swap 1 -> 0, acquire) and reads their slices locally.
- Sums run in rank order, so every rank computes the same bits; then ``(partial + bias)`` is added
  to the residual in fp32 and rounded once: ``fused.residual_sum``'s math.
- ``parity`` alternates per program from a counter in the rank's own memory (both ranks run the
  same sequence of calls, CUDA graph replays included), so a sender writes a buffer again only
  two calls later of the same program, by which time the peer has signalled the call in between,
  which it did after reading the buffer. One barrier per call, no second one to free the buffer.
- Before its dependency wait (PDL) a program loads the bias and the residual (written two kernels
  back or earlier, as the step's other kernels assume). Its parity counter it loads after the wait:
  the previous kernel can be its own previous call (calls in a row, as in the GPU test), which
  stores the counter last; read early, the two calls could share a parity on one rank only.
- A program that waits for a peer longer than ``TIMEOUT_S`` (a peer that never arrives) gives up,
  counts an error in ``errors`` (this result and later ones are then wrong) and returns instead of
  hanging the GPU; ``check()`` raises on the host when that happened (``CudaGraphRunner`` checks
  after ``greedy`` and before each prefill).

CUDA with symmetric memory and peer access only; nothing else can run it (CPU tests cover the
unfused path it replaces; the GPU test compares it with torch's sum on 2 GPUs).
"""
from __future__ import annotations

import os

import torch

from ...errors import ConfigError, EncDecError
from ...parallel.symm import symm_ops_missing
from .triton_kernels import HAVE_TRITON, _launch_options, _next_pow2, pdl_supported

MAX_ROWS = 16  # the Triton step's batch buckets (fused_max_batch's default)
BLOCK_N = 256
# how long a program waits for a peer before it gives up (ENCDEC_AR_TIMEOUT_S overrides): long, since
# ranks reach their first call seconds apart (each compiles its own kernels), and a program that
# gives up leaves the flags out of step for the calls after it
TIMEOUT_S = 600.0

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_kernels import _pdl_sync

    @triton.jit
    def _now_ns(dummy):
        """The GPU's global timer (ns)."""
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dummy], dtype=tl.int64,
                                         is_pure=False, pack=1)

    @triton.jit
    def _spin_cas(ptr, cmp, val, err_ptr, ACQUIRE: tl.constexpr, TIMEOUT_NS: tl.constexpr):
        """Compare-and-swap ``ptr`` from cmp to val at system scope until it succeeds (one thread of
        the program: Triton runs a scalar atomic once); after TIMEOUT_NS count an error and stop."""
        if ACQUIRE:
            got = tl.atomic_cas(ptr, cmp, val, sem="acquire", scope="sys")
        else:
            got = tl.atomic_cas(ptr, cmp, val, sem="release", scope="sys")
        if got != cmp:
            t0 = _now_ns(got)
            waited = t0 - t0
            while (got != cmp) & (waited <= TIMEOUT_NS):
                if ACQUIRE:
                    got = tl.atomic_cas(ptr, cmp, val, sem="acquire", scope="sys")
                else:
                    got = tl.atomic_cas(ptr, cmp, val, sem="release", scope="sys")
                waited = _now_ns(got) - t0
            if got != cmp:
                tl.atomic_add(err_ptr, 1)

    @triton.jit
    def _ar_residual_kernel(part_ptr, x_ptr, bias_ptr, out_ptr, data_ptrs, flag_ptrs, epoch_ptr, err_ptr,
                            M, N, s_pm, s_xm, s_om,
                            RANK: tl.constexpr, WORLD: tl.constexpr, R_MAX: tl.constexpr, N_BUF: tl.constexpr,
                            P_MAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            HAS_BIAS: tl.constexpr, PDL: tl.constexpr, TIMEOUT_NS: tl.constexpr):
        pid = tl.program_id(0)
        rows = tl.arange(0, BLOCK_M)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        m2 = (rows[:, None] < M) & (cols[None, :] < N)
        # independent of the previous kernel (PDL: before the wait)
        xr = tl.load(x_ptr + rows[:, None] * s_xm + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        if PDL:
            _pdl_sync()
        # the parity counter after the wait: the previous kernel may be this one's previous call,
        # which stores the counter at its end (read before the wait, two calls in a row could take
        # the same parity on one rank and not on the other, and their flags deadlock)
        epoch = tl.load(epoch_ptr + pid)
        par = epoch & 1
        mine = tl.load(part_ptr + rows[:, None] * s_pm + cols[None, :], mask=m2, other=0.0)
        slot = rows[:, None] * N_BUF + cols[None, :]
        # push this rank's slice into every peer's buffer, then signal
        for r in tl.static_range(WORLD):
            if r != RANK:
                peer = tl.load(data_ptrs + r).to(tl.pointer_type(tl.float32))
                tl.store(peer + (par * WORLD + RANK) * R_MAX * N_BUF + slot, mine, mask=m2)
        tl.debug_barrier()
        for r in tl.static_range(WORLD):
            if r != RANK:
                pf = tl.load(flag_ptrs + r).to(tl.pointer_type(tl.int32))
                _spin_cas(pf + (par * WORLD + RANK) * P_MAX + pid, 0, 1, err_ptr, False, TIMEOUT_NS)
        own_flags = tl.load(flag_ptrs + RANK).to(tl.pointer_type(tl.int32))
        for r in tl.static_range(WORLD):
            if r != RANK:
                _spin_cas(own_flags + (par * WORLD + r) * P_MAX + pid, 1, 0, err_ptr, True, TIMEOUT_NS)
        tl.debug_barrier()
        own = tl.load(data_ptrs + RANK).to(tl.pointer_type(tl.float32))
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r in tl.static_range(WORLD):  # rank order: the same bits on every rank
            if r == RANK:
                acc += mine
            else:
                acc += tl.load(own + (par * WORLD + r) * R_MAX * N_BUF + slot, mask=m2, other=0.0, volatile=True)
        if HAS_BIAS:
            acc = acc + b[None, :]
        y = xr + acc
        tl.store(out_ptr + rows[:, None] * s_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=m2)
        tl.store(epoch_ptr + pid, epoch + 1)


def _timeout_ns() -> int:
    """How long a program waits for a peer: ``ENCDEC_AR_TIMEOUT_S`` seconds (positive), else TIMEOUT_S."""
    raw = os.environ.get("ENCDEC_AR_TIMEOUT_S")
    if raw is None:
        return int(TIMEOUT_S * 1e9)
    try:
        secs = float(raw)
    except ValueError:
        secs = -1.0
    if not secs > 0:
        raise ConfigError(f"ENCDEC_AR_TIMEOUT_S={raw!r}: expected a positive number of seconds")
    return int(secs * 1e9)


class ResidualAllReduce:
    """``out = residual + (sum over the tensor-parallel group of partial + bias)``, one kernel
    (see the module doc). Collective to build: every rank of ``ctx``'s tensor-parallel group
    constructs it with the same ``n`` (the row width, d_model)."""

    def __init__(self, ctx, n: int, max_rows: int = MAX_ROWS):
        if not HAVE_TRITON:
            raise EncDecError("the fused tensor-parallel all-reduce needs triton")
        device = torch.device(ctx.device)
        if device.type != "cuda" or ctx.tp_size < 2:
            raise EncDecError(f"the fused tensor-parallel all-reduce needs CUDA and tp >= 2 "
                              f"(device {device}, tp {ctx.tp_size})")
        why = symm_ops_missing()
        if why:
            raise EncDecError(why)
        import torch.distributed._symmetric_memory as symm_mem

        self.timeout_ns = _timeout_ns()  # a bad ENCDEC_AR_TIMEOUT_S is refused before any collective
        self.world, self.rank = ctx.tp_size, ctx.tp_rank
        self.n, self.max_rows = int(n), int(max_rows)
        self.programs = -(-self.n // BLOCK_N)
        group = ctx.tp_group.group_name
        self.data = symm_mem.empty(2 * self.world * self.max_rows * self.n, dtype=torch.float32, device=device)
        self.flags = symm_mem.empty(2 * self.world * self.programs, dtype=torch.int32, device=device)
        self.flags.zero_()
        torch.cuda.synchronize(device)
        hd = symm_mem.rendezvous(self.data, group)
        hf = symm_mem.rendezvous(self.flags, group)
        hf.barrier()  # every rank's flags are zero before anyone signals
        self.data_ptrs = torch.tensor(list(hd.buffer_ptrs), dtype=torch.int64, device=device)
        self.flag_ptrs = torch.tensor(list(hf.buffer_ptrs), dtype=torch.int64, device=device)
        self.epoch = torch.zeros(self.programs, dtype=torch.int32, device=device)
        self.errors = torch.zeros(1, dtype=torch.int32, device=device)
        self.pdl = pdl_supported(device)

    def fits(self, partial: torch.Tensor) -> bool:
        return partial.dim() == 2 and partial.shape[0] <= self.max_rows and partial.shape[1] == self.n

    def __call__(self, partial: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype) -> torch.Tensor:
        """partial: this rank's fp32 [M, n] product; x: the residual [M, n]; -> [M, n] out_dtype."""
        m = partial.shape[0]
        if not self.fits(partial) or partial.dtype != torch.float32 or x.shape != partial.shape:
            raise ValueError(f"ResidualAllReduce: partial fp32 [<= {self.max_rows}, {self.n}] and x of its "
                             f"shape expected, got {partial.dtype} {tuple(partial.shape)}, x {tuple(x.shape)}")
        partial = partial.contiguous() if partial.stride(1) != 1 else partial
        x = x.contiguous() if x.stride(1) != 1 else x
        out = torch.empty((m, self.n), dtype=out_dtype, device=partial.device)
        _ar_residual_kernel[(self.programs,)](
            partial, x, bias if bias is not None else partial, out, self.data_ptrs, self.flag_ptrs, self.epoch,
            self.errors, m, self.n, partial.stride(0), x.stride(0), out.stride(0),
            RANK=self.rank, WORLD=self.world, R_MAX=self.max_rows, N_BUF=self.n, P_MAX=self.programs,
            BLOCK_M=max(2, _next_pow2(m)), BLOCK_N=BLOCK_N, HAS_BIAS=bias is not None, PDL=self.pdl,
            TIMEOUT_NS=self.timeout_ns, **_launch_options({"num_warps": 4}, self.pdl))
        return out

    def check(self) -> None:
        """Raise if a kernel gave up waiting for a peer since the last check (host sync)."""
        n = int(self.errors.item())
        if n:
            self.errors.zero_()
            raise EncDecError(f"the fused tensor-parallel all-reduce timed out waiting for a peer {n} time(s): "
                              f"the ranks ran different sequences of steps; results since the last check are wrong")
