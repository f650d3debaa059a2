"""Generation runtime: greedy, beam search, sampling and the logits processors, token for token
against HF transformers' generate (v5) on a tiny random T5.

The model is built from a T5Config with odd shapes (d_model 24, 3 heads of 6, d_ff 40, vocab 101)
and a larger init so its outputs vary; the EOS row of the (tied) shared embedding is replaced by
a scaled mix of rows of tokens the model often picks, so EOS wins at some steps and the EOS paths (finished rows, finished beams, padding) run.
HF's T5 generate breaks when the decoder has more layers than the encoder (its cache is sized by
num_layers), so the decoder here has fewer.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_registry

transformers = pytest.importorskip("transformers")
from transformers import GenerationConfig as HFGenerationConfig  # noqa: E402
from transformers import T5Config, T5ForConditionalGeneration  # noqa: E402
from transformers.generation import logits_process as hf_lp  # noqa: E402

from encdec_core.convert import load_source_model  # noqa: E402
from encdec_core.errors import ConfigError, EncDecError  # noqa: E402
from encdec_core.runtime import logits as lp  # noqa: E402
from encdec_core.runtime.generation import EagerRunner, GenerationConfig, generate  # noqa: E402

VOCAB, EOS, PAD, START = 101, 1, 0, 0
SPECIAL = dict(eos_token_id=EOS, pad_token_id=PAD, decoder_start_token_id=START)


def _tiny_t5(path, gen_config: dict | None = None):
    cfg = T5Config(vocab_size=VOCAB, d_model=24, d_kv=6, d_ff=40, num_layers=3, num_decoder_layers=2, num_heads=3,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20,
                   initializer_factor=3.0, **SPECIAL)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # EOS gets a scaled mix of rows the model likes: it wins at some steps only
        model.shared.weight[EOS] = model.shared.weight[[25, 70, 96]].mean(0) * 2.0
    model.save_pretrained(path)
    if gen_config is not None:
        (path / "generation_config.json").write_text(json.dumps(gen_config))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(HF model, our model, our Source) for the same weights."""
    path = tmp_path_factory.mktemp("t5gen")
    hf = _tiny_t5(path)
    ours, src, _ = load_source_model(path, reg=make_registry("encdec_t5.plugin"))
    return hf, ours, src


