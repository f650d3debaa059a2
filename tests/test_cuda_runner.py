"""The CUDA graph runner gives the eager path's tokens (greedy, beam, padding) and stays finite in fp16.

The CUDA cases are skipped without CUDA (run them on a GPU machine: PYTHONPATH=.:families pytest
tests/test_cuda_runner.py); the "cpu-static" case runs the same static step and fused greedy
selection without graphs or compilation, so CI checks the logic too.
"""
from __future__ import annotations

import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MODES = [pytest.param("cpu-static", id="cpu-static"),
         pytest.param("cuda-graph", marks=[CUDA, pytest.mark.gpu], id="cuda-graph"),
         pytest.param("cuda-compiled", marks=[CUDA, pytest.mark.gpu], id="cuda-compiled")]


def _runner(model, mode, *a, **kw):
    from encdec_core.runtime.cuda import CudaGraphRunner

    if mode == "cpu-static":
        return CudaGraphRunner(model, *a, compile=False, use_graphs=False, **kw)
    return CudaGraphRunner(model, *a, compile=mode == "cuda-compiled", **kw)


def _tiny(family: str, device="cuda", **over):
    import importlib

    from encdec_core.benchmark import init_random
    from encdec_core.model import build_model

    mod = importlib.import_module(f"encdec_{family}.plugin")
    fam = {"t5": "T5", "bart": "BART"}[family]
    fam = getattr(mod, fam)
    preset = {"t5": "flan-t5-small", "bart": "bart-base"}[family]
    src = dict(fam.presets[preset])
    cfg = fam.make_config(src).replace(**{**dict(encoder_layers=2, decoder_layers=2, vocab_size=512,
                                                 max_position_embeddings=128), **over})
    if family == "t5":
        cfg = cfg.replace(d_model=128, head_dim=32, encoder_heads=4, decoder_heads=4, encoder_ffn_dim=256,
                          decoder_ffn_dim=256)
    else:
        cfg = cfg.replace(d_model=128, head_dim=32, encoder_heads=4, decoder_heads=4, encoder_ffn_dim=256,
                          decoder_ffn_dim=256, final_logits_bias=False)
    model = build_model(cfg, dtype=torch.float32, device=device)
    init_random(model, seed=1, std=0.08)
    model.init_buffers()
    return model.eval()


def _inputs(cfg, b=3, s=13, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, cfg.vocab_size, (b, s), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, b):  # mixed lengths, right padding
        n = s - 3 * i
        ids[i, n:] = cfg.pad_token_id
        mask[i, n:] = 0
    return ids.to(device), mask.to(device)


