"""Differential test: generate() through the CUDA-graph runner equals generate() on the eager runner.

The eager runner is the reference (it equals HF transformers' generate: tests/test_generation.py).
``CudaGraphRunner(..., compile=False, use_graphs=False)`` runs on a CPU the same code as on a GPU
except the graphs and the compilation: its fused greedy loop (``greedy_search``), beam search inside
the runner (``beam_search``) and, for everything else, generate's token loop through the runner's
``step`` / ``reorder``. Seeded random cases over tiny T5 and BART models compare every output field:
``sequences`` exactly, ``sequences_scores`` and ``token_scores`` to 1e-5 (NaN where the other has NaN:
a forced token that is also begin-suppressed leaves no finite score, on both paths and in HF). An option
set that both paths refuse must be refused with the same error class and message (sampling where the
options exclude every token; forced tokens that are all in suppress_tokens, which HF refuses too).

Varied: batch 1-5 with right-padded mixed source lengths (also without a mask, and int32 ids); greedy,
beam search (2-4 beams, num_return_sequences, length_penalty, early_stopping True / False / "never"),
sampling and beam sampling with a seed (temperature, top_k, top_p); max_new_tokens / max_length / the
default length, min_new_tokens / min_length; one EOS id, several or none; pad_token_id;
forced_bos_token_id, per-request forced_bos_token_ids (None entries mixed), forced_eos_token_id (one
or several); repetition_penalty, no_repeat_ngram_size, suppress_tokens, begin_suppress_tokens,
bad_words_ids; decoder_input_ids of 1-3 columns (every row with the start token first, none, mixed);
output_scores.

Sampling with a ``seed`` draws the same tokens on both paths: generate draws from a generator seeded
from ``seed`` (module docstring of runtime/generation.py; HF's tokens on a CPU,
tests/test_generation.py::test_sampling_matches_hf_with_the_same_seed), and the runner only supplies
the logits, so the draws are the same wherever the logits agree to rounding.

The cases run on one runner per model (reused, as a server does: buffers and cached beam graphs of
earlier cases must not leak into later ones). ``test_cases_reach_every_path`` checks that the cases
reach the fused greedy loop, beam search in the runner and the token loop.
"""
from __future__ import annotations

import random

import pytest
import torch

from test_cuda_runner import _tiny

FAMILIES = ("t5", "bart")
CASES_PER_FAMILY = 30
MAX_BATCH, MAX_SRC = 5, 20  # requests per case, source tokens per request
MAX_LEN = 32  # decoder length the runner holds: new tokens (<= 16, or HF's default 20) + prefix (<= 4)
PATHS: dict[str, str] = {}  # case id -> the path the runner took ("fused-greedy", "fused-beam", "token-loop")


def family_setups(families, runner_rows: int, max_len: int) -> dict:
    """Per family: the tiny model, one CPU graph runner of ``runner_rows`` rows reused by every case,
    and "hot" tokens (the tokens the random model emits most: EOS ids and banned tokens drawn from
    them make rows end early and the processors change the output)."""
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.generation import GenerationConfig, generate

    out = {}
    for fam in families:
        model = _tiny(fam, "cpu")
        cfg = model.cfg
        ids, mask = _sources(cfg, random.Random(7), 4)
        gc = GenerationConfig.from_model(cfg, None, max_new_tokens=16, min_new_tokens=16, forced_bos_token_id=None,
                                         forced_eos_token_id=None)
        free = generate(model, ids, mask, gc).sequences[:, 1:]
        counts = free.flatten().bincount(minlength=cfg.vocab_size)
        hot = [int(t) for t in counts.argsort(descending=True)[:12] if counts[t] > 0]
        runner = CudaGraphRunner(model, runner_rows, max_len, MAX_SRC, compile=False, use_graphs=False)
        out[fam] = (model, runner, hot)
    return out


@pytest.fixture(scope="module")
def setups():
    return family_setups(FAMILIES, MAX_BATCH * 4, MAX_LEN)  # up to 5 requests x 4 beams


