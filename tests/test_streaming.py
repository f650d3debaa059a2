"""Streaming: generate's streamer, Engine.generate_stream / stream_ids and `encdec run --streaming`.

The streamed tokens are the tokens `generate` returns (greedy and sampling, batches beyond the
engine's max batch size too), the text pieces add up to each output, an iterator closed early
stops the generation, and errors reach the consumer.
"""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from encdec_core.cli import main
from encdec_core.errors import EncDecError

from _cli_helpers import make_t5_engine


@pytest.fixture(autouse=True)
def _families(builtin_registry):
    """The CLI and the engine look families up in the process-wide registry (filled per test)."""
    yield


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return make_t5_engine(tmp_path_factory.mktemp("stream"), max_batch_size=3, max_output_len=16)


@pytest.fixture
def engine(engine_dir):
    from encdec_core.engine import Engine

    return Engine.load(engine_dir, device="cpu")


TEXTS = ["hello", "a much longer input here", "x y", "another input", "one", "naïve café ✓"]


class Recorder:
    def __init__(self):
        self.steps, self.ended = [], 0

    def put(self, tokens, live):
        assert self.ended == 0
        self.steps.append((list(tokens), list(live)))

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("kw", [dict(max_new_tokens=12), dict(max_new_tokens=9, do_sample=True, seed=5,
                                                              num_return_sequences=2, top_k=20)],
                         ids=["greedy", "sampling"])
def test_generate_streamer_sees_every_token(engine, kw):
    """generate(streamer=...): one put per step with each row's token (padding once a row ended,
    flagged not live), then one end; the tokens are generate's."""
    from encdec_core.runtime.generation import GenerationConfig, generate

    tok = engine.tokenizer()
    ids = tok.encode(TEXTS[:3])
    width = max(map(len, ids))
    inp = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    gc = GenerationConfig.from_model(engine.config, engine.generation_defaults, **kw)
    ref = generate(engine.model, inp, mask, gc)
    rec = Recorder()
    out = generate(engine.model, inp, mask, gc, streamer=rec)
    assert torch.equal(out.sequences, ref.sequences) and rec.ended == 1
    cols = list(zip(*[t for t, _ in rec.steps]))  # per row, the streamed tokens
    live = list(zip(*[l for _, l in rec.steps]))
    assert len(rec.steps) == out.sequences.shape[1] - 1
    for r in range(len(out)):
        n_live = sum(live[r])
        assert list(cols[r][:n_live]) == out.sequences[r, 1: 1 + n_live].tolist()
        assert out.tokens(r) == list(cols[r][:len(out.tokens(r))])
        assert all(not x for x in live[r][n_live:])  # once ended, never live again


def test_streamer_refusals(engine):
    from encdec_core.runtime.generation import GenerationConfig, generate

    inp = torch.tensor([[5, 6, 1]])
    gc = GenerationConfig.from_model(engine.config, None, max_new_tokens=4, num_beams=2)
    with pytest.raises(EncDecError, match="not num_beams = 2"):
        generate(engine.model, inp, None, gc, streamer=Recorder())
    with pytest.raises(EncDecError, match="put\\(tokens, live\\) and end"):
        generate(engine.model, inp, None, GenerationConfig.from_model(engine.config, None), streamer=print)
    with pytest.raises(EncDecError, match="not num_beams = 2"):
        next(engine.generate_stream(["abc"], num_beams=2, max_new_tokens=4))
    with pytest.raises(EncDecError, match="on_token"):
        engine.generate_ids([[5, 6, 1]], on_token=3)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=14), dict(max_new_tokens=10, do_sample=True, seed=3,
                                                              num_return_sequences=2)],
                         ids=["greedy", "sampling"])
def test_generate_stream_adds_up_to_generate(engine, kw):
    """Six inputs through an engine of max batch size 3 (two batches): every output streams its
    tokens and text pieces, finishes once, and the pieces and the final text equal generate's."""
    ref = engine.generate(TEXTS, **kw)
    ref_ids = engine.generate_ids(engine.tokenizer().encode(TEXTS), **kw)
    n = len(ref[0])
    pieces, tokens, finished = {}, {}, {}
    for ev in engine.generate_stream(TEXTS, **kw):
        key = (ev.index, ev.sequence)
        assert key not in finished, "an event after the output finished"
        pieces.setdefault(key, []).append(ev.text)
        tokens.setdefault(key, []).extend(ev.tokens)
        if ev.finished:
            finished[key] = ev.output
        else:
            assert ev.output is None
    assert set(finished) == {(i, j) for i in range(len(TEXTS)) for j in range(n)}
    for (i, j), text in finished.items():
        assert text == ref[i][j]
        assert "".join(pieces[(i, j)]) == text
        assert tokens[(i, j)] == ref_ids.tokens(i * n + j)
    assert any(len(p) > 3 for p in pieces.values())  # text arrives in pieces, not at the end


