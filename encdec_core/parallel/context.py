"""Rank mapping and the collective hooks the model calls.

world = tp * pp, TensorRT-LLM's convention: rank = pp_rank * tp + tp_rank. The model only talks
to a ParallelContext; with tp = pp = 1 every hook is the identity and nothing is imported from
torch.distributed (unless ``force_collectives`` is set: then the hooks run their collectives even on
groups of one rank, so a single GPU exercises the same NCCL code paths as a multi-GPU run).

A context with world > 1 is built by :func:`encdec_core.parallel.launch.init_parallel`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def split_range(n: int, parts: int, index: int) -> range:
    """Contiguous split of range(n) into ``parts`` stages; earlier stages take the remainder."""
    base, rem = divmod(n, parts)
    start = index * base + min(index, rem)
    size = base + (1 if index < rem else 0)
    return range(start, start + size)


@dataclass
class ParallelContext:
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0
    tp_group: object = None
    pp_group: object = None
    pp_ranks: tuple = ()  # global ranks of this rank's pipeline, stage order
    extra: dict = field(default_factory=dict)
    device: object = None  # torch.device of this rank (None: cpu); collectives run on it
    force_collectives: bool = False  # run collectives on groups of one rank too (world-1 NCCL checks)
    # small all-reduces through another implementation (parallel/symm.py: symmetric memory on CUDA);
    # an object with fits(x) -> bool and __call__(x) -> the sum over the tp group (a new tensor)
    fast_allreduce: object = None

    @property
    def distributed(self) -> bool:
        """True when the hooks talk to torch.distributed."""
        return self.world_size > 1 or self.force_collectives

    @property
    def tp_ranks(self) -> tuple:
        """Global ranks of this rank's tensor-parallel group (rank = pp_rank * tp + tp_rank)."""
        return tuple(self.pp_rank * self.tp_size + t for t in range(self.tp_size))

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def layer_range(self, n_layers: int) -> range:
        return split_range(n_layers, self.pp_size, self.pp_rank)

    def shared_seed(self, seed: int | None = None) -> int | None:
        """A sampling seed every rank agrees on (collective: call it on every rank).

        Ranks must draw the same tokens; with no seed given, rank 0 draws one and broadcasts it.
        Single-process contexts return ``seed`` unchanged (None keeps torch's global generator).
        """
        if seed is not None or not self.distributed:
            return seed
        import torch.distributed as dist

        t = torch.randint(0, 2**62, (1,), dtype=torch.int64) if self.rank == 0 else torch.zeros(1, dtype=torch.int64)
        t = t.to(self.device or "cpu")
        dist.broadcast(t, src=0)
        return int(t.item())

    # ------------------------------------------------------------ tensor parallel
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the tensor-parallel group; use the result (it may be a new tensor)."""
        if self.tp_size == 1 and not self.force_collectives:
            return x
        if self.fast_allreduce is not None and self.fast_allreduce.fits(x):
            return self.fast_allreduce(x)
        import torch.distributed as dist

        dist.all_reduce(x, group=self.tp_group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each tp rank's slice along the last dim (vocab-parallel logits)."""
        if self.tp_size == 1 and not self.force_collectives:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    # ------------------------------------------------------------ pipeline parallel
    def stage_input(self, x: torch.Tensor) -> torch.Tensor:
        """Receive this stage's input activations from the previous stage (shape/dtype of x)."""
        if self.pp_size == 1 or self.is_first_stage:
            return x
        import torch.distributed as dist

        buf = torch.empty_like(x).contiguous()
        dist.recv(buf, src=self.pp_ranks[self.pp_rank - 1], group=self.pp_group)
        return buf

    def stage_output(self, x: torch.Tensor) -> torch.Tensor:
        """Send activations on; return the last stage's result on every stage."""
        if self.pp_size == 1:
            return self.broadcast_from_last(x) if self.force_collectives else x
        import torch.distributed as dist

        if not self.is_last_stage:
            dist.send(x.contiguous(), dst=self.pp_ranks[self.pp_rank + 1], group=self.pp_group)
        return self.broadcast_from_last(x)

    def broadcast_from_last(self, x: torch.Tensor) -> torch.Tensor:
        if self.pp_size == 1 and not self.force_collectives:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        dist.broadcast(x, src=self.pp_ranks[-1], group=self.pp_group)
        return x


SINGLE = ParallelContext()
