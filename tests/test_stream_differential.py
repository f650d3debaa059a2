"""Differential tests: streamed tokens add up to the non-streamed output, and a merged serve batch
equals each of its requests run alone.

1. ``generate(..., streamer=...)`` on the eager runner and on the CUDA-graph runner's CPU code
   (``CudaGraphRunner(..., compile=False, use_graphs=False)``): seeded random greedy / sampling-with-seed
   option sets (lengths, EOS lists or none, forced first / last tokens, per-request forced tokens,
   processors, decoder prefixes of 1-3 columns, num_return_sequences), batch 1-4 with mixed source
   lengths, over tiny T5 and BART. Each step's ``put(tokens, live)`` must be the next column of the
   output's ``sequences`` after the prompt (padding where a row ended), ``live[r]`` True exactly while
   row r has not yet emitted an EOS (the EOS itself is live), so the live tokens of a row are its
   generated tokens through its EOS; one ``end()`` after the last put. The output itself must equal
   the non-streamed call on the same runner (for the graph runner that is often its fused greedy loop,
   which streaming does not use) and on the eager runner. Beam search is refused with a named
   EncDecError; an option set that fails without a streamer fails the same way with one.
   ``Engine.stream_ids`` (tiny T5 engine, batches beyond its max batch size, per-request decoder
   prefixes of different lengths) must stream per output the tokens of ``generate_ids`` after the
   prefix, finish each output once with ``generate``'s text; ``generate_stream`` on a tiny mBART engine
   (per-request target languages and text prefixes) must finish with ``Engine.generate``'s texts.

2. ``Scheduler._run_generate`` (the code ``encdec serve`` runs for a batch ``_gather`` merged: requests
   whose generation options are equal, per-request ``target_lang`` / ``target_prefix`` / ``lora_uid``
   going per input) must give each request what ``Engine.generate`` gives it alone, over random
   greedy / beam options with and without ``return_scores``; one case goes through a started
   scheduler to check that the jobs are indeed merged into one batch.
"""
from __future__ import annotations

import random

import pytest
import torch

from encdec_core.errors import EncDecError

from test_runner_differential import _sources, draw_lengths, draw_processors, family_setups

FAMILIES = ("t5", "bart")
GEN_CASES = 16  # per family
STAGGERED: dict[str, bool] = {}  # case id -> whether some rows stopped being live while others went on
ENGINE_CASES = 6
MBART_CASES = 6
MERGE_CASES = 8
MAX_BATCH = 4
MAX_LEN = 32


# ------------------------------------------------------------------------------------------ helpers
class Recorder:
    """A streamer that records every put and the end."""

    def __init__(self):
        self.steps: list[tuple[list[int], list[bool]]] = []
        self.ended = 0

    def put(self, tokens, live):
        assert self.ended == 0, "put after end"
        assert isinstance(tokens, list) and isinstance(live, list)
        self.steps.append((list(tokens), list(live)))

    def end(self):
        self.ended += 1


@pytest.fixture(scope="module")
def setups():
    """Per family: the tiny model, a CPU graph runner reused by every case (up to 4 requests x 3
    sampled outputs), and the tokens the random model emits most."""
    return family_setups(FAMILIES, MAX_BATCH * 3, MAX_LEN)


def _free_tokens(model, ids, mask) -> list[list[int]]:
    """The tokens each row generates with no options (greedy, 16 new tokens, no EOS)."""
    from encdec_core.runtime.generation import GenerationConfig, generate

    gc = GenerationConfig.from_model(model.cfg, None, max_new_tokens=16, eos_token_id=[], forced_bos_token_id=None,
                                     forced_eos_token_id=None)
    return generate(model, ids, mask, gc).sequences[:, 1:].tolist()