def _ragged(cfg, b, s, seed, device):
    """[b, s] random ids with right padding: row i keeps s - i % 8 tokens (every row some)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, cfg.vocab_size, (b, s), generator=g)
    mask = torch.ones_like(ids)
    for i in range(b):
        ids[i, s - i % 8:] = cfg.pad_token_id
        mask[i, s - i % 8:] = 0
    return ids.to(device), mask.to(device)


def _gc(cfg, **kw):
    from encdec_core.runtime.generation import GenerationConfig

    return GenerationConfig.from_model(cfg, None, **kw)


def _setup(family, mode, **runner_kw):
    """(device, tiny model, its config, padded inputs, a runner for 16 rows) for a test mode."""
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cpu" if mode == "cpu-static" else "cuda"
    model = _tiny(family, dev)
    ids, mask = _inputs(model.cfg, device=dev)
    return dev, model, model.cfg, ids, mask, _runner(model, mode, 16, 24, 32, **runner_kw)


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("mode", MODES)
def test_greedy_and_beam_match_eager(family, mode):
    from encdec_core.runtime.generation import generate

    dev, model, cfg, ids, mask, runner = _setup(family, mode)
    for kw in (dict(max_new_tokens=20), dict(max_new_tokens=20, num_beams=4, num_return_sequences=2),
               dict(max_new_tokens=20, min_new_tokens=20)):
        gc = _gc(cfg, **kw)
        ref = generate(model, ids, mask, gc)
        out = generate(model, ids, mask, gc, runner=runner)
        assert out.sequences.shape == ref.sequences.shape, kw
        assert torch.equal(out.sequences, ref.sequences), kw
        if ref.sequences_scores is not None:
            torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=1e-4, atol=1e-4)
    # the fused greedy loop (argmax, EOS, forced tokens and feedback inside the graph): the same rows
    for kw in (dict(max_new_tokens=20), dict(max_new_tokens=20, min_new_tokens=7),
               dict(max_new_tokens=9, forced_bos_token_id=5, forced_eos_token_id=cfg.eos_token_id)):
        gc = _gc(cfg, **kw)
        ref = generate(model, ids, mask, gc)
        fused = runner.greedy(ids, mask, max_new_tokens=gc.max_new_tokens, check_every=3,
                              min_new_tokens=gc.min_new_tokens or 0, forced_bos_token_id=gc.forced_bos_token_id,
                              forced_eos_token_id=gc.forced_eos_token_id)
        assert torch.equal(fused, ref.sequences), kw
    # a second request of another batch size and source length reuses the buffers correctly. On an
    # H200 the compiled T5 step flips row 1 at position 9, where the eager logits' top two are 7.6e-6
    # apart and the compiled step's fp32 logits differ from eager by up to 3.5e-5 (inductor's and
    # cuDNN's sum orders): such a row must be a near-tie of the reference, nothing else may differ
    ids2, mask2 = _inputs(cfg, b=5, s=29, seed=1, device=dev)
    ref2 = generate(model, ids2, mask2, _gc(cfg, max_new_tokens=12))
    out2 = generate(model, ids2, mask2, _gc(cfg, max_new_tokens=12), runner=runner)
    _assert_equal_up_to_near_ties(model, ids2, mask2, out2.sequences, ref2.sequences,
                                  tol=0.0 if mode == "cpu-static" else 1e-4)


@torch.no_grad()
def _assert_equal_up_to_near_ties(model, ids, mask, got, ref, tol: float):
    """got == ref, except rows whose first differing token is a near-tie of the eager reference: its
    top-1 / top-2 logits (teacher forced on ``ref``) within ``tol`` at that position."""
    from encdec_core.runtime.generation import EagerRunner

    assert got.shape == ref.shape
    if torch.equal(got, ref):
        return
    diff = got != ref
    first = {row: int(diff[row].float().argmax()) for row in diff.any(1).nonzero().flatten().tolist()}
    r = EagerRunner(model)  # the whole batch, as generate ran it: the same sums
    r.prefill(ids, mask, 1, ref.shape[1] + 1)
    for t in range(max(first.values())):
        logits = r.step(ref[:, t].contiguous()).float()
        for row, p in first.items():
            if p != t + 1:
                continue
            top = logits[row].topk(2)
            gap = float(top.values[0] - top.values[1])
            assert int(ref[row, p]) == int(top.indices[0]), "the reference is not the eager argmax"
            assert gap <= tol and int(got[row, p]) == int(top.indices[1]), (
                f"row {row} differs at position {p}: {int(got[row, p])} against {int(ref[row, p])}, "
                f"the eager top-2 gap there is {gap:.2e} (> {tol:.0e} or not the runner's token)")


def test_near_tie_check_fails_on_a_clear_difference():
    """_assert_equal_up_to_near_ties passes equal tokens and refuses a changed token whose eager
    top-2 gap is far above the tolerance (so the second-request check above can fail)."""
    from encdec_core.runtime.generation import generate

    model = _tiny("t5", "cpu")
    ids, mask = _inputs(model.cfg, b=5, s=29, seed=1, device="cpu")
    ref = generate(model, ids, mask, _gc(model.cfg, max_new_tokens=12, min_new_tokens=12)).sequences
    _assert_equal_up_to_near_ties(model, ids, mask, ref.clone(), ref, tol=1e-4)
    bad = ref.clone()
    bad[2, 4] = (int(ref[2, 4]) + 1) % model.cfg.vocab_size
    with pytest.raises(AssertionError, match="row 2 differs at position 4"):
        _assert_equal_up_to_near_ties(model, ids, mask, bad, ref, tol=1e-4)


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("mode", MODES)
def test_generate_greedy_runs_the_runners_fused_loop(mode, family, monkeypatch):
    """generate(..., runner=CudaGraphRunner(...)) (fused_greedy=True, the default) decodes greedily through the runner's
    fused loop (no host round trip per token) wherever the processors depend on the position only,
    with the token loop's result: an EOS the model emits (rows end at different steps), min length, a
    forced last token, a forced first token per request (mBART target languages). A repetition
    penalty, several EOS ids or a decoder prefix keep the token loop, which gives the same tokens; so
    does a runner built with fused_greedy=False."""
    from encdec_core.runtime.generation import generate

    dev, model, cfg, _, _, runner = _setup(family, mode)
    assert runner.fused_greedy
    ids, mask = _ragged(cfg, 6, 12, seed=4, device=dev)
    free = generate(model, ids, mask, _gc(cfg, max_new_tokens=16, min_new_tokens=16)).sequences[:, 1:12]
    # EOS: the emitted token found in the most rows (then the most frequent), so rows end early
    rows_with = {t: sum(bool((r == t).any()) for r in free) for t in free.flatten().tolist()}
    counts = free.flatten().bincount()
    eos = max(rows_with, key=lambda t: (rows_with[t], int(counts[t]), -t))
    every_row = rows_with[eos] == free.shape[0]
    calls = []
    real = runner.greedy_search
    monkeypatch.setattr(runner, "greedy_search", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows_bos = [int(free[0, 0]), None, 7, None, int(free[0, 0]), 9]
    cases = [(dict(max_new_tokens=16, eos_token_id=eos), None, True),
             (dict(max_new_tokens=16, eos_token_id=eos, min_new_tokens=5), None, True),
             (dict(max_new_tokens=12, eos_token_id=eos, forced_eos_token_id=eos), None, True),
             (dict(max_new_tokens=16, eos_token_id=eos), rows_bos, True),
             (dict(max_new_tokens=16, eos_token_id=eos, repetition_penalty=1.3), None, False),
             (dict(max_new_tokens=16, eos_token_id=[eos, 5]), None, False)]
    for kw, bos, fused in cases:
        gc = _gc(cfg, **kw)
        calls.clear()
        ref = generate(model, ids, mask, gc, forced_bos_token_ids=bos)
        out = generate(model, ids, mask, gc, runner=runner, forced_bos_token_ids=bos)
        assert bool(calls) == fused, kw
        assert torch.equal(out.sequences, ref.sequences), kw
        if kw == cases[0][0] and bos is None:
            ended = (ref.sequences[:, 1:] == eos).any(1)
            assert bool(ended.any())  # rows that finish before max_new_tokens are covered
            if every_row:
                assert ref.sequences.shape[1] < gc.max_new_tokens + 1  # ... and the loop ending early
    prefix = torch.full((ids.shape[0], 2), cfg.decoder_start_token_id, device=dev)
    prefix[:, 1] = 11
    calls.clear()
    gc = _gc(cfg, max_new_tokens=8, eos_token_id=eos)
    out = generate(model, ids, mask, gc, runner=runner, decoder_input_ids=prefix)
    assert not calls and torch.equal(out.sequences, generate(model, ids, mask, gc, decoder_input_ids=prefix).sequences)
    # one-column prefixes: the start token in every row is the fused loop's case; rows that start
    # otherwise keep their own first token where any row has the start token (HF's rule), so the token
    # loop decodes them (the fused loop once fed every row the first row's token)
    start = cfg.decoder_start_token_id
    for col, fused in (([start] * ids.shape[0], True), ([start, 11] + [start] * (ids.shape[0] - 2), False)):
        one = torch.tensor(col, device=dev).view(-1, 1)
        calls.clear()
        out = generate(model, ids, mask, gc, runner=runner, decoder_input_ids=one)
        ref = generate(model, ids, mask, gc, decoder_input_ids=one)
        assert bool(calls) == fused and torch.equal(out.sequences, ref.sequences), col
        assert out.sequences[:, 0].tolist() == col
    with pytest.raises(ValueError, match="start with different tokens"):  # called directly, mixed first tokens
        from encdec_core.runtime.logits import LogitsPipeline

        runner.prefill(ids, mask, 1, 8)
        runner.greedy_search(gc, ids.shape[0], 8, LogitsPipeline(vocab_size=cfg.vocab_size, eos_token_ids=(eos,),
                                                                 min_length=0, max_length=8, device=dev), one)
    calls.clear()
    runner.fused_greedy = False  # generate keeps its token loop
    out = generate(model, ids, mask, _gc(cfg, max_new_tokens=16, eos_token_id=eos), runner=runner)
    assert not calls and torch.equal(out.sequences, generate(model, ids, mask, _gc(cfg, max_new_tokens=16,
                                                                                 eos_token_id=eos)).sequences)


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("mode", MODES)
def test_generate_sampling_runs_the_runners_fused_loop(mode, family, monkeypatch):
    """Seeded sampling through the runner's fused loop (``sample_search``: processors at the device
    position, warpers, the draw and the token feedback in one graph) gives generate's token loop's
    tokens with the same seed: plain draws with rows ending at an EOS, temperature / top-k / top-p, min
    length, a forced last token, per-request forced first tokens, several outputs per input, and the
    same draws again for the same seed after other requests. Options the fused loop does not serve
    (a repetition penalty) keep the token loop."""
    from encdec_core.runtime.generation import generate

    dev, model, cfg, _, _, runner = _setup(family, mode)
    ids, mask = _ragged(cfg, 5, 12, seed=4, device=dev)
    free = generate(model, ids, mask, _gc(cfg, max_new_tokens=16, min_new_tokens=16)).sequences[:, 1:12]
    rows_with = {t: sum(bool((r == t).any()) for r in free) for t in free.flatten().tolist()}
    eos = max(rows_with, key=lambda t: (rows_with[t], -t))  # a token the model emits: rows end early
    calls = []
    real = runner.sample_search
    monkeypatch.setattr(runner, "sample_search", lambda *a, **k: calls.append(1) or real(*a, **k))
    base = dict(do_sample=True, max_new_tokens=16, eos_token_id=eos, temperature=0.3)
    cases = [(dict(base, seed=3), None, True),
             (dict(base, seed=4, top_k=20, top_p=0.9), None, True),
             (dict(base, seed=5, min_new_tokens=6, forced_eos_token_id=eos, max_new_tokens=10), None, True),
             (dict(base, seed=6), [int(free[0, 0]), None, 7, None, 9], True),
             (dict(base, seed=7, num_return_sequences=2, top_k=50), None, True),
             (dict(base, seed=3, repetition_penalty=1.3), None, False)]
    loop = _runner(model, mode, 16, 24, 32, fused_greedy=False)
    ended = []
    for kw, bos, fused in cases:
        gc = _gc(cfg, **kw)
        calls.clear()
        out = generate(model, ids, mask, gc, runner=runner, forced_bos_token_ids=bos)
        assert bool(calls) == fused, kw
        ref = generate(model, ids, mask, gc, runner=loop, forced_bos_token_ids=bos)
        assert torch.equal(out.sequences, ref.sequences), kw
        ended += (out.sequences[:, 1:-1] == eos).any(1).tolist()
    assert any(ended) and not all(ended)  # rows that end before others are covered
    # a graph of the same options but another EOS id: its min-length ban is of that EOS (the first
    # call's pipeline, kept with the graph, banned its own EOS id)
    hot = dict(do_sample=True, max_new_tokens=10, min_new_tokens=7, temperature=5.0, top_k=3)
    special = (cfg.pad_token_id, cfg.decoder_start_token_id, _gc(cfg).forced_bos_token_id)
    two = [t for t, _ in sorted(rows_with.items(), key=lambda kv: -kv[1]) if t not in special][:2]
    for seed in range(6):
        for e in two:
            gc = _gc(cfg, eos_token_id=e, seed=seed, **hot)
            out = generate(model, ids, mask, gc, runner=runner)
            assert torch.equal(out.sequences, generate(model, ids, mask, gc, runner=loop).sequences), (seed, e)
            assert not bool((out.sequences[:, 1:7] == e).any())
    again = generate(model, ids, mask, _gc(cfg, **cases[0][0]), runner=runner)  # the same seed: the same draws
    assert torch.equal(again.sequences, generate(model, ids, mask, _gc(cfg, **cases[0][0]), runner=loop).sequences)


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("mode", MODES)
def test_fused_sampling_top_k_top_p_of_a_real_vocabulary(mode, family, monkeypatch):
    """A vocabulary of real size (8192 >= STABLE_SORT_MIN_VOCAB): on CUDA the fused sampling graph
    takes top-k with top-p from the 2k best (``top_k_top_p``) and draws with ``draw``; its tokens equal
    generate's token loop's (torch.topk, the whole-vocabulary sort, torch.multinomial) for the same
    seed. With the output embedding zeroed but for a few tokens, thousands of scores tie at the k-th:
    the graph's result is not exact, so ``sample_search`` hands the request back (None) and the
    token loop's tokens come out all the same."""
    from encdec_core.runtime.generation import generate

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cpu" if mode == "cpu-static" else "cuda"
    model = _tiny(family, dev, vocab_size=8192)
    cfg = model.cfg
    ids, mask = _ragged(cfg, 5, 12, seed=4, device=dev)
    runner = _runner(model, mode, 16, 24, 32)
    loop = _runner(model, mode, 16, 24, 32, fused_greedy=False)
    got = []
    real = runner.sample_search
    monkeypatch.setattr(runner, "sample_search", lambda *a, **k: got.append(real(*a, **k)) or got[-1])
    for seed, kw in ((3, dict(top_k=20, top_p=0.9)), (4, dict(top_k=50, top_p=0.5, temperature=0.7)),
                     (5, dict(top_k=5, top_p=0.95, num_return_sequences=2))):
        gc = _gc(cfg, do_sample=True, max_new_tokens=12, seed=seed, **kw)
        out = generate(model, ids, mask, gc, runner=runner)
        assert got and got[-1] is not None, kw  # the fused loop's own result
        assert torch.equal(out.sequences, generate(model, ids, mask, gc, runner=loop).sequences), kw
    with torch.no_grad():  # new runners: a compiled step may hold the weights it was built with
        model.output_embedding.weight[8:].zero_()
    runner = _runner(model, mode, 16, 24, 32)
    loop = _runner(model, mode, 16, 24, 32, fused_greedy=False)
    real = runner.sample_search
    monkeypatch.setattr(runner, "sample_search", lambda *a, **k: got.append(real(*a, **k)) or got[-1])
    gc = _gc(cfg, do_sample=True, max_new_tokens=12, seed=9, top_k=20, top_p=0.9)
    got.clear()
    out = generate(model, ids, mask, gc, runner=runner)
    assert got == [None] if dev == "cuda" else got and got[0] is not None  # handed back on CUDA only
    assert torch.equal(out.sequences, generate(model, ids, mask, gc, runner=loop).sequences)


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("mode", MODES)
def test_output_scores_through_the_runner(mode, family, monkeypatch):
    """generate(output_scores=True) with the runner: its fused greedy and beam loops step aside (the
    step-by-step loop computes the scores through the runner's step and reorder), and tokens and
    token log-probs equal the eager path's; so does a streamer's greedy decoding."""
    from encdec_core.runtime.generation import generate

    dev, model, cfg, ids, mask, runner = _setup(family, mode)
    fused = []
    for name in ("greedy_search", "beam_search"):
        real = getattr(runner, name)
        monkeypatch.setattr(runner, name, lambda *a, _r=real, **k: fused.append(1) or _r(*a, **k))
    for kw in (dict(max_new_tokens=12), dict(max_new_tokens=10, num_beams=3, num_return_sequences=2)):
        gc = _gc(cfg, **kw)
        ref = generate(model, ids, mask, gc, output_scores=True)
        out = generate(model, ids, mask, gc, runner=runner, output_scores=True)
        assert not fused, kw
        assert torch.equal(out.sequences, ref.sequences), kw
        torch.testing.assert_close(out.token_scores, ref.token_scores, atol=1e-4, rtol=1e-4)
        assert ref.token_scores[:, 1:].ne(0).any()
        generate(model, ids, mask, gc, runner=runner)  # without scores the fused loop runs again
        assert fused
        fused.clear()

    class Rec:  # a streamer, too, keeps the step-by-step loop
        steps = []

        def put(self, tokens, live):
            self.steps.append(tokens)

        def end(self):
            pass

    gc = _gc(cfg, max_new_tokens=12)
    rec = Rec()
    out = generate(model, ids, mask, gc, runner=runner, streamer=rec)
    assert not fused and torch.equal(out.sequences, generate(model, ids, mask, gc).sequences)
    assert torch.tensor(rec.steps).T.tolist() == out.sequences[:, 1:].tolist()