def _sources(cfg, rng: random.Random, batch: int):
    """[batch, S] random source ids, right-padded to mixed lengths (every row at least 1 token)."""
    lens = [rng.randint(1, MAX_SRC) for _ in range(batch)]
    s = max(lens)
    ids = torch.full((batch, s), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, s), dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, :n] = torch.tensor([rng.randrange(4, cfg.vocab_size) for _ in range(n)])
        mask[i, :n] = 1
    return ids, mask


def draw_lengths(rng: random.Random, kw: dict, p_min: float) -> None:
    """Lengths into ``kw``: max_new_tokens, max_length (counts the prefix) or HF's default of 20 new
    tokens; with chance ``p_min`` a minimum (min_new_tokens or min_length)."""
    r = rng.random()
    if r < 0.6:
        kw["max_new_tokens"] = rng.randint(1, 16)
    elif r < 0.85:
        kw["max_length"] = rng.randint(6, 18)
    if rng.random() < p_min:
        if rng.random() < 0.6:
            kw["min_new_tokens"] = rng.randint(1, 18)
        else:
            kw["min_length"] = rng.randint(2, 12)


def draw_processors(rng: random.Random, kw: dict, hot: list[int], max_bad_words: int) -> None:
    """Token-dependent processors, each drawn with its own chance, into ``kw``: repetition penalty,
    n-gram ban, suppressed / begin-suppressed tokens and bad words from the ``hot`` tokens."""
    if rng.random() < 0.3:
        kw["repetition_penalty"] = rng.choice([1.3, 0.8, 2.0])
    if rng.random() < 0.3:
        kw["no_repeat_ngram_size"] = rng.choice([1, 2, 3])
    if rng.random() < 0.25:
        kw["suppress_tokens"] = rng.sample(hot[:10], rng.randint(1, 3))
    if rng.random() < 0.25:
        kw["begin_suppress_tokens"] = rng.sample(hot[:10], rng.randint(1, 3))
    if rng.random() < 0.25:
        kw["bad_words_ids"] = [rng.sample(hot[:10], rng.randint(1, 3)) for _ in range(rng.randint(1, max_bad_words))]