@pytest.fixture(scope="module")
def batch():
    """Three right-padded sources of lengths 9, 6 and 4."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def hf_generate(model, ids, mask, seed=None, decoder_input_ids=None, **kw):
    gc = HFGenerationConfig(**{**SPECIAL, **kw}, return_dict_in_generate=True, output_scores=True)
    if seed is not None:
        torch.manual_seed(seed)
    extra = {} if decoder_input_ids is None else {"decoder_input_ids": decoder_input_ids}
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, generation_config=gc, **extra)


def ours_generate(model, src, ids, mask, forced_bos_token_ids=None, runner=None, decoder_input_ids=None, **kw):
    gc = GenerationConfig.from_model(model.cfg, src.generation_config, **kw)
    return generate(model, ids, mask, gc, forced_bos_token_ids=forced_bos_token_ids, runner=runner,
                    decoder_input_ids=decoder_input_ids)


def assert_same(h, o, beam=False):
    assert torch.equal(h.sequences, o.sequences), f"\nHF:\n{h.sequences}\nours:\n{o.sequences}"
    if beam:
        torch.testing.assert_close(o.sequences_scores, h.sequences_scores, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- greedy
def test_greedy_matches_hf_and_exercises_eos(models, batch):
    hf, ours, src = models
    ids, mask = batch
    h = hf_generate(hf, ids, mask, max_new_tokens=15)
    o = ours_generate(ours, src, ids, mask, max_new_tokens=15)
    assert_same(h, o)
    # the EOS path ran: some row ended early and was padded, another ran to the limit
    lengths = [len(o.tokens(i)) for i in range(len(o))]
    assert min(lengths) < 15 and max(lengths) == 15, lengths
    assert o.sequences_scores is None and o.num_return_sequences == 1
    row = o.sequences[lengths.index(min(lengths))].tolist()
    end = row.index(EOS, 1)
    assert all(t == PAD for t in row[end + 1:]) and o.tokens(lengths.index(min(lengths))) == row[1:end]


def test_default_length_is_hf_default(models, batch):
    """Nothing sets a length: HF generates max_length 20 (+ the start token)."""
    hf, ours, src = models
    ids, mask = batch
    gc = GenerationConfig.from_model(ours.cfg, None)
    assert gc.limits() == (0, 21)
    h = hf_generate(hf, ids[2:, :4], mask[2:, :4])  # a request that does not stop before the limit
    o = generate(ours, ids[2:, :4], mask[2:, :4], gc)
    assert_same(h, o)
    assert o.sequences.shape == (1, 21)


# ----------------------------------------------------------------------------------------- beam
@pytest.mark.parametrize("kw", [
    dict(num_beams=4, num_return_sequences=2, length_penalty=1.7),
    dict(num_beams=4, num_return_sequences=2, length_penalty=0.5, early_stopping=True),
    dict(num_beams=4, num_return_sequences=3, length_penalty=2.0, early_stopping="never"),
    dict(num_beams=3, num_return_sequences=1, length_penalty=-0.7, early_stopping="never"),
], ids=["lp1.7", "early-true", "never-lp2", "never-neg-lp"])
def test_beam_matches_hf(models, batch, kw):
    hf, ours, src = models
    ids, mask = batch
    h = hf_generate(hf, ids, mask, max_new_tokens=11, **kw)
    o = ours_generate(ours, src, ids, mask, max_new_tokens=11, **kw)
    assert_same(h, o, beam=True)
    assert o.sequences.shape[0] == 3 * kw["num_return_sequences"]


def test_beam_with_eos_at_start_of_batch_and_eos_list(models, batch):
    """Two EOS ids (HF keeps 3 * num_beams candidates) and min_length through max_length."""
    hf, ours, src = models
    ids, mask = batch
    kw = dict(num_beams=3, num_return_sequences=2, eos_token_id=[EOS, 5], max_length=12, min_length=4)
    h = hf_generate(hf, ids, mask, **kw)
    o = ours_generate(ours, src, ids, mask, **kw)
    assert_same(h, o, beam=True)
    assert all(len(o.tokens(i)) >= 3 for i in range(len(o)))  # min_length 4 counts the start token


def test_small_topk_is_topk_with_ties_lowest_index_first():
    """The beam update's short-row top-k: torch.topk's indices where values are distinct (and the
    same in a batch of rows); equal values (here -1e9 placeholders, -inf and repeats) lowest index
    first, as a stable descending sort orders them."""
    from encdec_core.runtime.beam import small_topk

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 12, generator=g)
    for k in (1, 4, 12):
        assert torch.equal(small_topk(x, k), torch.topk(x, k).indices)
    t = torch.tensor([[0.5, -1e9, 2.0, -1e9, 2.0, float("-inf"), 0.5, float("-inf")],
                      [-1e9] * 8])
    ref = torch.sort(t, dim=-1, descending=True, stable=True).indices
    for k in (3, 6, 8):
        assert torch.equal(small_topk(t, k), ref[:, :k])
    assert small_topk(t, 6)[0].tolist() == [2, 4, 0, 6, 1, 3]


# ----------------------------------------------------------------------------------------- processors
@pytest.mark.parametrize("kw", [
    dict(num_beams=3, no_repeat_ngram_size=3, min_new_tokens=5, max_new_tokens=12),
    dict(no_repeat_ngram_size=2, max_new_tokens=12),
    dict(repetition_penalty=1.5, forced_bos_token_id=7, forced_eos_token_id=EOS, max_new_tokens=9),
    dict(num_beams=4, repetition_penalty=0.8, forced_bos_token_id=7, forced_eos_token_id=[EOS, 9],
         max_length=8, length_penalty=2.0, early_stopping=True),
    dict(min_new_tokens=6, max_new_tokens=8),
    dict(max_new_tokens=12, suppress_tokens=[25, 70], begin_suppress_tokens=[96, 3], bad_words_ids=[[40], [EOS]]),
    dict(num_beams=3, max_new_tokens=12, bad_words_ids=[[51, 96], [70, 70, 70], [96, 96]], suppress_tokens=[4]),
    dict(max_new_tokens=10, forced_bos_token_id=7, begin_suppress_tokens=[25, 70, 96], bad_words_ids=[[7, 25]]),
    dict(do_sample=True, top_k=20, max_new_tokens=10, bad_words_ids=[[90], [70, 51]], begin_suppress_tokens=[96]),
], ids=["beam-ngram3-minnew", "greedy-ngram2", "greedy-rep-forced", "beam-rep-forced", "greedy-minnew",
        "greedy-suppress-bad", "beam-bad-multi", "greedy-begin-after-forced-bos", "sample-bad"])
def test_processors_match_hf(models, batch, kw):
    hf, ours, src = models
    ids, mask = batch
    beam = kw.get("num_beams", 1) > 1
    h = hf_generate(hf, ids, mask, seed=7, **kw)
    o = ours_generate(ours, src, ids, mask, seed=7, **kw)
    assert_same(h, o, beam=beam)
    seqs = o.sequences.tolist()
    plain = ours_generate(ours, src, ids, mask, seed=7, **{k: v for k, v in kw.items() if k not in (
        "suppress_tokens", "begin_suppress_tokens", "bad_words_ids")})
    for i in range(len(o)):
        row = [START] + o.tokens(i)
        for t in kw.get("suppress_tokens", ()):
            assert t not in row[1:]
        if "begin_suppress_tokens" in kw:
            first = row[2] if kw.get("forced_bos_token_id") is not None else row[1]
            assert first not in kw["begin_suppress_tokens"]
        for w in kw.get("bad_words_ids", ()):
            if w != [EOS]:
                assert not any(row[j:j + len(w)] == w for j in range(len(row))), (w, row)
    if any(k in kw for k in ("suppress_tokens", "begin_suppress_tokens", "bad_words_ids")):
        assert not torch.equal(plain.sequences, o.sequences)  # the rules changed the outputs
    if "forced_bos_token_id" in kw:
        assert all(r[1] == 7 for r in seqs)
    if "min_new_tokens" in kw:
        assert all(len(o.tokens(i)) >= kw["min_new_tokens"] for i in range(len(o)))
    if kw.get("no_repeat_ngram_size"):
        n = kw["no_repeat_ngram_size"]
        for i in range(len(o)):
            row = [START] + o.tokens(i)
            grams = [tuple(row[j:j + n]) for j in range(len(row) - n + 1)]
            assert len(grams) == len(set(grams)), row


def test_processors_equal_hf_processors():
    """Each tensor rule against HF's processor on random scores (ties and ids beyond the vocab too)."""
    g = torch.Generator().manual_seed(3)
    seqs = torch.randint(0, 12, (5, 9), generator=g)
    scores = torch.randn(5, 12, generator=g)
    scores[0, :4] = 0.5  # ties
    for pen in (1.3, 0.7):
        ref = hf_lp.RepetitionPenaltyLogitsProcessor(pen)(seqs, scores.clone())
        assert torch.equal(lp.repetition_penalty(seqs, scores, pen), ref)
    for n in (1, 2, 3):
        ref = hf_lp.NoRepeatNGramLogitsProcessor(n)(seqs, scores.clone())
        assert torch.equal(lp.no_repeat_ngram(seqs, scores, n), ref)
    for k, keep in ((1, 1), (3, 1), (2, 4), (50, 1)):
        ref = hf_lp.TopKLogitsWarper(k, min_tokens_to_keep=keep)(seqs, scores.clone())
        assert torch.equal(lp.top_k(scores, k, keep), ref)
    for p, keep in ((0.1, 1), (0.6, 1), (0.9, 3), (1.0, 1)):
        ref = hf_lp.TopPLogitsWarper(p, min_tokens_to_keep=keep)(seqs, scores.clone())
        assert torch.equal(lp.top_p(scores, p, keep), ref)
    ref = hf_lp.ForcedBOSTokenLogitsProcessor(4)(seqs[:, :1], scores.clone())
    assert torch.equal(lp.force_tokens(scores, torch.tensor([4])), ref)
    rows = torch.tensor([4, -1, 7, -1, 0])
    per_row = lp.force_tokens_per_row(scores, rows)
    for i, t in enumerate(rows.tolist()):
        if t < 0:
            assert torch.equal(per_row[i], scores[i])
        else:
            assert per_row[i, t] == 0 and torch.isinf(per_row[i]).sum() == 11