def test_fused_greedy_checks_only_after_min_new_tokens(monkeypatch):
    """The host's "all finished" check (a wait for the GPU) runs every check_every steps, but not
    within the first min_new_tokens tokens, where EOS is suppressed and no row can finish; with a
    forced first token equal to EOS it runs from the start. A check that finds every row finished
    still ends the loop there."""
    from encdec_core.runtime.cuda import CudaGraphRunner

    model = _tiny("t5", "cpu")
    ids, mask = _inputs(model.cfg, device="cpu")
    runner = CudaGraphRunner(model, 16, 24, 32, compile=False, use_graphs=False)
    seen = []
    answer = [False]

    def spy(vw):
        seen.append(runner.dec.pos.item())  # steps done so far
        return answer[0]
    monkeypatch.setattr(runner, "_all_finished", spy)
    eos = model.cfg.eos_token_id
    for kw, checks in ((dict(), [3, 6, 9, 12, 15, 18]), (dict(min_new_tokens=7), [9, 12, 15, 18]),
                       (dict(min_new_tokens=9), [12, 15, 18]),
                       (dict(min_new_tokens=7, forced_bos_token_id=eos), [3, 6, 9, 12, 15, 18])):
        seen.clear()
        runner.greedy(ids, mask, max_new_tokens=20, check_every=3, **kw)
        assert seen == checks, kw
    answer[0] = True
    seen.clear()
    runner.greedy(ids, mask, max_new_tokens=20, check_every=3, min_new_tokens=7)
    assert seen == [9] and runner.steps == 9
    # the default on a CPU: every step (a check costs nothing there, a step after the end does)
    answer[0] = False
    seen.clear()
    runner.greedy(ids, mask, max_new_tokens=12, min_new_tokens=7)
    assert seen == [8, 9, 10, 11]
    assert runner._check_every(None, 8) == 1 and runner._check_every(5, 8) == 5 and runner._check_every(0, 8) == 1