def _gen_case(fam: str, i: int, model, hot: list[int]) -> dict:
    """generate's arguments for case ``i``: greedy or sampling with a seed (a few beam cases, which
    streaming must refuse)."""
    cfg = model.cfg
    rng = random.Random(f"stream-{fam}-{i}")
    start, V = cfg.decoder_start_token_id, cfg.vocab_size
    batch = rng.randint(1, MAX_BATCH)
    ids, mask = _sources(cfg, rng, batch)
    mode = rng.choices(["greedy", "sample", "beam"], [5, 4, 1])[0]
    # some cases keep to the fused greedy loop's options, so the non-streamed graph-runner call takes it
    static = mode == "greedy" and rng.random() < 0.4
    kw: dict = {}
    if mode == "beam":
        kw["num_beams"] = rng.randint(2, 3)
    if mode == "sample":
        kw.update(do_sample=True, seed=rng.randrange(1 << 31), num_return_sequences=rng.randint(1, 3),
                  temperature=rng.choice([1.0, 0.7, 1.5]), top_k=rng.choice([50, 0, 10]), top_p=rng.choice([1.0, 0.9]))
    draw_lengths(rng, kw, 0.25)
    # EOS: mostly tokens that these sources' rows emit (greedy, no options) at random steps, so that
    # rows end early and at different steps (rows no longer live while others go on)
    free = _free_tokens(model, ids, mask)

    def emitted():
        return rng.choice(rng.choice(free)[: rng.randint(1, len(free[0]))])

    r = rng.random()
    if r < 0.55:
        kw["eos_token_id"] = emitted() if rng.random() < 0.8 else rng.choice(hot[:3])
    elif r < 0.8 and not static:
        kw["eos_token_id"] = list({emitted() for _ in range(rng.randint(2, 3))})
    elif r < 0.88:
        kw["eos_token_id"] = []  # no EOS: every row runs to the length limit, live throughout
    if rng.random() < 0.15:
        kw["pad_token_id"] = rng.choice([0, 3, hot[-1]])
    if rng.random() < 0.3:
        kw["forced_bos_token_id"] = rng.choice(hot[:8] + [5])
    if rng.random() < 0.25:
        eos = kw.get("eos_token_id", cfg.eos_token_id)
        one = (eos[0] if eos else cfg.eos_token_id) if isinstance(eos, list) else eos
        kw["forced_eos_token_id"] = rng.choice([one, hot[0], 7])
    forced_rows = None
    if rng.random() < 0.2:
        forced_rows = [rng.choice([None, None, 5, hot[0], hot[2]]) for _ in range(batch)]
    if not static:
        draw_processors(rng, kw, hot, 2)
    prefix = None
    if not static and rng.random() < 0.5:
        cols = rng.randint(1, 3)
        prefix = torch.tensor([[rng.choice(hot[:6] + [11, 40]) for _ in range(cols)] for _ in range(batch)])
        kind = rng.choice(["start", "none", "mixed"])
        prefix[:, 0] = torch.where(prefix[:, 0] == start, (start + 1) % V, prefix[:, 0])
        if kind == "start":
            prefix[:, 0] = start
        elif kind == "mixed":
            prefix[rng.randrange(batch), 0] = start
    return dict(ids=ids, mask=mask, kw=kw, forced_bos_token_ids=forced_rows, decoder_input_ids=prefix)


def _generate(model, runner, case, streamer=None):
    from encdec_core.runtime.generation import GenerationConfig, generate

    try:
        gc = GenerationConfig.from_model(model.cfg, None, **case["kw"])
        return generate(model, case["ids"], case["mask"], gc, runner=runner,
                        forced_bos_token_ids=case["forced_bos_token_ids"],
                        decoder_input_ids=case["decoder_input_ids"], streamer=streamer)
    except Exception as exc:  # noqa: BLE001 - compared by the caller
        return exc


def _check_stream(rec: Recorder, out, what: str) -> None:
    """The recorded puts are ``out``'s tokens after the prompt, column by column, with ``live`` per the
    streamer contract; the live tokens of each row are its generated tokens through its EOS."""
    seqs = out.sequences.tolist()
    p = out.prompt_len
    eos = set(out.eos_token_ids)
    assert rec.ended == 1, f"{what}: end() called {rec.ended} times"
    assert len(rec.steps) == len(seqs[0]) - p, f"{what}: {len(rec.steps)} puts for {len(seqs[0]) - p} tokens"
    for r, row in enumerate(seqs):
        streamed = [tokens[r] for tokens, _ in rec.steps]
        live = [flags[r] for _, flags in rec.steps]
        assert streamed == row[p:], f"{what}: row {r}: streamed {streamed}, output {row[p:]}"
        ended = False
        for k, t in enumerate(row[p:]):
            assert live[k] == (not ended), f"{what}: row {r} step {k}: live {live[k]}, ended {ended} ({row[p:]})"
            ended = ended or t in eos
        got = [t for t, alive in zip(streamed, live) if alive]
        n_eos = 1 if any(t in eos for t in got) else 0
        assert got[: len(got) - n_eos] == out.tokens(r)[p - 1:], f"{what}: row {r}"