def _case(fam: str, i: int, cfg, hot: list[int]) -> dict:
    """Case ``i`` of family ``fam``: generate's arguments, drawn from a seeded RNG."""
    rng = random.Random(f"{fam}-{i}")
    start, V = cfg.decoder_start_token_id, cfg.vocab_size
    batch = rng.randint(1, MAX_BATCH)
    ids, mask = _sources(cfg, rng, batch)
    r = rng.random()
    if r < 0.1:
        mask = None  # every token a source token (the padding too)
    elif r < 0.2:
        ids, mask = ids.int(), mask.int()
    # a third of the cases use only options the runner's fused loops implement (the processors depend
    # on the position only, a prefix of the start token alone, no scores), so that the fused greedy
    # loop and beam search in the runner are reached
    static = rng.random() < 0.35
    mode = rng.choices(["greedy", "beam", "sample", "beam_sample"], [4, 4, 2, 1])[0]
    if static and mode in ("sample", "beam_sample"):
        mode = mode.replace("sample", "").strip("_") or "greedy"
    kw: dict = {}
    if mode in ("beam", "beam_sample"):
        kw["num_beams"] = nb = rng.randint(2, 4)
        kw["num_return_sequences"] = rng.randint(1, nb)
        kw["length_penalty"] = rng.choice([1.0, 0.6, 2.0, 0.0, -0.5])
        kw["early_stopping"] = rng.choice([True, False, "never"])
    if mode in ("sample", "beam_sample"):
        kw.update(do_sample=True, seed=rng.randrange(1 << 31))
        if mode == "sample":
            kw["num_return_sequences"] = rng.randint(1, 3)
        kw["temperature"] = rng.choice([1.0, 0.7, 1.5])
        kw["top_k"] = rng.choice([50, 0, 10])
        kw["top_p"] = rng.choice([1.0, 0.9])
    draw_lengths(rng, kw, 0.35)
    # EOS: one id or a list (hot tokens, so that rows end early), else the model's
    r = rng.random()
    if r < 0.5:
        kw["eos_token_id"] = rng.choice(hot[:6])
    elif r < 0.7 and (mode == "beam" or not static):  # several: not the fused greedy loop's case
        kw["eos_token_id"] = rng.sample(hot[:8], rng.randint(2, 3))
    elif r < 0.75:
        kw["eos_token_id"] = []  # no EOS: every row runs to the length limit
    if rng.random() < 0.15:
        kw["pad_token_id"] = rng.choice([0, 3, hot[-1]])
    # forced first / last tokens: BART's config forces 0 / EOS unless overridden (None keeps it)
    if rng.random() < 0.35:
        kw["forced_bos_token_id"] = rng.choice(hot[:8] + [5])
    if rng.random() < 0.3:
        eos = kw.get("eos_token_id", cfg.eos_token_id)
        one = (eos[0] if eos else cfg.eos_token_id) if isinstance(eos, list) else eos
        kw["forced_eos_token_id"] = (rng.choice([one, hot[0], 7]) if rng.random() < 0.6
                                     else rng.sample([one, hot[1], 9], 2))
    forced_rows = None
    if rng.random() < 0.25:
        forced_rows = [rng.choice([None, None, 5, 9, hot[0], hot[2]]) for _ in range(batch)]
    if not static:  # token-dependent processors: the token loop
        draw_processors(rng, kw, hot, 3)
    # decoder prefix: none; every row with the start token first; none with it (generate puts it in
    # front); or mixed (rows keep their own first tokens: HF's rule). 1-3 columns.
    prefix = None
    if rng.random() >= (0.5 if static else 0.3):
        cols = 1 if static else rng.randint(1, 3)
        prefix = torch.tensor([[rng.choice(hot[:6] + [11, 40]) for _ in range(cols)] for _ in range(batch)])
        kind = "start" if static else rng.choice(["start", "none", "mixed"])
        if kind == "start":
            prefix[:, 0] = start
        elif kind == "none":
            prefix[:, 0] = torch.where(prefix[:, 0] == start, (start + 1) % V, prefix[:, 0])
        else:
            prefix[:, 0] = torch.where(prefix[:, 0] == start, (start + 1) % V, prefix[:, 0])
            prefix[rng.randrange(batch), 0] = start
    output_scores = not static and rng.random() < 0.4
    return dict(ids=ids, mask=mask, kw=kw, forced_bos_token_ids=forced_rows, decoder_input_ids=prefix,
                output_scores=output_scores)


def _run(model, runner, case):
    """generate's output for ``case`` on ``runner`` (None: eager), or the exception it raised."""
    from encdec_core.runtime.generation import GenerationConfig, generate

    try:
        gc = GenerationConfig.from_model(model.cfg, None, **case["kw"])
        return generate(model, case["ids"], case["mask"], gc, runner=runner,
                        forced_bos_token_ids=case["forced_bos_token_ids"],
                        decoder_input_ids=case["decoder_input_ids"], output_scores=case["output_scores"])
    except Exception as exc:  # noqa: BLE001 - compared below
        return exc