def test_beam_search_in_the_runner_checks_only_after_the_min_length(monkeypatch):
    """Beam search inside the runner reads the stop flag (a wait for the GPU) only from the first step
    where a hypothesis can end: not while EOS is suppressed by the min length, unless a forced first
    token is EOS. The beams equal the eager search's either way."""
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.generation import generate

    model = _tiny("t5", "cpu")
    ids, mask = _inputs(model.cfg, device="cpu")
    runner = CudaGraphRunner(model, 16, 24, 32, compile=False, use_graphs=False)
    seen = []
    real = runner._beams_go_on
    monkeypatch.setattr(runner, "_beams_go_on", lambda st: seen.append(runner.steps) or real(st))
    eos = model.cfg.eos_token_id
    for kw, first in ((dict(), 1), (dict(min_new_tokens=7), 8), (dict(min_new_tokens=7, forced_bos_token_id=eos), 1)):
        gc = _gc(model.cfg, num_beams=3, max_new_tokens=12, **kw)
        seen.clear()
        out = generate(model, ids, mask, gc, runner=runner)
        ref = generate(model, ids, mask, gc)
        assert seen and seen[0] == first and seen == list(range(first, first + len(seen))), kw
        assert torch.equal(out.sequences, ref.sequences), kw
        assert torch.allclose(out.sequences_scores, ref.sequences_scores, atol=1e-5), kw


def test_generate_on_a_cpu_runner_stops_when_the_last_row_ends():
    """generate's greedy decoding through a CPU runner's fused loop computes no step after the last
    row emitted EOS (the default check runs every step there), with the eager path's tokens."""
    from encdec_core.runtime.generation import generate

    model = _tiny("t5", "cpu")
    ids, mask = _ragged(model.cfg, 1, 12, seed=4, device="cpu")
    free = generate(model, ids, mask, _gc(model.cfg, max_new_tokens=16, min_new_tokens=16)).sequences[0, 1:]
    # as EOS: the first token after the first two that the row had not emitted before, so the row
    # ends at step 3..7 (before the first check of a GPU's every-8-steps default)
    k = next(k for k in range(2, 7) if int(free[k]) not in free[:k].tolist())
    gc = _gc(model.cfg, max_new_tokens=16, eos_token_id=int(free[k]))
    ref = generate(model, ids, mask, gc).sequences
    assert ref.shape[1] == k + 2  # start token, k tokens, EOS
    runner = _runner(model, "cpu-static", 16, 24, 32)
    out = generate(model, ids, mask, gc, runner=runner).sequences
    assert torch.equal(out, ref)
    assert runner.steps == k + 1


def test_warmup_without_graphs_runs_each_step_once_and_restores_the_state():
    """warmup() on a runner without graphs (a CPU's compiled step) runs each step once, so the compile
    happens there and not at the first request; the decoder position, tokens and finished flags it
    moved are restored, and generation afterwards gives the eager path's tokens."""
    from encdec_core.runtime.generation import generate

    model = _tiny("t5", "cpu")
    runner = _runner(model, "cpu-static", 4, 24, 32)
    ran = []
    real = runner._step_fn

    def counting(bb):
        fn = real(bb)
        return lambda *a, **kw: (ran.append(bb), fn(*a, **kw))[1]
    runner._step_fn = counting
    d = runner.dec
    before = [d.pos.clone(), d._tokens.clone()]
    runner.warmup(batch_sizes=(1, 3), source_lens=(16,), kinds=("greedy", "step"))
    assert ran == [1, 1, 4, 4]  # one run per (kind, bucket): batch 3 is bucket 4
    assert torch.equal(d.pos, before[0]) and torch.equal(d._tokens, before[1])
    ids, mask = _ragged(model.cfg, 3, 12, seed=5, device="cpu")
    gc = _gc(model.cfg, max_new_tokens=8)
    assert torch.equal(generate(model, ids, mask, gc, runner=runner).sequences, generate(model, ids, mask, gc).sequences)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_cpu_compiled_step_matches_eager(family):
    """On a CPU, compile=True (use_graphs=False) runs the static step compiled by inductor with
    frozen, autotuned weights (the product's CPU_COMPILE_OPTIONS, passed explicitly: conftest turns
    autotuning off for the other tests): greedy, beam and the fused greedy loop give the eager path's
    tokens (fp32), and time_step reports the step's wall time. 20-30 s a family on 2 cores with a
    warm inductor cache, 60-110 s with a cold one (the compile and its GEMM autotuning)."""
    from conftest import PRODUCT_CPU_COMPILE_OPTIONS

    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.generation import generate

    assert PRODUCT_CPU_COMPILE_OPTIONS["max_autotune"]
    model = _tiny(family, "cpu")
    cfg = model.cfg
    ids, mask = _inputs(cfg, device="cpu")
    runner = CudaGraphRunner(model, 16, 24, 32, compile=True, use_graphs=False,
                             compile_options=PRODUCT_CPU_COMPILE_OPTIONS)
    assert runner._step.compiled.options == PRODUCT_CPU_COMPILE_OPTIONS
    # greedy on 3 requests and beam search on 2 x 2 beams: both the batch bucket of 4 rows (every
    # bucket is a compilation with its GEMMs autotuned: ~5 s a shape on CI's cold cache)
    for kw in (dict(max_new_tokens=20), dict(max_new_tokens=20, num_beams=2, num_return_sequences=2)):
        gc = _gc(cfg, **kw)
        rows = slice(None) if gc.num_beams == 1 else slice(0, 2)
        ref = generate(model, ids[rows], mask[rows], gc)
        out = generate(model, ids[rows], mask[rows], gc, runner=runner)
        assert runner._cur[0] == 4
        assert torch.equal(out.sequences, ref.sequences), kw
        if ref.sequences_scores is not None:
            torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=1e-4, atol=1e-4)
    gc = _gc(cfg, max_new_tokens=20)
    fused = runner.greedy(ids, mask, max_new_tokens=20, check_every=3, forced_bos_token_id=gc.forced_bos_token_id,
                          forced_eos_token_id=gc.forced_eos_token_id)
    assert torch.equal(fused, generate(model, ids, mask, gc).sequences)
    assert runner.time_step(ids, mask, steps=4, repeats=1) > 0
    assert runner._step.state == "ok"  # compiled, not the eager fallback after a failed compile


def test_compiled_runner_serves_more_bucket_combinations_than_dynamos_default_limit():
    """Every (batch bucket, source bucket) is its own static compilation of the step on a CPU; with
    dynamo's recompile limit at its default (8) the ninth stopped the fullgraph step with
    FailOnRecompileLimitHit. Here the limit starts at 1 and two combinations are served: the
    runner raises it (``allow_recompiles``) and every answer equals the eager path's (two, not nine:
    each compilation costs CI ~15 s on a cold inductor cache)."""
    import torch._dynamo.config as dynamo_config

    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.cuda.runner import RECOMPILE_LIMIT

    # dynamo's config.patch, not monkeypatch: pytest's monkeypatch sees no attribute on a config
    # module and deletes the entry when it undoes the change (later compilations then fail)
    with dynamo_config.patch(recompile_limit=1, accumulated_recompile_limit=1):
        model = _tiny("t5", "cpu")
        fast = {"max_autotune": False, "freezing": False}  # the limit is the point here, not the speed
        runner = CudaGraphRunner(model, 8, 6, 64, compile=True, use_graphs=False, compile_options=fast)
        assert dynamo_config.recompile_limit >= RECOMPILE_LIMIT
        assert dynamo_config.accumulated_recompile_limit >= RECOMPILE_LIMIT
        eager = CudaGraphRunner(model, 8, 6, 64, compile=False, use_graphs=False)
        for b, s in ((1, 5), (5, 40)):  # buckets (1, 16), (8, 64): two compilations
            ids = torch.randint(4, model.cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(b))
            assert torch.equal(runner.greedy(ids, None, max_new_tokens=4),
                               eager.greedy(ids, None, max_new_tokens=4))
    assert hasattr(dynamo_config, "recompile_limit")