def _top_p_stable(scores, p, keep):
    """HF's TopPLogitsWarper with a stable sort: the order CUDA's sort gives rows of over 4096 scores."""
    ascending, order = torch.sort(scores, descending=False, stable=True)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - p)
    drop[..., -keep:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


@pytest.mark.parametrize("kind", ["normal", "bf16", "ties", "neg-inf", "nan"])
def test_top_k_top_p_from_candidates_equals_the_whole_sort(kind):
    """``top_k_top_p`` (the fused sampling graph's top-k then top-p from the max(2k, 128) best)
    equals top_k then top_p with a stable sort bit for bit wherever it reports no overflow, and reports
    overflow exactly where top-k keeps the last candidate (ties at the k-th) of a row that has more
    scores than candidates, or the row holds a nan."""
    g = torch.Generator().manual_seed(7)
    seen_overflow = seen_exact = 0
    for trial in range(40):
        n, v = 6, int(torch.randint(60, 3000, (1,), generator=g))
        s = torch.randn(n, v, generator=g) * 3
        if kind == "bf16":
            s = s.bfloat16().float()
        elif kind == "ties":
            s = (s * 2).round() / 2
            s[0] = 0.0  # a row where every score ties
        elif kind == "neg-inf":
            s[:, ::3] = float("-inf")  # banned tokens
        elif kind == "nan":
            s[1, 7] = float("nan")
        k = int(torch.randint(1, 60, (1,), generator=g))
        p = float(torch.rand((), generator=g)) * 0.98 + 0.01
        keep = 1 + trial % 3
        got, overflow = lp.top_k_top_p(s, k, p, keep)
        ref = _top_p_stable(lp.top_k(s, k, keep), p, keep)
        kk = max(k, keep)
        m = min(v, max(2 * kk, lp.MIN_CANDIDATES))
        kept = torch.isfinite(lp.top_k(s, k, keep)).sum(-1)
        want = ((kept >= m) & (m < v)) | torch.isnan(s).any(-1)
        assert torch.equal(overflow, want), (trial, k, v)
        for r in range(n):
            if not overflow[r]:
                assert torch.equal(got[r], ref[r]), (trial, r, k, p, keep)
                seen_exact += 1
        seen_overflow += int(overflow.sum())
    assert seen_exact > 100
    if kind in ("ties", "nan"):
        assert seen_overflow > 0


def test_draw_is_multinomials_draw():
    """``draw`` (the fused sampling graph's) = ``torch.multinomial(probs, 1)``: the same token per row
    and the same generator state after, for several shapes and seeds."""
    for n, v in ((1, 50), (7, 3000), (64, 257)):
        for seed in range(5):
            probs = torch.softmax(torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 4, dim=-1)
            probs[0, : v // 2] = 0.0  # zeros are never drawn
            a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            want = torch.multinomial(probs, 1, generator=a).squeeze(1)
            assert torch.equal(lp.draw(probs, b), want) and torch.equal(a.get_state(), b.get_state())


# ----------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("kw", [
    dict(do_sample=True, top_k=10, top_p=0.9, temperature=0.8, num_return_sequences=2),
    dict(do_sample=True),  # HF's default top_k 50
    dict(do_sample=True, num_beams=3, top_k=10, temperature=1.3),
], ids=["topk-topp-temp", "defaults", "beam-sample"])
def test_sampling_matches_hf_with_the_same_seed(models, batch, kw):
    """Same op order as HF (processors, softmax, multinomial) and a generator seeded like
    torch.manual_seed: on CPU the sampled tokens are identical."""
    hf, ours, src = models
    ids, mask = batch
    h = hf_generate(hf, ids, mask, seed=1234, max_new_tokens=10, **kw)
    o = ours_generate(ours, src, ids, mask, seed=1234, max_new_tokens=10, **kw)
    assert_same(h, o, beam=kw.get("num_beams", 1) > 1)


