"""Mixed source lengths: the encoder runs once per length group (runtime.encode), with the results of
one call over the padded batch."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from encdec_core.runtime.encode import _EDGES, encode_grouped, plan_groups, row_lengths

from test_cuda_runner import _gc, _tiny


def _cost(groups, lengths, launch_cost):
    return sum(len(g) * max(max(1, lengths[i]) for i in g) + launch_cost for g in groups)


def _brute_force(lengths, launch_cost):
    """Least cost over every subset of the edge cuts (the search space plan_groups optimises)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sl = [max(1, lengths[i]) for i in order]
    cuts = sorted({sum(1 for x in sl if x <= e) for e in _EDGES} - {0, len(sl)})
    best = float("inf")
    for r in range(len(cuts) + 1):
        for chosen in itertools.combinations(cuts, r):
            pts = [0, *chosen, len(sl)]
            best = min(best, _cost([order[a:b] for a, b in zip(pts, pts[1:])], lengths, launch_cost))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_plan_groups_is_optimal_and_a_partition(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(0, 200) for _ in range(rng.randint(2, 40))]
    for launch_cost in (1, 32, 300):
        groups = plan_groups(lengths, launch_cost)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert _cost(groups, lengths, launch_cost) == _brute_force(lengths, launch_cost)
        # groups are contiguous in length order: every row of a group is at most the next group's shortest
        for a, b in zip(groups, groups[1:]):
            assert max(lengths[i] for i in a) <= min(lengths[i] for i in b)


def test_plan_groups_keeps_one_group_when_splitting_does_not_pay():
    assert plan_groups([60] * 8, 1) == [list(range(8))]
    assert plan_groups([10, 60, 12, 58], 2048) == [[0, 1, 2, 3]]  # original order kept
    assert plan_groups([10, 60, 12, 58], 1) == [[0, 2], [3, 1]]


def test_row_lengths_counts_to_the_last_real_position():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert row_lengths(mask).tolist() == [3, 3, 0, 4]


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encode_grouped_equals_one_padded_call(family):
    model = _tiny(family, "cpu")
    g = torch.Generator().manual_seed(3)
    lens = [40, 5, 17, 33, 9, 40, 2, 26]
    ids = torch.randint(4, model.cfg.vocab_size, (len(lens), 48), generator=g)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lens):
        mask[r, :n] = 1
        ids[r, n:] = model.cfg.pad_token_id
    calls, masks = [], []

    def encode(i, m):
        calls.append(tuple(i.shape))
        masks.append(m is not None)
        # contiguous inputs: a compiled encoder guards on strides (a sliced view recompiles it)
        assert i.is_contiguous() and (m is None or m.is_contiguous())
        # no mask exactly where the group has no padding (padded positions hold the pad id)
        assert (m is None) == bool((i != model.cfg.pad_token_id).all()), (i.shape, m)
        return model.encode(i, m)

    with torch.no_grad():
        ref = model.encode(ids[:, :40], mask[:, :40])
        out, m = encode_grouped(encode, ids, mask, launch_cost=1)
        assert len(calls) > 1 and all(s[1] < 40 for s in calls[:-1])  # several calls, the short ones shorter
        assert not all(masks) and any(masks)  # groups of equal lengths go without a mask
        assert out.shape == ref.shape and torch.equal(m, mask[:, :40])
        valid = m.bool()
        torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(out).all()  # padding: the encoder's values inside a group, zeros past it
        assert not out[1, 16:].any()  # row 1 (5 tokens) is in a group shorter than 16: zeros after it
        calls.clear()
        one, m1 = encode_grouped(encode, ids, mask, launch_cost=0)  # never split: the trailing cut only
        assert calls == [(8, 40)] and torch.equal(one, ref) and torch.equal(m1, m)


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_generate_with_grouped_encoder_equals_one_call(family, device):
    """Greedy and beam tokens with the encoder split into length groups (a launch cost of one token
    splits at every edge) equal those of one encoder call, on the eager path and the static runner
    (on CUDA: compiled encoder and step, CUDA graphs)."""
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.generation import generate

    torch.backends.cuda.matmul.allow_tf32 = False
    model = _tiny(family, device)
    cfg = model.cfg
    g = torch.Generator().manual_seed(5)
    lens = [30, 4, 19, 11, 30, 7]
    ids = torch.randint(4, cfg.vocab_size, (len(lens), 34), generator=g)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lens):
        mask[r, :n] = 1
        ids[r, n:] = cfg.pad_token_id
    ids, mask = ids.to(device), mask.to(device)
    on_gpu = device == "cuda"
    kw = dict(compile=on_gpu, use_graphs=on_gpu)
    split = CudaGraphRunner(model, 18, 16, 64, encoder_launch_cost=1, **kw)
    whole = CudaGraphRunner(model, 18, 16, 64, encoder_launch_cost=0, **kw)
    for kw in (dict(max_new_tokens=12), dict(max_new_tokens=12, num_beams=3)):
        gc = _gc(cfg, **kw)
        ref = generate(model, ids, mask, gc, runner=whole).sequences
        assert torch.equal(generate(model, ids, mask, gc, runner=split).sequences, ref), kw
        assert torch.equal(generate(model, ids, mask, gc).sequences, ref), kw  # eager runner (CPU default cost)
    assert torch.equal(split.greedy(ids, mask, max_new_tokens=12), whole.greedy(ids, mask, max_new_tokens=12))


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_unpadded_rows_encode_without_a_mask(family):
    """Rows without padding reach the encoder with mask None (no padding bias: BART's attention runs
    unmasked, T5's relative bias is broadcast over the batch); the output is the masked call's."""
    model = _tiny(family, "cpu")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(4, model.cfg.vocab_size, (3, 24), generator=g)
    seen = []

    def encode(i, m):
        seen.append(m)
        return model.encode(i, m)

    with torch.no_grad():
        out, m = encode_grouped(encode, ids, torch.ones_like(ids))
        assert seen == [None] and torch.equal(m, torch.ones_like(ids))
        torch.testing.assert_close(out, model.encode(ids, torch.ones_like(ids)), rtol=1e-5, atol=1e-5)
        # a hole inside a row keeps the mask, though the row's last position is real
        holed = torch.ones_like(ids)
        holed[1, 3] = 0
        seen.clear()
        encode_grouped(encode, ids, holed)
        assert len(seen) == 1 and torch.equal(seen[0], holed)