def test_runner_calls_in_another_thread_get_the_runners_compile_settings():
    """dynamo's and inductor's config are per thread: the recompile limit the runner raised where it was
    built stayed at dynamo's default (8) in encdec serve's scheduler thread, whose compiled CPU step then
    failed at its ninth (batch, source) bucket. A request in any thread now starts with the settings."""
    import threading

    import torch._dynamo.config as dynamo_config

    from encdec_core.runtime.cuda.runner import RECOMPILE_LIMIT

    _, model, cfg, ids, mask, runner = _setup("t5", "cpu-static")
    seen = []

    def request():  # a new thread starts from dynamo's defaults (torch 2.13)
        runner.prefill(ids, mask, 1, 8)
        seen.append(dynamo_config.recompile_limit)

    t = threading.Thread(target=request)
    t.start()
    t.join()
    assert seen and seen[0] >= RECOMPILE_LIMIT, seen


def test_cpu_compiled_step_patches_inductor_config_and_falls_back():
    """The CPU step is called with CPU_COMPILE_OPTIONS in inductor's config (restored afterwards);
    a first call that fails to compile warns and runs the uncompiled step from then on."""
    import torch._inductor.config as ic

    from encdec_core.runtime.cuda.runner import CPU_COMPILE_OPTIONS, _CpuCompiledStep

    before = {k: getattr(ic, k) for k in CPU_COMPILE_OPTIONS}
    seen = {}
    step = _CpuCompiledStep(lambda x: seen.update({k: getattr(ic, k) for k in CPU_COMPILE_OPTIONS}) or x + 1,
                            lambda x: x - 1, CPU_COMPILE_OPTIONS)
    assert step(1) == 2 and seen == CPU_COMPILE_OPTIONS
    assert {k: getattr(ic, k) for k in CPU_COMPILE_OPTIONS} == before

    def broken(x):
        raise RuntimeError("no C++ compiler")

    step = _CpuCompiledStep(broken, lambda x: x - 1, CPU_COMPILE_OPTIONS)
    with pytest.warns(UserWarning, match="running it uncompiled"):
        assert step(1) == 0
    assert step(5) == 4  # stays on the fallback
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) > 1:
            raise RuntimeError("a real error after a good compile")
        return x

    step = _CpuCompiledStep(flaky, lambda x: -1, CPU_COMPILE_OPTIONS)
    assert step(3) == 3
    with pytest.raises(RuntimeError, match="real error"):
        step(3)


def test_runner_refuses_graphs_off_cuda():
    from encdec_core.runtime.cuda import CudaGraphRunner

    model = _tiny("t5", "cpu")
    with pytest.raises(ValueError, match="use_graphs=False"):
        CudaGraphRunner(model, 4, 8, 16)


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("mode", MODES)
def test_beam_search_in_graph_matches_python_loop(family, mode):
    """Beam search run by the runner (step + processors + beam update + cache reorder in one graph,
    stop flag read every 4 steps) gives the Python loop's sequences and scores, for the stopping
    rules, length penalties, processors and prefixes it accepts; the rest falls back to the loop."""
    from encdec_core.runtime.generation import EagerRunner, generate

    dev, model, cfg, ids, mask, runner = _setup(family, mode)
    # an EOS the model actually emits early, so hypotheses finish at different lengths
    greedy = generate(model, ids, mask, _gc(cfg, max_new_tokens=6)).sequences
    eos = [int(greedy[0, 2]), int(greedy[1, 3])]
    # tokens the beams pick at steps 2-3: with early_stopping=True the search ends before max length
    beams = generate(model, ids, mask, _gc(cfg, max_new_tokens=8, num_beams=4, num_return_sequences=4)).sequences
    common = sorted(set(beams[:, 2:4].flatten().tolist()))

    class Counting(EagerRunner):
        steps = 0

        def step(self, tokens):
            self.steps += 1
            return super().step(tokens)

    cases = [
        dict(num_beams=4, eos_token_id=common, early_stopping=True),
        dict(num_beams=4, eos_token_id=eos[0]),
        dict(num_beams=4, eos_token_id=eos, early_stopping=True, num_return_sequences=3),
        dict(num_beams=3, eos_token_id=eos, early_stopping="never", length_penalty=0.6),
        dict(num_beams=2, eos_token_id=eos[1], length_penalty=2.0, min_new_tokens=5),
        dict(num_beams=4, forced_bos_token_id=7, forced_eos_token_id=eos[0], max_new_tokens=9),
        dict(num_beams=4, eos_token_id=eos[0], no_repeat_ngram_size=2),  # not static: the Python loop
    ]
    for kw in cases:
        kw = {"max_new_tokens": 16, **kw}
        gc = _gc(cfg, **kw)
        counting = Counting(model)
        ref = generate(model, ids, mask, gc, runner=counting)
        before = sum(1 for k in runner._graphs if k[0] == "beam")
        out = generate(model, ids, mask, gc, runner=runner)
        # the graph loop reads the stop flag every 4 steps: it may run up to 3 steps more, no fewer
        assert counting.steps <= runner.steps <= counting.steps + 3, (kw, counting.steps, runner.steps)
        assert out.sequences.shape == ref.sequences.shape, kw
        assert torch.equal(out.sequences, ref.sequences), kw
        torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=1e-4, atol=1e-4)
        in_graph = sum(1 for k in runner._graphs if k[0] == "beam") > before
        assert in_graph == ("no_repeat_ngram_size" not in kw), kw
    # per-request forced first tokens (mBART target languages) and a decoder prefix, and the same
    # graph reused by a second request with other inputs
    gc = _gc(cfg, num_beams=3, eos_token_id=eos[0], max_new_tokens=12)
    for seed, langs in ((0, [5, None, 9]), (3, [11, 12, 13])):
        ids2, mask2 = _inputs(cfg, seed=seed, device=dev)
        ref = generate(model, ids2, mask2, gc, forced_bos_token_ids=langs, runner=EagerRunner(model))
        out = generate(model, ids2, mask2, gc, forced_bos_token_ids=langs, runner=runner)
        assert torch.equal(out.sequences, ref.sequences), langs
    prefix = torch.tensor([[cfg.decoder_start_token_id, 8, 9]] * 3, device=dev)
    ref = generate(model, ids, mask, gc, decoder_input_ids=prefix, runner=EagerRunner(model))
    out = generate(model, ids, mask, gc, decoder_input_ids=prefix, runner=runner)
    assert torch.equal(out.sequences, ref.sequences)
    # one graph per batch bucket, not per request count: 4 requests of 4 beams fill the 16-row bucket,
    # 3 of them (12 rows) run it with one padding request, which neither stops the search early nor
    # keeps it going (early_stopping=True stops when the real requests are done), nor shows in the result
    gc = _gc(cfg, num_beams=4, eos_token_id=common, early_stopping=True, max_new_tokens=16,
             num_return_sequences=2)
    for b, seed in ((4, 7), (3, 8), (1, 9)):
        ids_b, mask_b = _inputs(cfg, b=b, seed=seed, device=dev)
        counting = Counting(model)
        ref = generate(model, ids_b, mask_b, gc, runner=counting)
        out = generate(model, ids_b, mask_b, gc, runner=runner)
        assert out.sequences.shape == ref.sequences.shape and torch.equal(out.sequences, ref.sequences), b
        torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=1e-4, atol=1e-4)
        assert counting.steps <= runner.steps <= counting.steps + 3, (b, counting.steps, runner.steps)
    keys = [k for k in runner._graphs if k[0] == "beam" and k[5] == 4 and k[8] == gc.eos_token_ids and k[11] == "True"]
    assert sorted(k[1] for k in keys) == [4, 16], keys  # batches 4 and 3 share the 16-row graph; batch 1: 4 rows