# ------------------------------------------------------------------------------ 1. generate's streamer
@pytest.mark.parametrize("i", range(GEN_CASES))
@pytest.mark.parametrize("fam", FAMILIES)
def test_streamed_tokens_equal_generate(setups, fam, i):
    model, runner, hot = setups[fam]
    case = _gen_case(fam, i, model, hot)
    what = f"{fam}-{i}: {case['kw']}, forced_bos_token_ids={case['forced_bos_token_ids']}, decoder_input_ids=" \
           f"{None if case['decoder_input_ids'] is None else case['decoder_input_ids'].tolist()}"
    eager = _generate(model, None, case)
    for name, r in (("eager", None), ("graph", runner)):
        ref = _generate(model, r, case)
        rec = Recorder()
        out = _generate(model, r, case, streamer=rec)
        if case["kw"].get("num_beams", 1) > 1 and isinstance(ref, Exception):  # options refused as such
            assert type(out) is type(ref) and str(out) == str(ref), f"{what} [{name}]: plain {ref!r}, streamed {out!r}"
            continue
        if case["kw"].get("num_beams", 1) > 1:  # streaming refuses beam search, by name, before any work
            assert isinstance(out, EncDecError) and "not num_beams" in str(out), f"{what} [{name}]: {out!r}"
            assert rec.steps == [] and not isinstance(ref, Exception), f"{what} [{name}]: {ref!r}"
            continue
        if isinstance(ref, Exception) or isinstance(out, Exception):
            # the same refusal with or without a streamer (sampling where the options exclude every token)
            assert type(out) is type(ref) and str(out) == str(ref), f"{what} [{name}]: plain {ref!r}, streamed {out!r}"
            assert isinstance(out, EncDecError), f"{what} [{name}]: {out!r}"
            assert type(eager) is type(ref) and str(eager) == str(ref), what
            continue
        assert torch.equal(out.sequences, ref.sequences), \
            f"{what} [{name}]: streamed {out.sequences.tolist()} vs plain {ref.sequences.tolist()}"
        assert torch.equal(out.sequences, eager.sequences), f"{what} [{name}]: vs eager"
        _check_stream(rec, out, f"{what} [{name}]")
        STAGGERED[f"{fam}-{i}"] = any(any(live) and not all(live) for _, live in rec.steps)


def test_generate_cases_cover_the_options(setups):
    """The random cases above reach what they are meant to: sampling, several / no EOS ids, prefixes,
    the beam refusal, rows ending at different steps."""
    seen = {"sample": 0, "multi_eos": 0, "no_eos": 0, "prefix": 0, "beam": 0, "forced_rows": 0}
    for fam in FAMILIES:
        model, _, hot = setups[fam]
        for i in range(GEN_CASES):
            c = _gen_case(fam, i, model, hot)
            kw = c["kw"]
            seen["sample"] += bool(kw.get("do_sample"))
            seen["multi_eos"] += isinstance(kw.get("eos_token_id"), list) and len(kw["eos_token_id"]) > 1
            seen["no_eos"] += kw.get("eos_token_id") == []
            seen["prefix"] += c["decoder_input_ids"] is not None
            seen["beam"] += kw.get("num_beams", 1) > 1
            seen["forced_rows"] += c["forced_bos_token_ids"] is not None
    assert all(v >= 2 for v in seen.values()), seen
    if len(STAGGERED) >= len(FAMILIES) * GEN_CASES // 2:  # the streaming cases ran in this process
        assert sum(STAGGERED.values()) >= 8, STAGGERED


# ------------------------------------------------------------------------------ engines
@pytest.fixture(scope="module")
def t5_engine(tmp_path_factory):
    from _cli_helpers import make_t5_engine
    from conftest import fill_builtin_registry
    from encdec_core.engine import Engine

    d = make_t5_engine(tmp_path_factory.mktemp("stream-diff"), max_batch_size=3, max_output_len=24, max_beam_width=3)
    reg = fill_builtin_registry()  # Engine.tokenizer looks the family up in the registry
    try:
        yield Engine.load(d, device="cpu")
    finally:
        reg.reset()