def _path_spy(runner, monkeypatch) -> list:
    """Record which of the runner's fused loops generate calls."""
    calls = []
    for name in ("greedy_search", "beam_search"):
        real = getattr(runner, name)
        monkeypatch.setattr(runner, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    return calls


@pytest.mark.parametrize("i", range(CASES_PER_FAMILY))
@pytest.mark.parametrize("fam", FAMILIES)
def test_runner_equals_eager(setups, fam, i, monkeypatch):
    model, runner, hot = setups[fam]
    case = _case(fam, i, model.cfg, hot)
    ref = _run(model, None, case)
    calls = _path_spy(runner, monkeypatch)
    out = _run(model, runner, case)
    what = f"{fam}-{i}: {case['kw']}, forced_bos_token_ids={case['forced_bos_token_ids']}, " \
           f"decoder_input_ids={None if case['decoder_input_ids'] is None else case['decoder_input_ids'].tolist()}, " \
           f"output_scores={case['output_scores']}"
    if isinstance(ref, Exception) or isinstance(out, Exception):
        assert type(out) is type(ref) and str(out) == str(ref), f"{what}: eager {ref!r}, runner {out!r}"
        PATHS[f"{fam}-{i}"] = "refused"
        return
    PATHS[f"{fam}-{i}"] = {"greedy_search": "fused-greedy", "beam_search": "fused-beam"}.get(
        calls[0] if calls else None, "token-loop")
    assert out.sequences.shape == ref.sequences.shape, f"{what}: {out.sequences.tolist()} vs {ref.sequences.tolist()}"
    assert torch.equal(out.sequences, ref.sequences), f"{what}: {out.sequences.tolist()} vs {ref.sequences.tolist()}"
    assert (out.sequences_scores is None) == (ref.sequences_scores is None), what
    if ref.sequences_scores is not None:
        torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=1e-5, atol=1e-5, msg=what)
    assert (out.token_scores is None) == (ref.token_scores is None), what
    if ref.token_scores is not None:
        torch.testing.assert_close(out.token_scores, ref.token_scores, rtol=1e-5, atol=1e-5, equal_nan=True,
                                   msg=what)
    assert out.prompt_len == ref.prompt_len and out.num_return_sequences == ref.num_return_sequences, what
    assert out.all_tokens() == ref.all_tokens(), what


def test_cases_reach_every_path():
    """The cases above (run first, in this process) reach each of the runner's paths several times."""
    if len(PATHS) < len(FAMILIES) * CASES_PER_FAMILY:
        pytest.skip("run the whole file: the paths are recorded by test_runner_equals_eager")
    seen = list(PATHS.values())
    for path in ("fused-greedy", "fused-beam", "token-loop"):
        assert seen.count(path) >= 5, (path, PATHS)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=3, num_return_sequences=2),
                                dict(max_new_tokens=6, do_sample=True, seed=3, num_return_sequences=2)],
                         ids=["greedy", "beam", "sample"])
def test_per_request_forced_bos_with_begin_suppress(setups, kw):
    """Per-request forced first tokens with begin_suppress_tokens and no forced_bos_token_id in the
    config: each request is generated as HF generates it alone with its own forced_bos_token_id
    (None: not forced), where the suppression at the beginning applies after a forced first token.
    Found by the random cases above: both paths suppressed the forced token itself (all -inf: "exclude
    every token" when sampling), as the batch's begin index ignored the per-request forced tokens."""
    from encdec_core.runtime.generation import GenerationConfig, generate

    model, runner, hot = setups["t5"]
    cfg = model.cfg
    ids, mask = _sources(cfg, random.Random(3), 3)
    forced = [hot[0], None, hot[1]]
    begin = [hot[0], hot[1], hot[2]]
    opts = dict(kw, begin_suppress_tokens=begin)
    ref, out = [generate(model, ids, mask, GenerationConfig.from_model(cfg, None, **opts), runner=r,
                         forced_bos_token_ids=forced) for r in (None, runner)]
    assert torch.equal(out.sequences, ref.sequences)
    n = kw.get("num_return_sequences", 1)
    assert len(ref) == 3 * n
    for b, want in enumerate(forced):
        for row in ref.request_tokens(b):
            assert (row[0] == want and row[1] not in begin) if want is not None else row[0] not in begin, (b, row)
        if kw.get("do_sample"):  # a request alone draws other random numbers than in the batch
            continue
        s = int(mask[b].sum())
        alone = generate(model, ids[b:b + 1, :s], mask[b:b + 1, :s],
                         GenerationConfig.from_model(cfg, None, forced_bos_token_id=want, **opts))
        assert ref.request_tokens(b) == alone.all_tokens(), (b, want)