@pytest.mark.parametrize("mode", MODES[:2])
def test_step_logits_match_eager_and_limits(mode):
    from encdec_core.errors import LimitError
    from encdec_core.runtime.generation import EagerRunner

    dev = "cpu" if mode == "cpu-static" else "cuda"
    model = _tiny("t5", dev)
    ids, mask = _inputs(model.cfg, device=dev)
    eager, graph = EagerRunner(model), _runner(model, mode, 4, 8, 32)
    eager.prefill(ids, mask, 1, 8)
    graph.prefill(ids, mask, 1, 8)
    tok = torch.full((3,), model.cfg.decoder_start_token_id, device=dev)
    for _ in range(8):
        a, b = eager.step(tok), graph.step(tok)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        tok = a.argmax(-1)
    with pytest.raises(LimitError):
        graph.step(tok)
    with pytest.raises(LimitError):
        graph.prefill(ids.repeat(2, 1), mask.repeat(2, 1), 1, 8)  # 6 rows > max_batch 4
    with pytest.raises(LimitError):
        graph.prefill(ids, mask, 1, 9)
    with pytest.raises(LimitError, match="decoder length 9 exceeds the runner's max length 8"):
        graph.greedy(ids, mask, max_new_tokens=9)
    long_ids = torch.full((1, 33), 5, device=dev)
    for static in (False, True):  # the eager prefill and the padded one (prefill_graphs) check it alike
        r = _runner(model, mode, 4, 8, 32, prefill_graphs=static)
        with pytest.raises(LimitError, match="input length 33 exceeds the runner's max input length 32"):
            r.prefill(long_ids, None, 1, 8)


def test_beam_topk_option_is_checked():
    from encdec_core.runtime.cuda import CudaGraphRunner

    with pytest.raises(ValueError, match="beam_topk"):
        CudaGraphRunner(_tiny("t5", "cpu"), 2, 4, 8, compile=False, use_graphs=False, beam_topk="radix")
    cpu = CudaGraphRunner(_tiny("t5", "cpu"), 2, 4, 8, compile=False, use_graphs=False)
    assert cpu.beam_topk == "torch"  # "auto": the Triton top-k only on CUDA


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_beam_search_in_graph_with_triton_topk(family):
    """beam_topk="triton": the beam step's candidates from the Triton two-stage top-k (in the graph,
    inside the compiled tail) give the sequences of torch.topk (fp32, 6 requests x 4 beams)."""
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.generation import generate

    model = _tiny(family, "cuda")
    ids, mask = _ragged(model.cfg, 6, 9, seed=0, device="cuda")
    gc = _gc(model.cfg, num_beams=4, max_new_tokens=8, num_return_sequences=2)
    ref = CudaGraphRunner(model, 32, 12, 16, beam_topk="torch")
    tri = CudaGraphRunner(model, 32, 12, 16, beam_topk="triton")
    assert CudaGraphRunner(model, 32, 12, 16).beam_topk == "triton"  # "auto" on CUDA
    a = generate(model, ids, mask, gc, runner=ref)
    b = generate(model, ids, mask, gc, runner=tri)
    assert torch.equal(a.sequences, b.sequences)


def test_default_compile_options(monkeypatch):
    """PDL for inductor's kernels by default only where it was measured: one rank, a GPU with PDL
    (Hopper+, not ENCDEC_PDL=0), no compile mode; a CPU model compiles without options."""
    from types import SimpleNamespace

    import encdec_core.runtime.cuda.triton_kernels as tk
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.cuda.runner import default_compile_options

    cpu = _tiny("t5", "cpu")
    assert default_compile_options(cpu) == {}
    assert CudaGraphRunner(cpu, 2, 4, 8, use_graphs=False).compile_options == {}
    gpu = SimpleNamespace(device=torch.device("cuda", 0), ctx=SimpleNamespace(distributed=False))
    monkeypatch.setattr(tk, "pdl_supported", lambda device: True)
    assert default_compile_options(gpu) == {"triton.enable_pdl": True}
    assert default_compile_options(gpu, compile=False) == {}
    assert default_compile_options(gpu, compile_mode="max-autotune-no-cudagraphs") == {}
    tp = SimpleNamespace(device=torch.device("cuda", 0), ctx=SimpleNamespace(distributed=True))
    assert default_compile_options(tp) == {}
    monkeypatch.setattr(tk, "pdl_supported", lambda device: False)  # older GPU, or ENCDEC_PDL=0
    assert default_compile_options(gpu) == {}


def test_compile_options_are_checked():
    from encdec_core.runtime.cuda import CudaGraphRunner

    model = _tiny("t5", "cpu")
    with pytest.raises(ValueError, match="unknown inductor options"):
        CudaGraphRunner(model, 2, 4, 8, compile=True, use_graphs=False, compile_options={"triton.no_such": 1})
    with pytest.raises(ValueError, match="needs compile=True"):
        CudaGraphRunner(model, 2, 4, 8, compile=False, use_graphs=False,
                        compile_options={"triton.enable_pdl": True})