@pytest.fixture(scope="module")
def mbart_engine(tmp_path_factory):
    from _bart_helpers import tiny
    from conftest import fill_builtin_registry
    from encdec_core.cli import main
    from encdec_core.engine import Engine

    reg = fill_builtin_registry()
    try:
        src = tiny("mbart", tmp_path_factory)
        out = tmp_path_factory.mktemp("stream-diff-mbart")
        ck, eng = out / "ck", out / "eng"
        assert main(["convert", "--model-dir", str(src), "--output-dir", str(ck), "--quiet"]) == 0
        assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(eng), "--max-batch-size", "3",
                     "--max-input-len", "32", "--max-output-len", "24", "--max-beam-width", "3"]) == 0
        yield Engine.load(eng, device="cpu")
    finally:
        reg.reset()


@pytest.fixture
def registry_on(t5_engine):
    """The built-in families registered for one test (module fixtures reset the registry after setup)."""
    from conftest import fill_builtin_registry

    reg = fill_builtin_registry()
    yield
    reg.reset()


T5_WORDS = ["hello", "a", "much", "longer", "input", "here", "x", "y", "naïve", "café", "✓", "the", "cat"]
MBART_LANGS = ["de_DE", "fr_XX", "en_XX"]


def _text(rng, words, lo=1, hi=5) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))


def _engine_opts(rng, sampling: bool, eos_pool: list[int], beams: bool = False) -> dict:
    kw: dict = {"max_new_tokens": rng.randint(1, 10)}
    if sampling and rng.random() < 0.5:
        kw.update(do_sample=True, seed=rng.randrange(1 << 31), num_return_sequences=rng.randint(1, 2),
                  top_k=rng.choice([20, 0]), temperature=rng.choice([1.0, 0.8]))
    elif beams and rng.random() < 0.4:
        kw["num_beams"] = nb = rng.randint(2, 3)
        kw["num_return_sequences"] = rng.randint(1, nb)
        kw["length_penalty"] = rng.choice([1.0, 0.5, 2.0])
    if rng.random() < 0.3:
        kw["min_new_tokens"] = rng.randint(1, 6)
    r = rng.random()
    if r < 0.3:
        kw["eos_token_id"] = rng.sample(eos_pool, rng.randint(1, 2))
    elif r < 0.4:
        kw["eos_token_id"] = []
    if rng.random() < 0.3:
        kw["repetition_penalty"] = rng.choice([1.3, 0.8])
    if rng.random() < 0.25:
        kw["no_repeat_ngram_size"] = rng.choice([1, 2])
    return kw


@pytest.fixture(scope="module")
def t5_hot(t5_engine):
    """Tokens the tiny T5 engine emits often (EOS ids drawn from them end rows early)."""
    ids = [[(7 * i + 3 * j) % 250 + 4 for j in range(1 + i % 9)] for i in range(8)]
    out = t5_engine.generate_ids(ids, max_new_tokens=12, min_new_tokens=12)
    counts = out.sequences[:, 1:].flatten().bincount()
    return [int(t) for t in counts.argsort(descending=True)[:8] if counts[t] > 0]