def test_sampling_is_reproducible_and_seed_dependent(models, batch):
    _, ours, src = models
    ids, mask = batch
    kw = dict(do_sample=True, temperature=1.5, top_k=0, max_new_tokens=12, num_return_sequences=3)
    torch.manual_seed(99)  # the global RNG must not matter when a seed is given
    a = ours_generate(ours, src, ids, mask, seed=5, **kw)
    torch.manual_seed(100)
    b = ours_generate(ours, src, ids, mask, seed=5, **kw)
    c = ours_generate(ours, src, ids, mask, seed=6, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)
    assert len({tuple(a.tokens(i)) for i in range(len(a))}) > 1  # samples of one request differ


def test_sampling_without_seed_on_several_ranks_takes_rank_0s_seed(models, batch, monkeypatch):
    """Ranks of a TP/PP group must draw the same tokens: without a seed, rank 0 draws one from torch's
    global generator and broadcasts it (a fixed seed 0 gave every unseeded run the same "sample")."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from encdec_core.parallel.context import ParallelContext

    _, ours, src = models
    ids, mask = batch
    sent = []
    monkeypatch.setattr(dist, "broadcast", lambda t, src: sent.append((int(t), src)))  # as rank 0 sends it
    ctx = SimpleNamespace(world_size=2, distributed=True, rank=0, device=None)
    ctx.shared_seed = lambda seed: ParallelContext.shared_seed(ctx, seed)
    two_ranks = SimpleNamespace(cfg=ours.cfg, device=ours.device, ctx=ctx)
    gc = GenerationConfig.from_model(ours.cfg, None, do_sample=True, top_k=0, temperature=1.5, max_new_tokens=10)
    outs = []
    for global_seed in (1, 2, 1):
        torch.manual_seed(global_seed)
        outs.append(generate(two_ranks, ids, mask, gc, runner=EagerRunner(ours)).sequences)
    assert not torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert [s for _, s in sent] == [0, 0, 0] and sent[0][0] == sent[2][0] != sent[1][0]
    assert torch.equal(outs[0], generate(ours, ids, mask, gc.replace(seed=sent[0][0])).sequences)
    generate(two_ranks, ids, mask, gc.replace(do_sample=False), runner=EagerRunner(ours))
    assert len(sent) == 3  # greedy decoding sends nothing


# ----------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=12),
    dict(max_new_tokens=12, num_beams=4, num_return_sequences=2, length_penalty=1.3),
], ids=["greedy", "beam"])
def test_padded_batch_equals_each_alone(models, batch, kw):
    _, ours, src = models
    ids, mask = batch
    together = ours_generate(ours, src, ids, mask, **kw)
    n = together.num_return_sequences
    for b in range(ids.shape[0]):
        length = int(mask[b].sum())
        alone = ours_generate(ours, src, ids[b:b + 1, :length], mask[b:b + 1, :length], **kw)
        assert together.request_tokens(b) == alone.all_tokens()
        if alone.sequences_scores is not None:
            torch.testing.assert_close(together.sequences_scores[b * n:(b + 1) * n], alone.sequences_scores,
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("beams", [1, 3])
def test_per_request_forced_bos(models, batch, beams):
    """One batch, a different first token per request; None falls back to the config's value."""
    hf, ours, src = models
    ids, mask = batch
    kw = dict(max_new_tokens=8, num_beams=beams)
    out = ours_generate(ours, src, ids, mask, forced_bos_token_ids=[7, None, 9], forced_bos_token_id=33, **kw)
    for b, want in enumerate([7, 33, 9]):
        length = int(mask[b].sum())
        h = hf_generate(hf, ids[b:b + 1, :length], mask[b:b + 1, :length], forced_bos_token_id=want, **kw)
        assert out.tokens(b)[0] == want
        assert out.tokens(b) == hf_tokens(h.sequences, 0)
    # with no config value, None rows are not forced
    free = ours_generate(ours, src, ids, mask, forced_bos_token_ids=[None, 9, None], **kw)
    plain = ours_generate(ours, src, ids, mask, **kw)
    assert free.tokens(0) == plain.tokens(0) and free.tokens(2) == plain.tokens(2)
    assert free.tokens(1)[0] == 9