def test_detokenizer_waits_for_whole_characters():
    """Byte-level tokens that split a UTF-8 character give no text until the character is complete."""
    from encdec_core.engine import _Detokenizer

    class Bytes:
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    data = list("añ✓ b€".encode())
    d = _Detokenizer(Bytes())
    got = [d.add(b) for b in data]
    rest, full = d.finish()
    assert full == "añ✓ b€" and "".join(got) + rest == full
    assert all("\ufffd" not in g for g in got)
    assert got[1] == "" and got[2] == "ñ"  # ñ is two bytes: nothing after the first


def test_closing_the_stream_stops_generation(engine):
    """A consumer that stops after the first event ends the worker thread before its next step."""
    calls = []
    real = engine.generate_ids

    def spy(*a, on_token=None, **k):
        def counted(*x):
            calls.append(x)
            if len(calls) == 2:
                time.sleep(1.0)  # a slow generation: the consumer closes before the second token is out
            return on_token(*x)
        return real(*a, on_token=counted, **k)

    engine.generate_ids = spy
    try:
        before = threading.active_count()
        stream = engine.generate_stream(TEXTS, max_new_tokens=16, min_new_tokens=16)
        first = next(stream)
        stream.close()
        assert first.index in range(len(TEXTS))
        assert threading.active_count() == before  # the worker has ended
        # it stopped before its second step (no output got a second token), not after the 6 x 16
        # tokens of the whole request
        assert 2 <= len(calls) <= len(TEXTS), calls
        assert len({(req, seq) for req, seq, _, _ in calls}) == len(calls), calls
    finally:
        del engine.generate_ids


def test_errors_reach_the_consumer(engine):
    with pytest.raises(EncDecError, match="max_output_len|output length|16"):
        list(engine.generate_stream(["abc"], max_new_tokens=40))
    with pytest.raises(EncDecError, match="texts\\[1\\]"):
        engine.generate_stream(["abc", 3])


def test_run_streaming_cli(engine_dir, tmp_path, capsys):
    """run --streaming: one input prints its output as it comes; several print each output when it is
    complete; --output-json holds the outputs of a plain run; beams and --compare-hf are refused
    with the flag named."""
    base = ["run", "--engine-dir", str(engine_dir), "--device", "cpu", "--max-output-len", "10"]
    plain, streamed = tmp_path / "plain.json", tmp_path / "streamed.json"
    assert main([*base, "--input-text", *TEXTS[:4], "--output-json", str(plain)]) == 0
    capsys.readouterr()
    assert main([*base, "--input-text", *TEXTS[:4], "--streaming", "--output-json", str(streamed)]) == 0
    printed = capsys.readouterr().out
    want = json.loads(plain.read_text())["results"]
    assert [r["output"] for r in json.loads(streamed.read_text())["results"]] == [r["output"] for r in want]
    assert printed.count("Input : ") == 4 and all(f"Output: {r['output'][0]}\n" in printed for r in want)

    assert main([*base, "--input-text", TEXTS[0], "--streaming"]) == 0
    assert capsys.readouterr().out == f"Input : {TEXTS[0]}\nOutput: {want[0]['output'][0]}\n\n"

    assert main([*base, "--input-text", TEXTS[0], "--streaming", "--num-beams", "2"]) == 2
    assert "add --num-beams 1" in capsys.readouterr().err
    assert main([*base, "--input-text", TEXTS[0], "--streaming", "--compare-hf"]) == 2
    assert "--streaming and --compare-hf" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stream_through_the_cuda_graph_runner(engine_dir):
    """On a GPU, streaming through the CUDA-graph runner (its step, not its fused loop) gives the
    tokens of the runner's own greedy decoding and of the eager path."""
    from encdec_core.engine import Engine
    from encdec_core.runtime.cuda import CudaGraphRunner

    engine = Engine.load(engine_dir, device="cuda")
    runner = CudaGraphRunner.for_engine(engine)
    ids = engine.tokenizer().encode(TEXTS)
    fused = engine.generate_ids(ids, runner=runner, max_new_tokens=12)
    eager = engine.generate_ids(ids, max_new_tokens=12)
    got = {}
    for ev in engine.stream_ids(ids, engine.tokenizer(), runner=runner, max_new_tokens=12):
        got.setdefault(ev.index, []).extend(ev.tokens)
    assert [got[i] for i in range(len(ids))] == fused.all_tokens() == eager.all_tokens()