@pytest.mark.parametrize("i", range(ENGINE_CASES))
def test_engine_stream_ids_equal_generate_ids(t5_engine, t5_hot, registry_on, i):
    """Engine.stream_ids: per output, the streamed tokens are generate_ids' tokens after the decoder
    prefix, each output finishes once with generate's text; 1-5 inputs through an engine of max batch
    size 3, per-request prefixes (of different lengths: separate batches), eager or CPU graph runner."""
    from encdec_core.runtime.cuda import CudaGraphRunner

    engine = t5_engine
    rng = random.Random(f"engine-{i}")
    tok = engine.tokenizer()
    texts = [_text(rng, T5_WORDS) for _ in range(rng.randint(1, 5))]
    ids = tok.encode(texts)
    kw = _engine_opts(rng, True, t5_hot)
    prefix = None
    if rng.random() < 0.6:
        prefix = [rng.choice([None, [], t5_hot[:rng.randint(1, 3)], [rng.randrange(4, 300)]]) for _ in texts]
        if rng.random() < 0.3:
            prefix = t5_hot[: rng.randint(1, 2)]  # one prefix for all
    runner = None
    if rng.random() < 0.5:
        runner = CudaGraphRunner(engine.model, 3 * 2, 24 + 4, 32, compile=False, use_graphs=False)
    what = f"engine-{i}: {texts}, {kw}, prefix={prefix}, runner={runner is not None}"
    ref = engine.generate_ids(ids, runner=runner, decoder_prefix=prefix, **kw)
    gc = engine.generation_config(**kw)
    pre = engine.decoder_prefixes(prefix, len(ids), None, gc) or [[] for _ in ids]
    n = ref.num_return_sequences
    tokens, pieces, finished = {}, {}, {}
    for ev in engine.stream_ids(ids, tok, runner=runner, decoder_prefix=prefix, **kw):
        key = (ev.index, ev.sequence)
        assert key not in finished, f"{what}: an event after {key} finished"
        tokens.setdefault(key, []).extend(ev.tokens)
        pieces.setdefault(key, []).append(ev.text)
        if ev.finished:
            finished[key] = ev.output
    assert set(finished) == {(b, j) for b in range(len(ids)) for j in range(n)}, what
    for (b, j), text in finished.items():
        row = ref.tokens(b * n + j)
        assert row[: len(pre[b])] == pre[b], what
        assert tokens[(b, j)] == row[len(pre[b]):], f"{what}: output {(b, j)}"
        assert text == tok.decode(row), f"{what}: output {(b, j)}"
        assert "".join(pieces[(b, j)]) == text, what  # the first piece includes the prefix's text


@pytest.mark.parametrize("i", range(MBART_CASES))
def test_mbart_generate_stream_equals_generate(mbart_engine, registry_on, i):
    """generate_stream with per-request target languages (mBART-50's forced first token) and text
    prefixes finishes every output with Engine.generate's text."""
    from _bart_helpers import CORPUS

    engine = mbart_engine
    rng = random.Random(f"mbart-stream-{i}")
    words = " ".join(CORPUS).split()
    texts = [_text(rng, words, 1, 6) for _ in range(rng.randint(1, 4))]
    kw = _engine_opts(rng, True, [2, 5, 7])
    langs = rng.choice([None, rng.choice(MBART_LANGS), [rng.choice(MBART_LANGS + [None]) for _ in texts]])
    prefix = rng.choice([None, rng.choice(words), [rng.choice([None, rng.choice(words)]) for _ in texts]])
    what = f"mbart-{i}: {texts}, {kw}, target_lang={langs}, target_prefix={prefix}"
    ref = engine.generate(texts, target_lang=langs, target_prefix=prefix, **kw)
    got: dict = {}
    for ev in engine.generate_stream(texts, target_lang=langs, target_prefix=prefix, **kw):
        if ev.finished:
            assert (ev.index, ev.sequence) not in got, what
            got[(ev.index, ev.sequence)] = ev.output
    assert [[got[(b, j)] for j in range(len(ref[b]))] for b in range(len(texts))] == ref, what


# ------------------------------------------------------------------------------ 2. merged serve batches
def _jobs(rng, engine, langs: bool, hot: list[int], words):
    """2-4 generate jobs with one set of options (one key), each 1-3 texts and its own per-request
    fields."""
    from encdec_core.serve import Job

    # sampling is left out: a request merged into a batch draws other random numbers than alone
    # (generate seeds one generator for the batch, and the rows draw from it together); the server
    # therefore never merges a seeded sampling request (serve.batch_key, the test below)
    params = _engine_opts(rng, False, hot, beams=True)
    scores = rng.random() < 0.3
    jobs = []
    for _ in range(rng.randint(2, 4)):
        per = {}
        if rng.random() < 0.6:
            per["target_prefix"] = _text(rng, words, 1, 2)
        if langs and rng.random() < 0.7:
            per["target_lang"] = rng.choice(MBART_LANGS)
        texts = [_text(rng, words) for _ in range(rng.randint(1, 3))]
        jobs.append(Job("generate", {"texts": texts, "params": dict(params), "per": per, "scores": scores},
                        key=repr((params, scores))))
    return jobs