def hf_tokens(seqs, i):
    """HF's row i without the start token, cut at EOS (what out.tokens(i) means)."""
    row = seqs[i, 1:].tolist()
    return row[:row.index(EOS)] if EOS in row else row


@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=8),
    dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, length_penalty=1.5, min_new_tokens=2),
    dict(max_length=9, num_beams=3, no_repeat_ngram_size=2),
], ids=["greedy", "beam-minnew", "beam-maxlen-ngram"])
@pytest.mark.parametrize("with_start", [False, True])
def test_decoder_prefix_matches_hf(models, batch, kw, with_start):
    """A decoder prefix: HF puts the start token in front unless the rows already begin with it."""
    hf, ours, src = models
    ids, mask = batch
    prefix = torch.tensor([[42, 17], [42, 17], [42, 17]])
    if with_start:
        prefix = torch.cat([torch.full((3, 1), START), prefix], dim=1)
    h = hf_generate(hf, ids, mask, decoder_input_ids=prefix, **kw)
    o = ours_generate(ours, src, ids, mask, decoder_input_ids=prefix, **kw)
    assert_same(h, o, beam=kw.get("num_beams", 1) > 1)
    assert o.sequences[:, :3].tolist() == [[START, 42, 17]] * len(o)
    assert all(o.tokens(i)[:2] == [42, 17] for i in range(len(o)))


# ----------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=15),
    dict(max_new_tokens=12, no_repeat_ngram_size=2, repetition_penalty=1.3, forced_bos_token_id=7),
    dict(do_sample=True, top_k=10, top_p=0.9, temperature=0.8, num_return_sequences=2, max_new_tokens=10),
    dict(num_beams=4, num_return_sequences=2, length_penalty=1.7, max_new_tokens=11),
    dict(num_beams=3, eos_token_id=[EOS, 9], min_length=3, max_length=12, num_return_sequences=3),
    dict(num_beams=4, repetition_penalty=0.8, forced_bos_token_id=7, forced_eos_token_id=[EOS, 9],
         max_length=8, length_penalty=2.0, early_stopping=True),
    dict(do_sample=True, num_beams=3, top_k=10, temperature=1.3, max_new_tokens=10),
], ids=["greedy", "greedy-processors", "sampling", "beam", "beam-eos-list", "beam-forced", "beam-sample"])
def test_token_scores_match_hf_transition_scores(models, batch, kw):
    """output_scores: the same tokens, and each generated token's log-prob equals HF's
    compute_transition_scores (greedy / sampling: normalize_logits=True over the processed scores;
    beam search: the processed log-probs along beam_indices), up to and including the EOS that ends a
    row; a beam hypothesis' score is the sum of its token log-probs over its length ** length_penalty."""
    hf, ours, src = models
    ids, mask = batch
    beam = kw.get("num_beams", 1) > 1
    h = hf_generate(hf, ids, mask, seed=1234, **kw)
    plain = ours_generate(ours, src, ids, mask, seed=1234, **kw)
    gc = GenerationConfig.from_model(ours.cfg, src.generation_config, seed=1234, **kw)
    o = generate(ours, ids, mask, gc, output_scores=True)
    assert_same(h, o, beam=beam)
    assert torch.equal(o.sequences, plain.sequences) and plain.token_scores is None
    if beam:
        ref = hf.compute_transition_scores(h.sequences, h.scores, h.beam_indices, normalize_logits=False)
    else:
        ref = hf.compute_transition_scores(h.sequences, h.scores, normalize_logits=True)
    ends = []
    for i in range(len(o)):
        lps = o.token_logprobs(i)
        toks = o.tokens(i)
        ended = len(lps) == len(toks) + 1
        assert ended or len(lps) == len(toks)
        ends.append(ended)
        if ended:
            assert o.sequences[i, len(lps)] in (EOS, 9)
        torch.testing.assert_close(torch.tensor(lps), ref[i, : len(lps)], atol=1e-5, rtol=1e-5)
        if beam:
            assert o.score(i) == pytest.approx(sum(lps) / len(lps) ** gc.length_penalty, abs=1e-5)
        else:
            assert o.score(i) == pytest.approx(sum(lps), abs=1e-6)
        # past a row's end, only zeros
        assert not o.token_scores[i, o.prompt(i) + len(lps):].any()
    if kw.get("max_new_tokens") == 15 or "eos_token_id" in kw:
        assert any(ends) and not all(ends)  # rows ending at an EOS and rows cut by the length limit


