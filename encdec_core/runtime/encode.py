"""The encoder over a batch of mixed source lengths: rows grouped by length, each group encoded at
its own length, so padding costs little compute.

A padded batch costs every row the longest row's length; with lengths spread from 10 to 128 about
half of the encoder's work is padding. ``encode_grouped`` sorts the rows by length (the last
non-padding position + 1), cuts them into contiguous groups where that saves more than a launch
costs (``plan_groups``: sum over groups of rows x the group's longest row, plus ``launch_cost``
token-rows per group), runs the encoder once per group on its own columns and scatters the outputs
into one [B, S, d] tensor. The positions a row does not have stay zero and are masked wherever they
are read (cross-attention's padding bias), exactly as padded positions are.

A row's outputs do not depend on the other rows of its batch (padding is masked with an additive
bias, which the softmax turns into exact zeros), so grouping changes no result beyond the rounding
of GEMMs of another row count.
"""
from __future__ import annotations

import torch

# length edges where a group may end (a group holds the rows between two chosen edges)
_EDGES = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)

# token-rows one more encoder call is worth: on a GPU an encoder launch costs about what 2048 tokens
# of a large batch do (t5-small: ~0.23 us a token at batch 256, a compiled call ~0.5 ms); on a CPU
# the call overhead is a few tokens' work
LAUNCH_COST = {"cuda": 2048, "cpu": 32}


def pad_rows(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows right-padded with ``pad``: (ids [B, S] long, mask [B, S] long, 1 on real tokens)."""
    width = max(len(x) for x in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, x in enumerate(rows):
        ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids, mask


def default_launch_cost(device_type: str) -> int:
    """``LAUNCH_COST`` of a device type (other accelerators: the GPU's)."""
    return LAUNCH_COST.get(device_type, LAUNCH_COST["cuda"])


def row_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] the last non-padding position + 1 of every row (0 for an all-padding row)."""
    s = attention_mask.shape[1]
    pos = torch.arange(1, s + 1, device=attention_mask.device)
    return (attention_mask.ne(0) * pos).amax(1)


def plan_groups(lengths: list[int], launch_cost: int) -> list[list[int]]:
    """Row indices per group, each group contiguous in length order, chosen to minimise
    sum(rows x longest row) + launch_cost x groups over the cut points in ``_EDGES``. One group
    (all rows, in their order) when splitting does not pay."""
    n = len(lengths)
    order = sorted(range(n), key=lambda i: lengths[i])
    sl = [max(1, lengths[i]) for i in order]
    # candidate cuts: after the last row of each edge bucket (positions in the sorted order)
    cuts, j = [], 0
    for e in _EDGES:
        while j < n and sl[j] <= e:
            j += 1
        if 0 < j < n and (not cuts or cuts[-1] != j):
            cuts.append(j)
    if not cuts:
        return [list(range(n))]
    pts = [0] + cuts + [n]
    # best[k]: least cost of rows [0, pts[k]) split at chosen points; a group [pts[a], pts[b]) costs
    # its rows x its longest row (the last in sorted order) + launch_cost
    best, back = [0.0] + [float("inf")] * (len(pts) - 1), [0] * len(pts)
    for b in range(1, len(pts)):
        for a in range(b):
            c = best[a] + (pts[b] - pts[a]) * sl[pts[b] - 1] + launch_cost
            if c < best[b]:
                best[b], back[b] = c, a
    groups, b = [], len(pts) - 1
    while b > 0:
        a = back[b]
        groups.append(order[pts[a]:pts[b]])
        b = a
    if len(groups) == 1:
        return [list(range(n))]
    return groups[::-1]


def length_groups(lengths: list[int], launch_cost: int | None, device_type: str) -> list[list[int]] | None:
    """``plan_groups`` of the rows' lengths, or None where the batch is encoded in one call (one row,
    or launch_cost 0 or less; None: the device type's ``default_launch_cost``)."""
    if launch_cost is None:
        launch_cost = default_launch_cost(device_type)
    return plan_groups(lengths, launch_cost) if launch_cost > 0 and len(lengths) > 1 else None


def encode_grouped(encode, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   launch_cost: int | None = None):
    """``encode(ids, mask)`` -> [b, s, d] over length groups of the batch (see the module).

    Returns (encoder output [B, S', d], attention mask [B, S']) where S' drops the trailing columns
    that are padding in every row. launch_cost: token-rows a further encoder call is worth
    (default: ``LAUNCH_COST`` of the device); 0 or less never splits."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # one host read: every row's length (last non-padding position + 1) and its non-padding count
    lens, counts = torch.stack([row_lengths(attention_mask), attention_mask.ne(0).sum(1)]).tolist()
    keep = max(1, max(lens, default=0))
    # contiguous copies (tiny int tensors): a column slice's row stride differs from its width,
    # which a compiled encoder guards on (one recompile, seen on an H200 with dynamic=True)
    input_ids, attention_mask = input_ids[:, :keep].contiguous(), attention_mask[:, :keep].contiguous()
    groups = length_groups(lens, launch_cost, input_ids.device.type)

    def padded(rows, s):
        """Whether a row has padding in its first s positions; where none has, the encoder gets no
        mask and adds no padding bias (no [B, H, S, S] bias to build and read; BART's attention
        runs unmasked)."""
        return any(counts[i] != s for i in rows)

    if not groups or len(groups) == 1:
        return encode(input_ids, attention_mask if padded(range(len(lens)), keep) else None), attention_mask
    out = None
    for rows in groups:
        s = max(1, max(lens[i] for i in rows))
        idx = torch.tensor(rows, device=input_ids.device)
        mask = attention_mask.index_select(0, idx)[:, :s].contiguous() if padded(rows, s) else None
        enc = encode(input_ids.index_select(0, idx)[:, :s].contiguous(), mask)
        if out is None:
            out = enc.new_zeros((input_ids.shape[0], keep, enc.shape[-1]))
        out[idx, :s] = enc
    return out, attention_mask