def test_attention_pdl_option_checked():
    """attention_pdl (the compiled step's attention ops launched with PDL): off by default where
    inductor's PDL is off (a CPU model), refused when asked for where it cannot run."""
    from encdec_core.runtime.cuda import CudaGraphRunner

    model = _tiny("t5", "cpu")
    r = CudaGraphRunner(model, 4, 8, 16, compile=False, use_graphs=False)
    assert r.attention_pdl is False and r.dec.attn_pdl is False
    with pytest.raises(ValueError, match="attention_pdl=True needs compile=True"):
        CudaGraphRunner(model, 4, 8, 16, compile=False, use_graphs=False, attention_pdl=True)


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_attention_pdl_gives_the_same_logits(family):
    """The compiled step with its Triton attention ops launched with PDL (the default where inductor's
    PDL is on) against the same step without: the kernels compute the same sums, only the cached
    K/V loads move before the wait, so logits are bit-identical (fp32, graphs, 24 rows of mixed
    lengths, self- and cross-attention at every step) and greedy / beam tokens equal."""
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.cuda.triton_kernels import pdl_supported
    from encdec_core.runtime.generation import generate

    if not pdl_supported("cuda"):
        pytest.skip("GPU older than Hopper: no programmatic dependent launch")
    model = _tiny(family, "cuda")
    B = 24
    ids, mask = _ragged(model.cfg, B, 12, seed=5, device="cuda")
    kw = dict(kernels="inductor")
    on = CudaGraphRunner(model, 32, 20, 16, **kw)
    off = CudaGraphRunner(model, 32, 20, 16, attention_pdl=False, **kw)
    assert on.attention_pdl and not off.attention_pdl
    assert on.compile_options == off.compile_options == {"triton.enable_pdl": True}
    for r in (on, off):
        r.prefill(ids, mask, 1, 10)
    tok = torch.full((B,), model.cfg.decoder_start_token_id, device="cuda")
    for _ in range(9):
        a, b = off.step(tok).clone(), on.step(tok).clone()
        assert torch.equal(a, b)
        tok = a.argmax(-1)
    assert torch.equal(off.greedy(ids, mask, max_new_tokens=8), on.greedy(ids, mask, max_new_tokens=8))
    gc = _gc(model.cfg, num_beams=2, max_new_tokens=6)
    assert torch.equal(generate(model, ids[:8], mask[:8], gc, runner=off).sequences,
                       generate(model, ids[:8], mask[:8], gc, runner=on).sequences)


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_compiled_step_with_inductor_pdl(family):
    """compile_options={"triton.enable_pdl": True} (the default on Hopper+): inductor launches its
    kernels with PDL, each waiting only where it reads its predecessor's writes. The option must
    reach the code of a step compiled after a runner without options compiled the step of the same
    shapes in the same process (dynamo reused that one before: the options then never applied). The PDL step (graphs, 24 rows, fp32)
    stays within the parity tolerance of the step without it, with the same greedy and beam tokens
    (BART bit-identical; T5 ~1.5e-6 apart on an H200: inductor generates other code)."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.cuda.triton_kernels import pdl_supported
    from encdec_core.runtime.generation import generate

    if not pdl_supported("cuda"):
        pytest.skip("GPU older than Hopper: no programmatic dependent launch")
    # a step of these shapes and options compiled by an earlier test would be reused here (the code
    # this test inspects then never compiles): start from an empty dynamo cache
    torch._dynamo.reset()
    model = _tiny(family, "cuda")
    B = 24
    ids, mask = _ragged(model.cfg, B, 12, seed=9, device="cuda")  # lengths 12 down to 5
    kw = dict(kernels="inductor")
    ref = CudaGraphRunner(model, 32, 12, 16, compile_options={}, **kw)  # no options: no PDL
    assert ref.compile_options == {}
    pdl = CudaGraphRunner(model, 32, 12, 16, **kw)  # the default on Hopper
    assert pdl.compile_options == {"triton.enable_pdl": True}
    ref.prefill(ids, mask, 1, 10)
    pdl.prefill(ids, mask, 1, 10)
    tok = torch.full((B,), model.cfg.decoder_start_token_id, device="cuda")
    ref_code, pdl_code = [], []
    with torch._inductor.config.patch(fx_graph_cache=False):
        with mock.patch.object(GraphLowering, "save_output_code", ref_code.append):
            a = ref.step(tok).clone()
        with mock.patch.object(GraphLowering, "save_output_code", pdl_code.append):
            b = pdl.step(tok).clone()
    assert pdl_code and any("gdc_wait" in c for c in pdl_code), "no PDL in the compiled step's kernels"
    assert not any("gdc_wait" in c for c in ref_code)
    for _ in range(8):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
        tok = a.argmax(-1)
        a, b = ref.step(tok).clone(), pdl.step(tok).clone()
    assert torch.equal(ref.greedy(ids, mask, max_new_tokens=8), pdl.greedy(ids, mask, max_new_tokens=8))
    gc = _gc(model.cfg, num_beams=2, max_new_tokens=6)
    assert torch.equal(generate(model, ids[:8], mask[:8], gc, runner=ref).sequences,
                       generate(model, ids[:8], mask[:8], gc, runner=pdl).sequences)


@pytest.mark.parametrize("kernels", ["auto", "inductor"])
@pytest.mark.parametrize("mode", [MODES[0], MODES[2]])
def test_fp16_t5_is_overflow_safe(mode, kernels):
    """T5's FFN output overflows fp16: with the core's fp32 residual and 2^-8 RowLinear scaling the
    runner's fp16 logits stay finite and close to fp32. On CUDA, "auto" runs the Triton step and
    "inductor" the compiled model step with the Triton attention op (the path of large batches)."""
    if mode == "cpu-static" and kernels == "auto":
        pytest.skip("on a CPU both are the model step")
    from encdec_core.model import build_model

    dev = "cpu" if mode == "cpu-static" else "cuda"
    model = _tiny("t5", dev)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ffn.wo.weight"):
                p.mul_(60000.0)  # FFN outputs far beyond fp16's 65504
    ids, mask = _inputs(model.cfg, device=dev)
    seen = []
    hooks = [model.decoder.layers[str(i)].ffn.register_forward_hook(lambda m, a, o: seen.append(o.abs().max()))
             for i in model.decoder.layer_ids]
    ref_runner = _runner(model, "cpu-static", 4, 8, 32, kernels="inductor")  # model modules: hooks see the FFN
    ref_runner.prefill(ids, mask, 1, 8)
    tok = torch.full((3,), model.cfg.decoder_start_token_id, device=dev)
    ref = ref_runner.step(tok).clone()
    for h in hooks:
        h.remove()
    assert max(float(x) for x in seen) > 65504  # the test model does leave fp16's range
    model16 = build_model(model.cfg, dtype=torch.float16, device=dev)
    model16.load_state_dict(model.state_dict())
    model16.init_buffers()
    model16.eval()
    r16 = _runner(model16, mode, 4, 8, 32, kernels=kernels)
    r16.prefill(ids, mask, 1, 8)
    out = r16.step(tok).clone()
    assert torch.isfinite(out).all()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 2e-2, rel


@CUDA
@pytest.mark.gpu
def test_cli_run_cuda_graph_matches_hf(builtin_registry, tmp_path, capsys):
    """`encdec run --device cuda --cuda-graph` (runner sized by the engine limits) equals HF fp32."""
    import json

    from _cli_helpers import make_t5_dir
    from encdec_core.cli import main

    src = make_t5_dir(tmp_path / "hf")
    ck, eng = tmp_path / "ck", tmp_path / "eng"
    assert main(["convert", "--model-dir", str(src), "--output-dir", str(ck), "--quiet"]) == 0
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(eng), "--max-batch-size", "4",
                 "--max-input-len", "32", "--max-output-len", "12", "--max-beam-width", "2"]) == 0
    out = tmp_path / "o.json"
    rc = main(["run", "--engine-dir", str(eng), "--input-text", "hello", "a longer input", "--device", "cuda",
               "--cuda-graph", "--max-output-len", "10", "--compare-hf", "--hf-model-dir", str(src),
               "--output-json", str(out)])
    assert rc == 0, capsys.readouterr().out
    assert all(r["match"] for r in json.loads(out.read_text())["results"])


@pytest.mark.parametrize("rows,launched_with_pdl", [(8, True), (64, True), (65, False), (256, False)])
def test_attention_ops_pass_pdl_up_to_64_rows(monkeypatch, rows, launched_with_pdl):
    """The compiled step's attention ops ask for PDL only for calls of up to ATTN_PDL_MAX_ROWS rows
    (at 256 rows it cost 1.5 % on an H200), and never when the step did not ask."""
    from encdec_core.runtime.cuda import ops

    if not ops.HAVE_TRITON:
        pytest.skip("needs triton")
    seen = []

    def fake(q, k_cache, v_cache, scale, **kw):
        seen.append(kw["pdl"])
        return q.clone()

    monkeypatch.setattr(ops, "decode_attention", fake)
    H, D, S = 2, 8, 16
    q = torch.randn(rows, H, D)
    k = torch.randn(rows, H, S, D)
    pos = torch.tensor(3)
    for pdl in (True, False):
        seen.clear()
        ops.cross_attention(q, k, k, 0.5, None, 1, pdl)
        ops.self_attention(q, k, k, 0.5, pos, q, q, None, None, pdl)
        assert seen == [pdl and launched_with_pdl] * 2
    assert ops.ATTN_PDL_MAX_ROWS == 64


PREFILL_MODES = [MODES[0],
                 pytest.param("cuda-graph", marks=[CUDA, pytest.mark.gpu], id="cuda-graph"),
                 pytest.param("cuda-compiled", marks=[CUDA, pytest.mark.gpu], id="cuda-compiled")]


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("mode", PREFILL_MODES)
def test_static_prefill_matches_the_eager_prefill(family, mode):
    """prefill_graphs=True: the sources padded into static buffers of the (rows, source) bucket and
    the encoder, cross K/V and padding bias from one graph (on a CPU the same padded prefill without
    a graph). The caches and bias of the request's rows equal the eager prefill's up to rounding
    (the encoder runs at the bucket's length), and so do greedy tokens (up to near-ties of the
    eager reference); a later request of a smaller bucket reuses the buffers; mixed lengths that the
    encoder splits into length groups, and beam search with expanded cross rows, keep the eager
    prefill."""
    from encdec_core.runtime.cuda.runner import _bucket
    from encdec_core.runtime.generation import generate

    dev, model, cfg, ids, mask, ref_runner = _setup(family, mode, encoder_launch_cost=0)
    runner = _runner(model, mode, 16, 24, 32, encoder_launch_cost=0, prefill_graphs=True)
    tol = 1e-5 if mode == "cpu-static" else 1e-4
    for b, s, seed in ((5, 29, 1), (3, 13, 2), (1, 7, 3)):  # a smaller bucket after a larger one
        ids, mask = _inputs(cfg, b=b, s=s, seed=seed, device=dev)
        n_ref = ref_runner.prefill(ids, mask, 1, 12)
        n = runner.prefill(ids, mask, 1, 12)
        assert n == n_ref == b
        bb, sb, _ = runner._cur
        rb = _bucket(b, runner.batch_buckets, runner.dec.max_batch, "batch size")
        assert runner._cur == ref_runner._cur and ("prefill", rb, sb, 1) in runner._graphs
        a, r = runner.dec.views(bb, sb), ref_runner.dec.views(bb, sb)
        L = int(mask.sum(1).max())
        for li in range(runner.dec.L):
            torch.testing.assert_close(a.ck[li][:b, :, :L], r.ck[li][:b, :, :L], rtol=0, atol=tol)
            torch.testing.assert_close(a.cv[li][:b, :, :L], r.cv[li][:b, :, :L], rtol=0, atol=tol)
        assert torch.equal(a.cross_bias[:b, :L], r.cross_bias[:b, :L])
        assert bool((a.cross_bias[:b, L:] == torch.finfo(runner.dec.dtype).min).all())
        assert bool((a.cross_bias[b:] == 0).all())
        tok = torch.full((b,), cfg.decoder_start_token_id, device=dev)
        for _ in range(4):
            x, y = runner.step(tok).clone(), ref_runner.step(tok).clone()
            torch.testing.assert_close(x, y, rtol=0, atol=10 * tol)
            tok = y.argmax(-1)
        gc = _gc(cfg, max_new_tokens=10)
        ref = generate(model, ids, mask, gc)
        got = generate(model, ids, mask, gc, runner=runner)
        _assert_equal_up_to_near_ties(model, ids, mask, got.sequences, ref.sequences, tol=tol)
    # mixed lengths that length groups serve better: the eager prefill (no new prefill graph)
    grouped = _runner(model, mode, 16, 24, 32, encoder_launch_cost=1, prefill_graphs=True)
    ids, mask = _ragged(cfg, 8, 24, seed=6, device=dev)
    mask[4:, 8:] = 0
    ids[4:, 8:] = cfg.pad_token_id
    grouped.prefill(ids, mask, 1, 12)
    assert not any(k[0] == "prefill" for k in grouped._graphs)
    # beam search: the eager prefill where beams get expanded cross rows; the same sequences either way
    gc = _gc(cfg, max_new_tokens=8, num_beams=2)
    ids, mask = _inputs(cfg, b=3, s=13, seed=2, device=dev)
    torch.testing.assert_close(generate(model, ids, mask, gc, runner=runner).sequences_scores,
                               generate(model, ids, mask, gc).sequences_scores, rtol=0, atol=1e-4)


def test_static_prefill_refused_under_tensor_parallelism(monkeypatch):
    from encdec_core.runtime.cuda import CudaGraphRunner

    model = _tiny("t5", "cpu")
    monkeypatch.setattr(type(model.ctx), "distributed", property(lambda self: True))
    with pytest.raises(ValueError, match="prefill_graphs=True serves a single rank"):
        CudaGraphRunner(model, 4, 8, 16, compile=False, use_graphs=False, prefill_graphs=True)
    # the default leaves it off there
    assert CudaGraphRunner(model, 4, 8, 16, compile=False, use_graphs=False).prefill_graphs is False


@pytest.mark.parametrize("mode", MODES)
def test_static_prefill_default_and_warmup(mode):
    """prefill_graphs=None (the default) is on where the runner replays CUDA graphs on one rank and
    off without graphs (a CPU: no launches to save, only padding to add); warmup captures each
    (batch, source) bucket's prefill graph with the step graphs, and a request of that bucket then
    replays it (no new capture) with the eager prefill's tokens."""
    from encdec_core.runtime.generation import generate

    dev = "cpu" if mode == "cpu-static" else "cuda"
    model = _tiny("t5", dev)
    assert _runner(model, mode, 8, 16, 32).prefill_graphs is (mode != "cpu-static")
    runner = _runner(model, mode, 8, 16, 32, prefill_graphs=True)
    runner.warmup(batch_sizes=(3,), source_lens=(20,), kinds=("greedy",))
    keys = {k for k in runner._graphs if k[0] == "prefill"}
    assert keys == {("prefill", 4, 32, 1)}
    ids, mask = _inputs(model.cfg, b=3, s=20, seed=4, device=dev)
    gc = _gc(model.cfg, max_new_tokens=6)
    got = generate(model, ids, mask, gc, runner=runner)
    assert {k for k in runner._graphs if k[0] == "prefill"} == keys
    _assert_equal_up_to_near_ties(model, ids, mask, got.sequences, generate(model, ids, mask, gc).sequences,
                                  tol=1e-5 if mode == "cpu-static" else 1e-4)


def test_static_prefill_falls_back_when_capture_fails(monkeypatch):
    """A prefill graph that cannot be captured (compiled here without graphs: the padded prefill
    raising) warns once, and the eager prefill serves this request and the later ones."""
    from encdec_core.runtime.generation import generate

    model = _tiny("bart", "cpu")
    runner = _runner(model, "cpu-static", 16, 24, 32, encoder_launch_cost=0, prefill_graphs=True)

    def broken(rb, sb):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner, "_prefill_fn", broken)
    ids, mask = _inputs(model.cfg, device="cpu")
    gc = _gc(model.cfg, max_new_tokens=6)
    with pytest.warns(UserWarning, match="capturing the prefill failed"):
        out = generate(model, ids, mask, gc, runner=runner)
    assert runner.prefill_graphs is False and not any(k[0] == "prefill" for k in runner._graphs)
    assert torch.equal(out.sequences, generate(model, ids, mask, gc).sequences)
    assert torch.equal(generate(model, ids, mask, gc, runner=runner).sequences, out.sequences)