def test_token_scores_with_a_decoder_prefix_and_merged_batches(models, batch):
    """The prefix gets no scores (they start after it); outputs generated in several batches
    (merge_outputs) keep each row's scores; without output_scores, asking for them is refused."""
    from encdec_core.runtime.generation import merge_outputs

    hf, ours, src = models
    ids, mask = batch
    prefix = torch.tensor([[42, 17]] * 3)
    gc = GenerationConfig.from_model(ours.cfg, src.generation_config, max_new_tokens=6)
    whole = generate(ours, ids, mask, gc, decoder_input_ids=prefix, output_scores=True)
    h = hf_generate(hf, ids, mask, decoder_input_ids=prefix, max_new_tokens=6)
    ref = hf.compute_transition_scores(h.sequences, h.scores, normalize_logits=True)
    for i in range(3):
        lps = whole.token_logprobs(i)
        assert whole.tokens(i)[:2] == [42, 17] and len(lps) <= 6
        torch.testing.assert_close(torch.tensor(lps), ref[i, : len(lps)], atol=1e-5, rtol=1e-5)
    parts = [([2, 0], generate(ours, ids[[2, 0]], mask[[2, 0]], gc, decoder_input_ids=prefix[:2], output_scores=True)),
             ([1], generate(ours, ids[1:2], mask[1:2], gc, decoder_input_ids=prefix[:1], output_scores=True))]
    merged = merge_outputs(parts, 3, PAD)
    for i in range(3):
        assert merged.tokens(i) == whole.tokens(i)
        assert merged.token_logprobs(i) == pytest.approx(whole.token_logprobs(i), abs=1e-5)
    plain = generate(ours, ids, mask, gc)
    with pytest.raises(EncDecError, match="output_scores=True"):
        plain.token_logprobs(0)
    with pytest.raises(EncDecError, match="output_scores = 1"):
        generate(ours, ids, mask, gc, output_scores=1)


# ----------------------------------------------------------------------------------------- config
def test_generation_config_json_is_honoured_like_hf(tmp_path, batch):
    """bart-large-cnn style defaults from generation_config.json, no explicit options on either side."""
    gen = dict(num_beams=4, length_penalty=2.0, min_length=5, max_length=12, no_repeat_ngram_size=3,
               early_stopping=True, forced_bos_token_id=7, forced_eos_token_id=EOS, **SPECIAL,
               transformers_version="5.0.0")
    _tiny_t5(tmp_path, gen)
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ours, src, _ = load_source_model(tmp_path, reg=make_registry("encdec_t5.plugin"))
    assert src.generation_config["num_beams"] == 4
    ids, mask = batch
    with torch.no_grad():
        h = hf.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True)
    gc = GenerationConfig.from_model(ours.cfg, src.generation_config)
    assert (gc.num_beams, gc.length_penalty, gc.no_repeat_ngram_size, gc.limits()) == (4, 2.0, 3, (5, 12))
    o = generate(ours, ids, mask, gc)
    assert_same(h, o, beam=True)
    # an explicit option overrides the file; None means "not given"
    with torch.no_grad():
        h2 = hf.generate(ids, attention_mask=mask, num_beams=2, max_new_tokens=6, return_dict_in_generate=True,
                         output_scores=True)
    o2 = ours_generate(ours, src, ids, mask, num_beams=2, max_new_tokens=6, length_penalty=None)
    assert_same(h2, o2, beam=True)


