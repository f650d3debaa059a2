"""A low-latency tensor-parallel all-reduce for small messages: PyTorch's symmetric memory.

Each rank of the tensor-parallel group allocates one buffer per dtype with
``torch.distributed._symmetric_memory.empty`` and exchanges it with the others (``rendezvous``,
a collective). ``torch.ops.symm_mem.one_shot_all_reduce_copy`` then copies the local partial sums
into the rank's buffer and sums every rank's buffer with peer loads over NVLink, in one kernel
that CUDA graphs capture. No NVLink multicast is used (the one-shot op reads peers' memory
directly); keep ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` set on shared machines.

Measured on 2 × H200 (docs/performance.md, 2026-11-30 10:44; 48 all-reduces of ``[batch, 2048]``
bf16 in one CUDA graph): 6.3 / 6.7 / 9.3 / 14.9 µs at batch 1 / 8 / 64 / 256, against NCCL's
16.0 / 16.9 / 18.5 / 21.8 µs. Messages above ``max_bytes`` (an encoder's activations) stay on
NCCL, whose ring is faster there.

``ParallelContext.all_reduce`` uses it when ``ctx.fast_allreduce`` is set
(``enable_symm_allreduce(ctx)``, or ``CudaGraphRunner(..., tp_allreduce="symm")``); the
compiled step sees ``encdec::symm_all_reduce``, an opaque custom op. CUDA and torch.distributed
with symmetric memory only: nothing else can run it.
"""
from __future__ import annotations

import torch

from ..errors import EncDecError

DEFAULT_MAX_BYTES = 1 << 20  # 1 MiB: a [256, 2048] bf16 step activation
_BUFFERS: dict = {}  # (group name, dtype) -> this rank's symmetric buffer (1-D)


def symm_ops_missing() -> str | None:
    """Why this torch build cannot run the symmetric-memory all-reduces (None: it can)."""
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401

        torch.ops.symm_mem.one_shot_all_reduce_copy  # noqa: B018 - present in this build?
    except (ImportError, AttributeError) as exc:
        return f"this torch build has no symmetric-memory all-reduce ({exc})"
    return None


def _cuda_tp(ctx) -> bool:
    """Whether ``ctx`` is tensor-parallel (tp > 1) on CUDA devices: where symmetric memory applies."""
    return ctx.tp_size > 1 and ctx.device is not None and torch.device(ctx.device).type == "cuda"


def _gpu_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


class SymmAllReduce:
    """Sum over a tensor-parallel group through symmetric-memory buffers (see the module doc)."""

    def __init__(self, group, device, dtypes=(torch.bfloat16, torch.float16, torch.float32),
                 max_bytes: int = DEFAULT_MAX_BYTES):
        device = torch.device(device)
        if device.type != "cuda":
            raise EncDecError(f"the symmetric-memory all-reduce needs CUDA devices, got {device}")
        why = symm_ops_missing()
        if why:
            raise EncDecError(why)
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.max_bytes = int(max_bytes)
        self.dtypes = tuple(dtypes)
        for dt in self.dtypes:  # collective: every rank allocates and exchanges the same buffers
            key = (self.group_name, dt)
            if key not in _BUFFERS:
                n = self.max_bytes // torch.empty((), dtype=dt).element_size()
                buf = symm_mem.empty(n, dtype=dt, device=device)
                symm_mem.rendezvous(buf, self.group_name)
                _BUFFERS[key] = buf

    def fits(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes through the symmetric buffers (CUDA, a set-up dtype, small enough)."""
        return x.is_cuda and x.dtype in self.dtypes and x.numel() * x.element_size() <= self.max_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.encdec.symm_all_reduce(x, self.group_name)


@torch.library.custom_op("encdec::symm_all_reduce", mutates_args=())
def _symm_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    buf = _BUFFERS[(group_name, x.dtype)]
    flat = x.contiguous().view(-1)
    out = torch.ops.symm_mem.one_shot_all_reduce_copy(buf[: flat.numel()], flat, "sum", group_name)
    return out.view(x.shape)


@_symm_all_reduce.register_fake
def _(x, group_name):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def enable_symm_allreduce(ctx, max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
    """Route ``ctx``'s small tensor-parallel all-reduces through symmetric memory (collective over
    the whole launch: call it on every rank). Returns False, changing nothing, where it does not
    apply (tp 1, not CUDA)."""
    if not _cuda_tp(ctx):
        return False
    if isinstance(ctx.fast_allreduce, SymmAllReduce):
        return True
    ctx.fast_allreduce = SymmAllReduce(ctx.tp_group, ctx.device, max_bytes=max_bytes)
    return True


def symm_memory_usable(ctx, peers=None) -> str | None:
    """Why this rank cannot use symmetric memory for ``ctx``'s tensor-parallel group (None: it can):
    CUDA, a torch build with the symmetric-memory ops, and peer access from this rank's GPU to the
    other ranks' GPUs of the group (``peers``: their device indices on this host; None: every other
    GPU of the host). A group wider than the host's visible GPUs cannot map its peers' memory."""
    device = None if ctx.device is None else torch.device(ctx.device)
    if device is None or device.type != "cuda":
        return f"device {device} is not CUDA"
    why = symm_ops_missing()
    if why:
        return why
    n = torch.cuda.device_count()
    if ctx.tp_size > n:
        return f"tensor-parallel size {ctx.tp_size} exceeds this host's {n} GPUs"
    if peers is not None and len(set(peers)) != len(peers):
        return f"the ranks' GPUs {list(peers)} are not distinct on this host"
    own = _gpu_index(device)
    others = [d for d in (range(n) if peers is None else peers) if d != own]
    blocked = [d for d in others if not 0 <= d < n or not torch.cuda.can_device_access_peer(own, d)]
    if blocked:
        return f"GPU {own} has no peer access to GPU(s) {blocked}"
    return None


def choose_tp_allreduce(ctx) -> str:
    """``tp_allreduce="auto"``: "fused" (symmetric memory, and the Triton step's fused residual
    all-reduce) where every rank of the tensor-parallel group can map the others' GPUs, else
    "nccl". Collective when ``tp_size > 1``: the ranks exchange their device indices, each checks
    its peer access to the others', and they agree through one all-reduce, so no rank sets up
    buffers that another would never exchange."""
    if not _cuda_tp(ctx):
        return "nccl"
    import torch.distributed as dist

    dev = torch.device(ctx.device)
    own = _gpu_index(dev)
    comm = dev if dist.get_backend(ctx.tp_group) == "nccl" else torch.device("cpu")  # gloo: CPU tensors
    idx = [torch.zeros(1, dtype=torch.int64, device=comm) for _ in range(ctx.tp_size)]
    dist.all_gather(idx, torch.tensor([own], dtype=torch.int64, device=comm), group=ctx.tp_group)
    why = symm_memory_usable(ctx, [int(t) for t in idx])
    ok = torch.tensor([0 if why else 1], dtype=torch.int64, device=comm)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=ctx.tp_group)
    return "fused" if int(ok.item()) == 1 else "nccl"