def _alone(engine, job):
    p = job.payload
    return engine.generate(p["texts"], return_scores=p["scores"], target_lang=p["per"].get("target_lang"),
                           target_prefix=p["per"].get("target_prefix"), **p["params"])


def _same(got, want, what):
    assert len(got) == len(want), what
    for g_row, w_row in zip(got, want):
        assert len(g_row) == len(w_row), what
        for g, w in zip(g_row, w_row):
            if isinstance(w, str):
                assert g == w, f"{what}: {got} vs {want}"
                continue
            assert (g.text, g.tokens) == (w.text, w.tokens), f"{what}: {got} vs {want}"
            assert g.score == pytest.approx(w.score, abs=1e-4), what
            assert g.token_logprobs == pytest.approx(w.token_logprobs, abs=1e-4), what


@pytest.mark.parametrize("i", range(MERGE_CASES))
def test_merged_batch_equals_each_request_alone(t5_engine, t5_hot, mbart_engine, registry_on, i):
    from _bart_helpers import CORPUS
    from encdec_core.serve import Scheduler

    use_mbart = i % 2 == 1
    engine = mbart_engine if use_mbart else t5_engine
    words = " ".join(CORPUS).split() if use_mbart else T5_WORDS
    rng = random.Random(f"merge-{i}")
    jobs = _jobs(rng, engine, use_mbart, [2, 5, 7] if use_mbart else t5_hot, words)
    what = f"merge-{i} ({'mbart' if use_mbart else 't5'}): " + "; ".join(
        f"{j.payload['texts']} {j.payload['per']}" for j in jobs) + f" | {jobs[0].payload['params']}, " \
        f"scores={jobs[0].payload['scores']}"
    merged = Scheduler(engine, max_delay=0.0)._run_generate(jobs)
    for k, job in enumerate(jobs):
        _same(merged[k], _alone(engine, job), f"{what}: job {k}")


def _through_scheduler(engine, jobs, max_delay: float = 5.0, **kw):
    """Submit ``jobs`` together to a started scheduler (``max_delay`` s to gather: a batch that does
    not fill up waits that long), wait for all, stop it; -> it."""
    from encdec_core.serve import Scheduler

    s = Scheduler(engine, max_delay=max_delay, **kw)
    try:
        s.start()
        for j in jobs:
            s.submit(j)
        for j in jobs:
            assert j.done.wait(60)
    finally:
        s.stop()
    return s


def test_scheduler_merges_the_jobs_it_gathers(mbart_engine, registry_on):
    """Through a started scheduler: jobs with one key submitted together run as one batch, and each
    gets what it gets alone."""
    from _bart_helpers import CORPUS

    engine = mbart_engine
    rng = random.Random("gather")
    jobs = _jobs(rng, engine, True, [2, 5, 7], " ".join(CORPUS).split())[:2]
    for j in jobs:
        j.payload["texts"] = j.payload["texts"][:1]  # within the engine's max batch size (3) together
    assert _through_scheduler(engine, jobs, max_inputs=2).batches == 1
    for j in jobs:
        assert j.error is None, j.error
        _same(j.result, _alone(engine, j), str(j.payload))


def test_seeded_sampling_requests_run_alone(t5_engine, registry_on):
    """Two sampling requests with the same options and seed, submitted together: each runs as its own
    batch, so each gets exactly its tokens alone (merged, the second row's draws would follow the
    first's). Unseeded sampling and greedy requests with equal options still share a key."""
    from encdec_core.serve import Job, batch_key

    engine = t5_engine
    params = dict(do_sample=True, seed=11, top_k=20, max_new_tokens=8)
    assert batch_key(params, False) != batch_key(dict(params), False)
    for p in (dict(do_sample=True, top_k=20), dict(num_beams=2), {}):
        assert batch_key(p, False) == batch_key(dict(p), False)
    jobs = [Job("generate", {"texts": [t], "params": dict(params), "per": {}, "scores": False},
                batch_key(params, False)) for t in (T5_WORDS[0] + " " + T5_WORDS[1], T5_WORDS[2])]
    assert _through_scheduler(engine, jobs, max_delay=0.5).batches == 2  # submitted within the window
    for j in jobs:
        assert j.error is None, j.error
        _same(j.result, _alone(engine, j), str(j.payload))