@pytest.mark.parametrize("extra", [
    {"eos_token_id": [EOS, 25]},
    {"num_beams": 3, "max_length": 10, "no_repeat_ngram_size": 2, "length_penalty": 1.5, "early_stopping": True},
])
def test_config_json_stands_in_for_a_missing_generation_config(tmp_path, batch, extra):
    """No generation_config.json: HF loads config.json as the generation config (older checkpoints keep
    their beam count, lengths and EOS list there). T5 took only the model config's first EOS id then."""
    _tiny_t5(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, **extra}))
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ours, src, _ = load_source_model(tmp_path, reg=make_registry("encdec_t5.plugin"))
    assert {k: src.generation_config[k] for k in extra} == extra
    ids, mask = batch
    with torch.no_grad():
        h = hf.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True)
    o = ours_generate(ours, src, ids, mask)
    assert_same(h, o, beam="num_beams" in extra)
    if "num_beams" in extra:
        assert h.sequences.shape[1] == 10
    else:
        assert (h.sequences[:, 1:] == 25).any(), "the second EOS id should end a row"


def test_generation_config_resolution(models):
    _, ours, _ = models
    cfg = ours.cfg
    gc = GenerationConfig.from_model(cfg, {"max_length": 30, "min_length": 3, "num_beams": 2}, max_new_tokens=5)
    assert gc.limits() == (3, 6) and gc.num_beams == 2  # max_new_tokens wins over max_length
    assert GenerationConfig.from_model(cfg, None, min_new_tokens=4).limits()[0] == 5
    gc = GenerationConfig.from_model(cfg, None)
    assert (gc.eos_token_ids, gc.pad_id, gc.decoder_start_token_id, gc.top_k) == ((EOS,), PAD, START, 50)
    assert GenerationConfig.from_model(cfg, None, pad_token_id=None).pad_id == PAD
    assert GenerationConfig(eos_token_id=[2, 3], decoder_start_token_id=0).pad_id == 2  # HF: pad <- first eos


@pytest.mark.parametrize("gen, kw, words", [
    ({}, dict(temperature=0.0, do_sample=True), ["generate option", "temperature", "0.0"]),
    ({}, dict(num_beams=2, num_return_sequences=3), ["num_return_sequences", "3", "num_beams"]),
    ({}, dict(num_return_sequences=2), ["num_return_sequences", "greedy"]),
    ({}, dict(early_stopping="sometimes"), ["early_stopping", "sometimes"]),
    ({}, dict(top_p=1.5, do_sample=True), ["top_p", "1.5"]),
    ({}, dict(max_new_tokens=0), ["max_new_tokens", "0"]),
    ({}, dict(num_beamz=2), ["unknown", "num_beamz"]),
    ({"num_beam_groups": 2, "diversity_penalty": 0.5}, {}, ["generation_config.json", "num_beam_groups", "2"]),
    ({"sequence_bias": [[[3], 1.0]]}, {}, ["sequence_bias", "[[[3], 1.0]]"]),
    ({"suppress_tokens": [3, -2]}, {}, ["generation_config.json", "suppress_tokens", "[3, -2]", ">= 0"]),
    # HF 5.24 refuses a forced token that is suppressed (every logit -inf at that step) up front too
    ({}, dict(forced_eos_token_id=EOS, suppress_tokens=[EOS, 4]), ["generate option", "suppress_tokens", "[1, 4]",
                                                                  "forced_eos_token_id (1)", "min_new_tokens"]),
    ({"forced_bos_token_id": 7, "suppress_tokens": [7]}, {}, ["generation_config.json", "suppress_tokens",
                                                             "forced_bos_token_id (7)"]),
    ({}, dict(begin_suppress_tokens=[-1]), ["generate option", "begin_suppress_tokens", "[-1]"]),
    ({}, dict(bad_words_ids=[3, 4]), ["bad_words_ids", "[3, 4]", "lists of token ids"]),
    ({}, dict(bad_words_ids=[[3], []]), ["bad_words_ids", "[[3], []]", "non-empty lists"]),
    ({"num_beams": "4"}, {}, ["generation_config.json", "num_beams", "'4'"]),
])
def test_bad_generation_options_are_named(models, gen, kw, words):
    _, ours, _ = models
    with pytest.raises(ConfigError) as e:
        GenerationConfig.from_model(ours.cfg, gen, **kw)
    msg = str(e.value)
    assert all(w in msg for w in words), msg


def test_temperature_and_length_penalty_bounds():
    """Sampling takes temperatures from 1e-5 (below, the fp32 scores / temperature overflow: an
    internal error in multinomial); beam search takes |length_penalty| up to 64 / log2(max_length),
    as the message shows it (beyond, length ** length_penalty leaves fp32's range: every score -0.0,
    then an OverflowError), for either sign; greedy decoding reads neither."""
    from encdec_core.runtime.generation import length_penalty_bound

    def gc(**kw):
        return GenerationConfig(decoder_start_token_id=0, **kw)
    gc(do_sample=True, temperature=1e-5)
    with pytest.raises(ConfigError, match=r"'temperature' = 9e-06: expected a number >= 1e-05"):
        gc(do_sample=True, temperature=9e-6)
    gc(temperature=1e-308)  # not sampling: not read
    assert [length_penalty_bound(n) for n in (2, 9, 21, 201, 1025)] == [64.0, 20.18, 14.57, 8.36, 6.39]
    for lp in (20.18, -20.18):
        gc(num_beams=2, max_new_tokens=8, length_penalty=lp)
    for lp in (20.19, -20.19, 400):
        with pytest.raises(ConfigError, match=rf"'length_penalty' = {lp}: expected a number in \[-20.18, 20.18\] "
                                              r"for beam search with max_length 9"):
            gc(num_beams=2, max_new_tokens=8, length_penalty=lp)
    gc(max_new_tokens=8, length_penalty=400)  # greedy: not read


def test_numpy_and_0d_tensor_options_are_numbers(models, batch):
    """Options given as numpy scalars or 0-d arrays / tensors (HF's generate takes them) are read as the
    Python numbers they hold: the same config and the same tokens as plain numbers; a tensor of one
    element that is not 0-d is still refused, naming the option."""
    import numpy as np

    _, ours, _ = models
    ids, mask = batch
    plain = dict(max_new_tokens=5, num_beams=2, length_penalty=0.5, no_repeat_ngram_size=2, do_sample=False)
    wrapped = dict(max_new_tokens=np.int64(5), num_beams=torch.tensor(2), length_penalty=np.float32(0.5),
                   no_repeat_ngram_size=np.array(2), do_sample=np.bool_(False))
    a = GenerationConfig.from_model(ours.cfg, None, **plain)
    b = GenerationConfig.from_model(ours.cfg, None, **wrapped)
    assert [(type(getattr(b, k)), getattr(b, k)) for k in plain] == [(type(v), v) for v in plain.values()]
    assert torch.equal(generate(ours, ids, mask, a).sequences, generate(ours, ids, mask, b).sequences)
    with pytest.raises(ConfigError, match=r"'max_new_tokens' = tensor\(\[5\]\): expected a positive integer"):
        GenerationConfig.from_model(ours.cfg, None, max_new_tokens=torch.tensor([5]))


def test_bad_inputs_are_named(models, batch):
    _, ours, _ = models
    ids, mask = batch
    gc = GenerationConfig.from_model(ours.cfg, None, max_new_tokens=3)
    cases = [
        (dict(input_ids=ids[0], attention_mask=None), "2-D"),
        (dict(input_ids=ids.clone().fill_(VOCAB), attention_mask=mask), f"[0, {VOCAB})"),
        (dict(input_ids=ids, attention_mask=mask[:, :4]), "attention_mask"),
        (dict(input_ids=ids, attention_mask=mask, forced_bos_token_ids=[1, 2]), "one per request"),
        (dict(input_ids=ids, attention_mask=mask, forced_bos_token_ids=[1, 2, VOCAB]), "forced_bos_token_ids[2]"),
        (dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:2]), "decoder_input_ids"),
        (dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5], gc=gc.replace(max_new_tokens=None,
                                                                                           max_length=4)),
         "max_length 4 leaves no room"),
    ]
    for kw, words in cases:
        with pytest.raises(EncDecError, match=None) as e:
            generate(ours, **{"gc": gc, **kw})
        assert words in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="eos_token_id"):
        generate(ours, ids, mask, gc.replace(eos_token_id=VOCAB + 5))


# ----------------------------------------------------------------------------------------- runner
class CountingRunner(EagerRunner):
    """A stand-in for another runner (e.g. CUDA graphs): generate must go through the interface."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = {"prefill": [], "step": 0, "reorder": 0}

    def prefill(self, input_ids, attention_mask, expand, max_len):
        self.calls["prefill"].append((tuple(input_ids.shape), expand, max_len))
        super().prefill(input_ids, attention_mask, expand, max_len)

    def step(self, tokens):
        self.calls["step"] += 1
        assert tokens.dim() == 1
        out = super().step(tokens)
        assert out.dtype == torch.float32 and out.shape == (tokens.shape[0], VOCAB)
        return out

    def reorder(self, index):
        self.calls["reorder"] += 1
        super().reorder(index)


def test_generate_runs_through_the_runner(models, batch):
    _, ours, src = models
    ids, mask = batch
    runner = CountingRunner(ours)
    out = ours_generate(ours, src, ids, mask, runner=runner, num_beams=4, num_return_sequences=2,
                        max_new_tokens=9, early_stopping="never")
    assert runner.calls["prefill"] == [((3, 9), 4, 10)]
    steps = out.sequences.shape[1] - 1
    assert runner.calls["step"] == runner.calls["reorder"] >= steps
    ref = ours_generate(ours, src, ids, mask, num_beams=4, num_return_sequences=2, max_new_tokens=9,
                        early_stopping="never")
    assert torch.equal(out.sequences, ref.sequences)
