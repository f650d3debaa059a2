"""encdec serve: the HTTP server's outputs equal Engine.generate / score, concurrent requests with
the same options share batches, streaming sends the output in pieces, and bad requests get a JSON
error naming the field while the requests batched with them still succeed."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from encdec_core.cli import main

from _cli_helpers import make_t5_engine

TEXTS = ["hello", "a much longer input here", "x y", "another input", "one", "two words"]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return make_t5_engine(tmp_path_factory.mktemp("serve"), max_batch_size=8, max_output_len=12)


def _serving(engine_dir, **kw):
    """(a started server on a free port, its engine); closed when the generator is."""
    from encdec_core.engine import Engine
    from encdec_core.serve import Server

    engine = Engine.load(engine_dir, device="cpu")
    srv = Server(engine, "127.0.0.1", 0, **kw).start()
    yield srv, engine
    srv.close()


@pytest.fixture
def server(engine_dir, builtin_registry):
    yield from _serving(engine_dir, max_delay=0.3)


def _post(srv, path, body, raw: bytes | None = None):
    host, port = srv.address
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def _post_together(srv, bodies: list) -> list:
    """Each of ``bodies`` (an object, or bytes sent as they are) POSTed to /v1/generate by its own
    client thread, all released at once so that the scheduler can batch them: their (status, content
    type, body), in order."""
    out = [None] * len(bodies)
    go = threading.Barrier(len(bodies))

    def client(i):
        go.wait()
        b = bodies[i]
        out[i] = _post(srv, "/v1/generate", None, b) if isinstance(b, bytes) else _post(srv, "/v1/generate", b)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _get(srv, path):
    host, port = srv.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_concurrent_requests_are_batched_and_equal_generate(server):
    """Six clients at once, one input each, the same options: fewer batches than requests, and each
    output is what Engine.generate gives that input alone; other options run in their own batch."""
    srv, engine = server
    params = dict(max_new_tokens=8, num_beams=2)
    results = _post_together(srv, [{"inputs": t, "parameters": params} for t in TEXTS])
    for i, (status, ctype, body) in enumerate(results):
        assert status == 200 and ctype.startswith("application/json"), body
        assert json.loads(body)["outputs"] == engine.generate([TEXTS[i]], **params)
    _, health = _get(srv, "/health")
    assert health["requests"] == len(TEXTS) and health["batches"] < len(TEXTS)
    # a list of inputs, other options and a per-request prefix: its own batch, same as generate
    status, _, body = _post(srv, "/v1/generate", {"inputs": TEXTS[:2], "parameters": {
        "max_new_tokens": 6, "target_prefix": "ab", "return_scores": True}})
    assert status == 200
    want = engine.generate(TEXTS[:2], max_new_tokens=6, target_prefix="ab", return_scores=True)
    got = json.loads(body)["outputs"]
    for g_row, w_row in zip(got, want):
        for g, w in zip(g_row, w_row):
            assert g["text"] == w.text and g["tokens"] == w.tokens and g["text"].startswith("ab")
            assert g["score"] == pytest.approx(w.score, abs=1e-5)
            assert g["token_logprobs"] == pytest.approx(w.token_logprobs, abs=1e-5)


def test_streaming_sends_events_that_add_up(server):
    srv, engine = server
    status, ctype, body = _post(srv, "/v1/generate", {"inputs": TEXTS[:3], "stream": True,
                                                      "parameters": {"max_new_tokens": 10}})
    assert status == 200 and ctype.startswith("text/event-stream")
    chunks = [c[len("data: "):] for c in body.split("\n\n") if c.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    want = engine.generate(TEXTS[:3], max_new_tokens=10)
    for i in range(3):
        mine = [e for e in events if e["index"] == i]
        assert "".join(e["text"] for e in mine) == want[i][0]
        assert mine[-1]["finished"] and mine[-1]["output"] == want[i][0]
        assert sum(e["finished"] for e in mine) == 1
    assert len(events) > 3  # pieces, not one event per output
    # a refused streaming request is a plain JSON error
    status, ctype, body = _post(srv, "/v1/generate", {"inputs": "abc", "stream": True,
                                                      "parameters": {"num_beams": 2, "max_new_tokens": 4}})
    assert status == 400 and "num_beams = 2" in json.loads(body)["error"]


def test_score_endpoint_equals_engine_score(server):
    srv, engine = server
    status, _, body = _post(srv, "/v1/score", {"sources": TEXTS[:2], "targets": ["hi", "a b"]})
    assert status == 200
    got = json.loads(body)["results"]
    want = engine.score(TEXTS[:2], ["hi", "a b"])
    for g, w in zip(got, want):
        assert g["tokens"] == w.tokens and g["sum"] == pytest.approx(w.sum, abs=1e-5)
        assert g["score"] == pytest.approx(w.mean, abs=1e-5)


@pytest.mark.parametrize("path, body, raw, status, words", [
    ("/v1/generate", None, b"{not json", 400, "not JSON"),
    ("/v1/generate", None, b"[" * 100000, 400, "not JSON"),  # were 500s: RecursionError, ValueError
    ("/v1/score", None, b'{"sources": ' + b"9" * 5000 + b"}", 400, "not JSON"),
    ("/v1/generate", [1, 2], None, 400, "expected a JSON object"),
    ("/v1/generate", {"input": "x"}, None, 400, "unknown field(s) ['input']"),
    ("/v1/generate", {"inputs": []}, None, 400, "inputs = []"),
    ("/v1/generate", {"inputs": ["a", 3]}, None, 400, "inputs[1] = 3"),
    ("/v1/generate", {"inputs": "a", "parameters": {"num_beamz": 2}}, None, 400, "unknown option(s) ['num_beamz']"),
    ("/v1/generate", {"inputs": "a", "parameters": 0}, None, 400, "parameters = 0: expected an object"),
    ("/v1/generate", {"inputs": "a", "parameters": []}, None, 400, "parameters = []: expected an object"),
    ("/v1/generate", {"inputs": "a", "parameters": {"num_beams": 0}}, None, 400, "num_beams"),
    ("/v1/generate", {"inputs": "a", "parameters": {"temperature": "hot", "max_new_tokens": 2}}, None, 400,
     "field 'temperature' = 'hot': expected a number"),
    ("/v1/generate", {"inputs": "a", "parameters": {"top_p": [1], "max_new_tokens": 2}}, None, 400,
     "field 'top_p' = [1]: expected a number"),
    ("/v1/generate", {"inputs": "a", "parameters": {"max_new_tokens": 50}}, None, 400, "limit 12"),
    ("/v1/generate", {"inputs": "a", "parameters": {"do_sample": True, "temperature": 1e-308, "max_new_tokens": 2}},
     None, 400, "field 'temperature' = 1e-308: expected a number >= 1e-05"),
    ("/v1/generate", {"inputs": "a", "parameters": {"num_beams": 2, "length_penalty": 400, "max_new_tokens": 8}},
     None, 400, "field 'length_penalty' = 400: expected a number in [-20.18, 20.18] for beam search with max_length 9"),
    ("/v1/generate", {"inputs": "a", "parameters": {"target_prefix": 3}}, None, 400, "target_prefix = 3"),
    ("/v1/generate", {"inputs": "a", "stream": "yes"}, None, 400, 'stream = "yes"'),
    ("/v1/score", {"sources": ["a"]}, None, 400, "missing field 'targets'"),
    ("/v1/score", {"sources": ["a"], "targets": ["b"], "lora_uid": "x"}, None, 400,
     'lora_uid = "x": expected an integer'),
    ("/v1/generate", {"inputs": "a", "parameters": {"target_lang": "xx"}}, None, 400, "target language 'xx'"),
    ("/v1/score", {"sources": ["a"], "targets": ["b", "c"]}, None, 400, "targets"),
    ("/v1/nothing", {}, None, 404, "no such path"),
], ids=["json", "json-nested-deep", "json-huge-integer", "not-object", "unknown-field", "empty", "not-string",
        "unknown-option",
        "parameters-0", "parameters-empty-list", "bad-option", "greedy-temperature-type", "greedy-top-p-type", "limit",
        "tiny-temperature", "huge-length-penalty",
        "prefix-type", "stream-type", "score-missing", "score-lora-type", "target-lang-unknown", "score-count", "path"])
def test_bad_requests_get_json_errors(server, path, body, raw, status, words):
    srv, _ = server
    got, ctype, text = _post(srv, path, body, raw)
    assert got == status and ctype.startswith("application/json")
    assert words in json.loads(text)["error"], text


def test_a_bad_request_does_not_fail_its_batch(server):
    """Two concurrent requests with the same options, one input too long for the engine: the batch
    fails, is rerun request by request, and the good request gets its output."""
    srv, engine = server
    params = {"max_new_tokens": 5}
    out = dict(zip(("good", "bad"), _post_together(srv, [{"inputs": t, "parameters": params}
                                                         for t in ("hello", "x" * 100)])))
    assert out["good"][0] == 200 and json.loads(out["good"][2])["outputs"] == engine.generate(["hello"], **params)
    assert out["bad"][0] == 400 and "input length" in json.loads(out["bad"][2])["error"]


def test_health_model_and_cli_refusals(server, capsys):
    srv, engine = server
    status, info = _get(srv, "/v1/model")
    assert status == 200 and info["family"] == "t5" and info["limits"]["max_batch_size"] == 8
    status, body = _get(srv, "/nope")
    assert status == 404 and "no such path" in body["error"]
    assert main(["serve", "--engine-dir", str(engine.engine_dir), "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err


def _metrics(srv) -> dict:
    """GET /metrics parsed: {'name{labels}': value}, checking the content type and the line format."""
    host, port = srv.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30) as r:
        assert r.status == 200 and r.headers.get("Content-Type").startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.split()[1] in ("HELP", "TYPE"), line
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def test_metrics_count_requests_latency_and_batches(server):
    """GET /metrics (Prometheus text format) counts each answered request by endpoint and status code,
    keeps a latency histogram per endpoint whose buckets grow to the count, and the batches and
    inputs the scheduler ran."""
    srv, engine = server
    m0 = _metrics(srv)
    assert m0["encdec_pending_jobs"] == 0 and m0["encdec_batches_total"] == srv.scheduler.batches
    assert _post(srv, "/v1/generate", {"inputs": ["hello", "x y"], "parameters": {"max_new_tokens": 4}})[0] == 200
    assert _post(srv, "/v1/generate", {"inputs": "one", "parameters": {"max_new_tokens": 99999}})[0] == 400
    assert _post(srv, "/v1/score", {"sources": ["hello"], "targets": ["hello"]})[0] == 200
    assert _post(srv, "/v1/nope", {})[0] == 404
    m = _metrics(srv)

    def grew(key):
        return m.get(key, 0) - m0.get(key, 0)
    assert grew('encdec_requests_total{endpoint="generate",code="200"}') == 1
    assert grew('encdec_requests_total{endpoint="generate",code="400"}') == 1
    assert grew('encdec_requests_total{endpoint="score",code="200"}') == 1
    assert grew('encdec_requests_total{endpoint="other",code="404"}') == 1
    assert grew("encdec_batches_total") == 2 and grew("encdec_batch_inputs_total") == 3  # the 400 ran nothing
    for ep in ("generate", "score"):
        count = m[f'encdec_request_seconds_count{{endpoint="{ep}"}}']
        buckets = [v for k, v in m.items() if k.startswith(f'encdec_request_seconds_bucket{{endpoint="{ep}",')]
        assert buckets == sorted(buckets) and buckets[-1] == count == sum(
            v for k, v in m.items() if k.startswith(f'encdec_requests_total{{endpoint="{ep}",'))
        assert 0 < m[f'encdec_request_seconds_sum{{endpoint="{ep}"}}'] < 60 * count


def test_a_request_is_counted_before_its_reply_arrives(server, monkeypatch):
    """A client that reads /metrics as soon as it has its reply finds that request counted: the count
    was taken after the reply was written, and a fast 404 raced the next request (a fresh-clone CI run
    saw 0 of 1). A slow count makes the old order fail every time."""
    import time as _time

    srv, _ = server
    metrics = srv.scheduler.metrics
    real = metrics.request
    monkeypatch.setattr(metrics, "request", lambda *a: (_time.sleep(0.3), real(*a))[1])
    key = 'encdec_requests_total{endpoint="other",code="404"}'
    for _ in range(2):
        before = _metrics(srv).get(key, 0)
        assert _post(srv, "/v1/nope", {})[0] == 404
        assert _metrics(srv).get(key, 0) == before + 1
    before = _metrics(srv).get('encdec_requests_total{endpoint="generate",code="200"}', 0)
    assert _post(srv, "/v1/generate", {"inputs": "hello", "parameters": {"max_new_tokens": 2}})[0] == 200
    assert _metrics(srv)['encdec_requests_total{endpoint="generate",code="200"}'] == before + 1


def test_gather_takes_queued_jobs_with_the_same_key_even_without_delay():
    """With no delay the scheduler still batches what is already queued: same key, up to the max
    batch size in inputs; other jobs are held, in order, for the next rounds."""
    from types import SimpleNamespace

    from encdec_core.serve import Job, Scheduler

    fake = SimpleNamespace(limits=SimpleNamespace(max_batch_size=4))
    s = Scheduler(fake, max_delay=0.0)
    # a score job's payload has sources, not texts (it raised a KeyError in the scheduler, which lost
    # the jobs it had taken from the queue: their clients waited for ever)
    jobs = [Job("generate", {"texts": ["a"]}, "k1"), Job("generate", {"texts": ["b", "c"]}, "k2"),
            Job("generate", {"texts": ["d", "e"]}, "k1"), Job("stream", {"texts": ["f"]}),
            Job("score", {"sources": ["s"], "targets": ["t"]}),
            Job("generate", {"texts": ["g"]}, "k1"), Job("generate", {"texts": ["h"]}, "k1")]
    for j in jobs[1:]:
        s.submit(j)
    batch = s._gather(jobs[0])
    assert batch == [jobs[0], jobs[2], jobs[5]]  # 1 + 2 + 1 inputs; the 5th input would exceed 4
    assert s.held == [jobs[1], jobs[3], jobs[4]] and s.q.qsize() == 1  # the batch was full before the last job
    assert s._gather(s._next(0)) == [jobs[1]]  # k2 alone; the others held, in order
    assert s.held == [jobs[3], jobs[4], jobs[6]] and s.q.qsize() == 0
    # an error while gathering puts every job taken back, in order (only the first is the caller's)
    bad = Job("generate", {}, "k1")  # no texts: _gather fails on it
    s.submit(bad)
    s.held = []
    first = Job("generate", {"texts": ["x"]}, "k1")
    with pytest.raises(KeyError):
        s._gather(first)
    assert s.held == [bad] and s.q.qsize() == 0


def test_warmup_plan_and_warm_up_cover_every_bucket_the_scheduler_forms():
    """The default warm-up grid is every batch bucket up to the engine's max batch size (the largest
    batch the scheduler forms) by every source bucket up to the max input length; each batch size is
    captured for greedy (the fused loop) and step (sampling, streaming, scores); values beyond the
    limits are refused naming the flag."""
    from types import SimpleNamespace

    from encdec_core.errors import EncDecError
    from encdec_core.serve import warm_up, warmup_plan

    calls = []
    runner = SimpleNamespace(batch_buckets=(1, 2, 4, 8, 16, 32), source_buckets=(16, 32, 64), warmup=lambda **kw: calls.append(kw))
    limits = SimpleNamespace(max_batch_size=12, max_input_len=40)
    assert warmup_plan(runner, limits) == ([1, 2, 4, 8, 12], [16, 32, 40])
    assert warmup_plan(runner, limits, [3], [5, 40]) == ([3], [5, 40])
    logged = []
    warm_up(runner, limits, [1, 12], None, log=logged.append)
    assert calls == [dict(batch_sizes=(b,), source_lens=(16, 32, 40), kinds=("greedy", "step")) for b in (1, 12)]
    assert len(logged) == 2 and "batch 12" in logged[1] and "(2/2" in logged[1]
    # an engine whose defaults decode with beams: one batch of the defaults per (batch, source) bucket
    gen = []
    engine = SimpleNamespace(generation_config=lambda: SimpleNamespace(num_beams=4),
                             model=SimpleNamespace(cfg=SimpleNamespace(vocab_size=100, pad_token_id=0)),
                             generate_ids=lambda ids, runner: gen.append((len(ids), len(ids[0]), ids[0][0], runner)))
    warm_up(runner, limits, [1, 12], [16, 40], engine=engine)
    assert gen == [(1, 16, 1, runner), (1, 40, 1, runner), (12, 16, 1, runner), (12, 40, 1, runner)]
    with pytest.raises(EncDecError, match=r"--warmup-batch-sizes: 13 is beyond the engine's limit \(expected 1..12\)"):
        warmup_plan(runner, limits, [13], None)
    with pytest.raises(EncDecError, match="--warmup-input-lens: 41"):
        warmup_plan(runner, limits, None, [41])


def test_serve_refuses_bad_warmup_lists(engine_dir, builtin_registry, capsys):
    """Malformed lists fail before the engine loads; lists beyond the limits fail before any compile
    (the CPU's compiled runner warms up only the lists given)."""
    assert main(["serve", "--engine-dir", str(engine_dir), "--warmup-batch-sizes", "1;x"]) == 2
    assert "--warmup-batch-sizes = '1;x'" in capsys.readouterr().err
    assert main(["serve", "--engine-dir", str(engine_dir), "--device", "cpu", "--runner", "compiled",
                 "--warmup-batch-sizes", "9", "--port", "0"]) == 2
    assert "--warmup-batch-sizes: 9 is beyond the engine's limit (expected 1..8)" in capsys.readouterr().err


_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("device,compile", [("cpu", False), pytest.param("cuda", False, marks=_CUDA),
                                            pytest.param("cuda", True, marks=_CUDA)])
def test_warm_up_captures_the_default_beam_graphs(engine_dir, builtin_registry, device, compile):
    """An engine whose defaults decode with beams: the warm-up captures the beam graph of each planned
    batch bucket (on the CPU's static runner the same code as CUDA graphs without the capture; on a
    GPU real graphs, with the eager or the compiled step), a later batch of another size in the same
    bucket reuses it with no new compile, and the outputs equal the eager path's."""
    import torch._dynamo.utils as dyn_utils

    from encdec_core.engine import Engine
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.serve import warm_up

    engine = Engine.load(engine_dir, device=device)
    engine.meta["generation_config"] = {**engine.generation_defaults, "num_beams": 2, "max_new_tokens": 8}
    runner = CudaGraphRunner.for_engine(engine, compile=compile)
    warm_up(runner, engine.limits, [1, 4], [16, 32], engine=engine)
    compiles = dict(dyn_utils.counters["stats"])

    def beam_buckets():
        return sorted(k[1:3] for k in runner._graphs if k[0] == "beam")
    warmed = [(2, 16), (2, 32), (8, 16), (8, 32)]  # (rows, source) buckets: 1 or 4 requests x 2 beams
    assert beam_buckets() == warmed
    texts = TEXTS[:3]  # 6 rows: the 8-row bucket, with one padding request
    assert engine.generate(texts, runner=runner) == engine.generate(texts)
    assert beam_buckets() == warmed and dict(dyn_utils.counters["stats"]) == compiles
    # defaults beyond the engine's limits: no beam graphs, a message, and the other graphs all the same
    engine.meta["generation_config"]["max_new_tokens"] = 50
    runner, said = CudaGraphRunner.for_engine(engine, compile=compile), []
    warm_up(runner, engine.limits, [1], [16], engine=engine, log=said.append)
    assert beam_buckets() == []
    assert "no beam graphs for the default options" in said[0] and ("greedy", 1, 16, 1) in runner._graphs


@pytest.mark.slow
def test_warm_up_compiles_what_requests_run(engine_dir, builtin_registry):
    """The CPU's compiled step warmed up by serve.warm_up is the one requests run: no compile at the
    first request after it (the warm-up runs in inference mode, as Engine.generate does; under no_grad
    alone the compiled code's guards failed there and it compiled again). ~40 s on 2 cores."""
    import torch._dynamo.utils as dyn_utils

    from encdec_core.engine import Engine
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.serve import warm_up

    engine = Engine.load(engine_dir, device="cpu")
    runner = CudaGraphRunner.for_engine(engine)  # compile=True, no graphs on a CPU
    warm_up(runner, engine.limits, [2], [16])
    before = dict(dyn_utils.counters["stats"])
    out = engine.generate(["hello", "x y"], runner=runner, max_new_tokens=6)
    assert dict(dyn_utils.counters["stats"]) == before
    assert out == engine.generate(["hello", "x y"], max_new_tokens=6)


def test_a_lone_surrogate_is_refused_naming_the_field(server):
    """JSON may escape a lone surrogate ("\\ud800"), which UTF-8 and the tokenizer cannot encode: a
    400 naming the field and value, not an internal UnicodeEncodeError; and a good request batched
    with it (same options, at the same time) still gets its output."""
    srv, engine = server
    params = {"max_new_tokens": 4}
    out = dict(zip(("good", "bad"), _post_together(srv, [
        {"inputs": "hello", "parameters": params},
        b'{"inputs": ["ok", "a\\ud800"], "parameters": {"max_new_tokens": 4}}'])))
    assert out["good"][0] == 200 and json.loads(out["good"][2])["outputs"] == engine.generate(["hello"], **params)
    assert out["bad"][0] == 400, out["bad"]
    assert 'inputs[1] = "a\\ud800": expected Unicode text (a lone surrogate "\\ud800" at character 1)' \
        in json.loads(out["bad"][2])["error"]
    for path, raw, words in [
            ("/v1/generate", b'{"inputs": "a", "parameters": {"target_prefix": "\\udfff"}}', 'parameters.target_prefix = "\\udfff"'),
            ("/v1/generate", b'{"inputs": "\\ud800", "stream": true}', 'inputs = "\\ud800"'),
            ("/v1/score", b'{"sources": ["a"], "targets": ["\\ud800"]}', 'targets[0] = "\\ud800"')]:
        status, _, text = _post(srv, path, None, raw)
        assert status == 400 and words in json.loads(text)["error"], text


def _raw(srv, data: bytes, timeout: float = 10) -> str:
    """``data`` sent as is on one connection; all the server answered until it closed it."""
    import socket

    with socket.create_connection(srv.address, timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):  # a timeout here: the server kept the connection open
            out += chunk
    return out.decode()


@pytest.mark.parametrize("path", ["/v1/generate", "/nope"])
@pytest.mark.parametrize("length, status", [(b"-1", 411), (b"abc", 411), (b"\xb2", 411), (b"99999999999", 413)])
def test_a_bad_content_length_is_refused_and_closes_the_connection(server, path, length, status):
    """A Content-Length that is not a length within the limit (negative, not a number, a non-ASCII
    digit, too large): its JSON error (the 404 on an unknown path), no internal error, no read of
    that many bytes; and the connection closes, so the unread body is not read as the next request."""
    srv, _ = server
    reply = _raw(srv, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: " + length +
                 b"\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    want = status if path == "/v1/generate" else 404
    assert reply.startswith(f"HTTP/1.1 {want} ") and reply.count("HTTP/1.1 ") == 1, reply
    assert "Connection: close" in reply and "internal error" not in reply
    body = json.loads(reply.split("\r\n\r\n", 1)[1])
    if path == "/nope":
        assert "no such path '/nope'" in body["error"]
    elif status == 413:
        assert body["error"] == "request body of 99999999999 bytes: at most 16777216"
    else:
        assert body["error"] == f"Content-Length = {length.decode('latin-1')!r}: expected the body's length in bytes"
    assert _get(srv, "/health")[0] == 200


def test_transfer_encoding_is_refused_and_the_connection_closes(server):
    """A chunked body beside a Content-Length was read by the length, the chunk framing ignored: the
    way request smuggling starts (RFC 9112 6.1). Refused (501, JSON), and the connection closes."""
    srv, _ = server
    body = b'{"inputs": "a"}'
    reply = _raw(srv, b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith("HTTP/1.1 501 ") and reply.count("HTTP/1.1 ") == 1, reply
    assert "Connection: close" in reply
    assert "Transfer-Encoding 'chunked': not supported" in json.loads(reply.split("\r\n\r\n", 1)[1])["error"]


def test_http_servers_own_refusals_are_json_and_queries_are_ignored(server):
    """http.server's own error pages (a request line it cannot read, an unknown method) were HTML;
    HEAD got an HTML 501; a query string made /health a 404."""
    srv, _ = server
    many = b"".join(b"X-%d: y\r\n" % i for i in range(101))
    reply = _raw(srv, b"GET /health HTTP/1.1\r\n" + many + b"\r\n")
    assert reply.startswith("HTTP/1.1 431 ") and "application/json" in reply, reply
    assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"].startswith("431 Request Header Fields Too Large")
    reply = _raw(srv, b"BREW /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith("HTTP/1.1 501 ") and json.loads(reply.split("\r\n\r\n", 1)[1])["error"].startswith("501")
    reply = _raw(srv, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, rest = reply.split("\r\n\r\n", 1)
    assert head.startswith("HTTP/1.1 405 ") and "Allow: GET" in head and rest == "", reply
    status, body = _get(srv, "/health?probe=1")
    assert status == 200 and body["status"] == "ok"


@pytest.mark.parametrize("method, path, allow", [("GET", "/v1/generate", "POST"), ("PUT", "/v1/score", "POST"),
                                                 ("DELETE", "/v1/generate", "POST"), ("POST", "/health", "GET"),
                                                 ("OPTIONS", "/metrics", "GET"), ("PATCH", "/nope", None)])
def test_a_wrong_method_gets_a_json_405(server, method, path, allow):
    """A method the path does not take: a JSON 405 naming the method and the one expected, with an
    Allow header (http.server answered PUT / DELETE / OPTIONS / PATCH with an HTML 501, and GET on a
    POST path with a 404); on an unknown path the 404. The body is read, the server serves on."""
    srv, _ = server
    host, port = srv.address
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=b'{"inputs": "a"}' if method != "GET" else None,
                                 method=method)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    e = info.value
    assert e.headers.get("Content-Type").startswith("application/json")
    if allow is None:
        assert e.code == 404 and "no such path '/nope'" in json.loads(e.read())["error"]
    else:
        assert e.code == 405 and e.headers.get("Allow") == allow
        assert json.loads(e.read())["error"] == f"{method} {path}: expected {allow} {path}"
    assert _get(srv, "/health")[0] == 200


def test_null_per_request_options_mean_not_given(server):
    """"lora_uid": null is the base model, as "target_lang": null is no language (it was sent on as
    a uid None: refused as "LoRA task uids given" on an engine without adapters), streaming too."""
    srv, engine = server
    params = {"max_new_tokens": 4, "lora_uid": None, "target_lang": None, "target_prefix": None}
    status, _, body = _post(srv, "/v1/generate", {"inputs": ["hello", "x y"], "parameters": params})
    assert status == 200, body
    assert json.loads(body)["outputs"] == engine.generate(["hello", "x y"], max_new_tokens=4)
    status, _, body = _post(srv, "/v1/generate", {"inputs": "hello", "stream": True, "parameters": params})
    assert status == 200 and body.endswith("data: [DONE]\n\n"), body
    # -1 is the base model too, on every endpoint (streaming and score refused it without adapters)
    params["lora_uid"] = -1
    status, _, body = _post(srv, "/v1/generate", {"inputs": "hello", "stream": True, "parameters": params})
    assert status == 200 and body.endswith("data: [DONE]\n\n"), body
    status, _, body = _post(srv, "/v1/score", {"sources": ["hello"], "targets": ["x y"], "lora_uid": -1})
    assert status == 200, body


def test_an_internal_error_in_a_batch_is_rerun_request_by_request(server, monkeypatch):
    """Not only an EncDecError: a batch that fails with an internal error (one no check caught) is
    rerun request by request too, so only the request that causes it gets the 500."""
    srv, engine = server
    generate = engine.generate

    def fragile(texts, **kw):
        if "boom" in texts:
            raise RuntimeError("boom")
        return generate(texts, **kw)
    monkeypatch.setattr(engine, "generate", fragile)
    params = {"max_new_tokens": 4}
    out = dict(zip(("hello", "boom"), _post_together(srv, [{"inputs": t, "parameters": params}
                                                           for t in ("hello", "boom")])))
    assert srv.scheduler.batches == 1  # the batch of two failed (not counted); "hello" alone ran
    assert out["hello"][0] == 200 and json.loads(out["hello"][2])["outputs"] == generate(["hello"], **params)
    assert out["boom"][0] == 500 and json.loads(out["boom"][2])["error"] == "internal error: RuntimeError: boom"


@pytest.fixture
def quick_server(engine_dir, builtin_registry):
    """A server that waits at most 0.5 s for the next bytes of a request."""
    yield from _serving(engine_dir, request_timeout=0.5)


@pytest.mark.parametrize("sent, endpoint, error", [
    (b'POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"inputs": ', "generate",
     "request body: 11 of the 100 bytes announced by Content-Length arrived, then nothing for 0.5 s"),
    (b"PUT /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab", None,
     "request body: 2 of the 10 bytes announced by Content-Length arrived, then nothing for 0.5 s"),
    (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Le", None,
     "request headers: incomplete after 0.5 s without more bytes"),
    (b"", None, None),
], ids=["short-body", "short-body-405", "mid-headers", "nothing"])
def test_a_client_that_stops_sending_gets_a_408_and_its_connection_closes(quick_server, sent, endpoint, error):
    """A body shorter than its Content-Length, headers that stop, a connection with no request at all:
    the handler thread waited for them forever. Now, after --request-timeout without a byte, a JSON
    408 (no request: just the close) and the connection closes; other clients are served meanwhile."""
    import socket

    srv, _ = quick_server
    with socket.create_connection(srv.address, timeout=4) as s:  # a timeout here: the server kept waiting
        s.sendall(sent)
        assert _get(srv, "/health")[0] == 200  # while that client stalls
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    reply = reply.decode()
    if error is None:
        assert reply == ""
    else:
        head, body = reply.split("\r\n\r\n", 1)
        assert head.startswith("HTTP/1.1 408 ") and "Connection: close" in head, reply
        assert "application/json" in head and json.loads(body) == {"error": error}
    if endpoint is not None:
        assert srv.scheduler.metrics.requests.get((endpoint, 408)) == 1
    assert _get(srv, "/health")[0] == 200


@pytest.mark.parametrize("where", ["headers", "request-line"])
def test_a_client_that_trickles_its_head_is_cut_off_at_the_request_timeout(quick_server, where):
    """A client that sends its request line or headers a byte at a time, each byte within the timeout
    (slowloris), held its handler thread for as long as it went on. Now the head must arrive within
    the request timeout from its first byte: headers get a JSON 408, a request line that never ends a
    closed connection; other clients are served meanwhile."""
    import socket
    import time

    srv, _ = quick_server
    head = (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40 + b"\r\n\r\n") if where == "headers" \
        else b"GET /health" + b"/" * 40 + b" HTTP/1.1\r\n\r\n"
    start = head.index(b"\r\n") + 2 if where == "headers" else 5
    with socket.create_connection(srv.address, timeout=4) as s:
        s.sendall(head[:start])
        t0, reply = time.monotonic(), b""
        try:
            for i in range(start, len(head)):  # a byte every 0.1 s: 40 bytes would take 4 s
                s.sendall(head[i:i + 1])
                time.sleep(0.1)
                if time.monotonic() - t0 > 0.3 and i % 5 == 0:
                    assert _get(srv, "/health")[0] == 200  # while that client trickles
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed: what follows reads its answer
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
        took = time.monotonic() - t0
    assert took < 2.5, took  # cut off near 0.5 s after the request began, not after the 4 s of trickle
    reply = reply.decode()
    if where == "headers":
        head_, body = reply.split("\r\n\r\n", 1)
        assert head_.startswith("HTTP/1.1 408 ") and "Connection: close" in head_, reply
        assert json.loads(body) == {"error": "request headers: still incomplete 0.5 s after the request began"}
    else:
        assert reply == ""
    assert _get(srv, "/health")[0] == 200


@pytest.mark.parametrize("value", ["0", "-1", "1e10"])
def test_serve_refuses_a_bad_request_timeout(engine_dir, builtin_registry, capsys, value):
    """--request-timeout: seconds in (0, 86400] (the socket's timeout; 1e10 overflows it), refused
    before the engine loads; not a number: argparse's error naming the flag."""
    assert main(["serve", "--engine-dir", str(engine_dir), "--request-timeout", value]) == 2
    assert f"--request-timeout {float(value):g}: expected a number of seconds in (0, 86400]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["serve", "--engine-dir", str(engine_dir), "--request-timeout", "nan"])
    assert info.value.code == 2 and "--request-timeout" in capsys.readouterr().err


def _reset(s) -> None:
    """Close socket ``s`` with a reset (SO_LINGER 0): the server's next read or write on it fails."""
    import socket
    import struct

    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _stderr_until(capsys, words: str, seconds: float = 3.0) -> str:
    """What the server threads wrote to stderr, read until it holds ``words`` or ``seconds`` pass."""
    import time

    err, deadline = "", time.monotonic() + seconds
    while words not in err and time.monotonic() < deadline:
        time.sleep(0.01)
        err += capsys.readouterr().err
    return err


@pytest.mark.parametrize("when", ["idle", "mid-body", "before-reply"])
def test_a_client_that_hangs_up_is_one_line_not_a_traceback(server, monkeypatch, capsys, when):
    """A client that resets its connection with no request (idle), while sending its body, or while
    its request runs: one line on stderr naming it (socketserver printed a traceback, and the body /
    reply cases tried a 500 on the dead connection and counted that 500 in the metrics: now code 0,
    no answer, or 499 for a request cancelled because its client left); the server serves on."""
    import socket

    from encdec_core import cancel

    srv, engine = server
    generate, entered, release = engine.generate, threading.Event(), threading.Event()

    def held(texts, **kw):  # the request runs until the client has gone and the server has seen it
        entered.set()
        release.wait(5)
        for _ in range(500):
            if cancel.requested():
                break
            time.sleep(0.01)
        return generate(texts, **kw)
    monkeypatch.setattr(engine, "generate", held)
    s = socket.create_connection(srv.address, timeout=5)
    port = s.getsockname()[1]
    if when == "mid-body":  # the server read the headers (its 100 Continue says so), then waits for the body
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 ")
        s.sendall(b'{"inputs": ')
    elif when == "before-reply":
        body = json.dumps({"inputs": "hello", "parameters": {"max_new_tokens": 3}}).encode()
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert entered.wait(5)
    _reset(s)
    release.set()
    want = f"client 127.0.0.1:{port} closed the connection" + ("" if when == "idle" else
                                                               " before the reply to POST /v1/generate")
    err = _stderr_until(capsys, want)
    assert want + " (" in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    counted = {k: n for k, n in srv.scheduler.metrics.requests.items() if k[0] == "generate"}
    assert counted == {"idle": {}, "mid-body": {("generate", 0): 1}, "before-reply": {("generate", 499): 1}}[when]
    assert _get(srv, "/health")[0] == 200


def test_a_client_that_hangs_up_during_a_stream_is_one_line(server, monkeypatch, capsys):
    """A client that resets its connection after the first event of a stream: one line on stderr
    naming it (the stream was cancelled silently), the stream's generator is closed, and the server
    serves on."""
    import socket

    srv, engine = server
    stream, entered, release, ended = engine.generate_stream, threading.Event(), threading.Event(), threading.Event()

    def held(texts, **kw):  # the first event goes out, the rest waits until the client has gone
        it = stream(texts, **kw)
        yield next(it)
        entered.set()
        release.wait(5)
        try:
            yield from it
        finally:
            ended.set()  # the scheduler closed the generator (or it ran out): the generation is over
    monkeypatch.setattr(engine, "generate_stream", held)
    s = socket.create_connection(srv.address, timeout=5)
    port = s.getsockname()[1]
    body = json.dumps({"inputs": "hello", "stream": True, "parameters": {"max_new_tokens": 6}}).encode()
    s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while b"data: " not in got:
        got += s.recv(4096)
    assert got.startswith(b"HTTP/1.0 200") or got.startswith(b"HTTP/1.1 200"), got
    assert entered.wait(5)
    _reset(s)
    release.set()
    want = f"client 127.0.0.1:{port} closed the connection during the stream of POST /v1/generate"
    err = _stderr_until(capsys, want)
    assert want + " (" in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert _get(srv, "/health")[0] == 200
    assert ended.wait(5)


def test_other_errors_in_a_handler_keep_their_traceback(server, monkeypatch, capsys):
    """Only a client's hang-up is told in one line: any other exception escaping a handler keeps
    socketserver's report with its traceback."""
    srv, _ = server

    def broken(self):
        raise RuntimeError("a bug in a handler")
    monkeypatch.setattr(srv.httpd.RequestHandlerClass, "do_GET", broken)
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # closed without an answer
        _get(srv, "/health")
    err = _stderr_until(capsys, "RuntimeError: a bug in a handler")
    assert "Traceback" in err and "RuntimeError: a bug in a handler" in err, err


def test_a_request_with_more_inputs_than_the_server_takes_is_refused(engine_dir, builtin_registry, capsys):
    """One request of 50,000 inputs ran to its end after its client had left, and every request behind
    it waited: --max-request-inputs bounds a request (generate inputs, score pairs)."""
    from encdec_core.cli import main

    gen = _serving(engine_dir, max_request_inputs=2)
    srv, _ = next(gen)
    try:
        status, _, body = _post(srv, "/v1/generate", {"inputs": ["a", "b", "c"], "parameters": {"max_new_tokens": 2}})
        assert status == 400 and "inputs: 3 in one request, at most 2" in json.loads(body)["error"], body
        status, _, body = _post(srv, "/v1/score", {"sources": ["a"] * 3, "targets": ["b"] * 3})
        assert status == 400 and "sources: 3 in one request, at most 2" in json.loads(body)["error"], body
        assert _post(srv, "/v1/generate", {"inputs": ["a", "b"], "parameters": {"max_new_tokens": 2}})[0] == 200
    finally:
        gen.close()
    assert main(["serve", "--engine-dir", str(engine_dir), "--max-request-inputs", "0"]) == 2
    assert "--max-request-inputs 0: expected a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("endpoint", ["generate", "score"])
def test_a_client_that_leaves_cancels_its_request_before_the_next_batch(server, monkeypatch, capsys, endpoint):
    """40 inputs run as 5 batches of the engine's 8; the client resets its connection during the first:
    the server sees it, the engine stops before its second batch (the request's work ends with its
    client), the hang-up is one line on stderr, the metrics count a 499, and the server serves on."""
    import socket

    from encdec_core import cancel, scoring

    srv, engine = server
    calls, entered, hold = [], threading.Event(), [True]

    def waiting(run):
        def batch(*a, **kw):  # the first batch waits until the server has seen the client leave
            calls.append(1)
            if len(calls) == 1 and hold[0]:
                entered.set()
                for _ in range(500):
                    if cancel.requested():
                        break
                    time.sleep(0.01)
            return run(*a, **kw)
        return batch
    if endpoint == "generate":
        monkeypatch.setattr(engine, "_generate_batch", waiting(engine._generate_batch))
        body = {"inputs": [f"input number {i}" for i in range(40)], "parameters": {"max_new_tokens": 3}}
    else:
        monkeypatch.setattr(scoring, "score_batch", waiting(scoring.score_batch))
        body = {"sources": [f"input number {i}" for i in range(40)], "targets": ["a b"] * 40}
    data = json.dumps(body).encode()
    s = socket.create_connection(srv.address, timeout=5)
    port = s.getsockname()[1]
    s.sendall(b"POST /v1/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (endpoint.encode(), len(data), data))
    assert entered.wait(10)
    _reset(s)
    want = f"client 127.0.0.1:{port} closed the connection before the reply to POST /v1/{endpoint}"
    err = _stderr_until(capsys, want, 10)
    assert want + " (ConnectionAbortedError)" in err and "Traceback" not in err, err
    assert len(calls) == 1  # batches 2-5 never ran
    assert srv.scheduler.metrics.requests.get((endpoint, 499)) == 1
    # the server serves on, all batches of a request whose client stays
    calls.clear()
    hold[0] = False
    status, _, text = _post(srv, f"/v1/{endpoint}", body)
    assert status == 200 and len(json.loads(text)["outputs" if endpoint == "generate" else "results"]) == 40
    assert len(calls) == 5


def test_the_scheduler_drops_a_queued_job_whose_client_left_and_runs_the_rest():
    """A job cancelled while queued finishes unrun with Cancelled; a batch where one client leaves runs on
    for the other (its cancel check is false until all have left)."""
    from types import SimpleNamespace

    from encdec_core.cancel import Cancelled, requested
    from encdec_core.serve import Job, Scheduler

    seen = []

    def generate(texts, **kw):
        left.cancelled = True  # its client leaves while the batch runs: the batch goes on for the other
        seen.append((list(texts), requested()))
        return [[t.upper()] for t in texts]
    eng = SimpleNamespace(limits=SimpleNamespace(max_batch_size=8), model=SimpleNamespace(device=torch.device("cpu")),
                          generate=generate)
    sched = Scheduler(eng, max_delay=0.2)
    payload = lambda t: {"texts": [t], "params": {}, "per": {}, "scores": False}  # noqa: E731
    gone = Job("generate", payload("gone"), "k", cancelled=True)
    left, stays = Job("generate", payload("left"), "k"), Job("generate", payload("stays"), "k")
    for j in (gone, left, stays):
        sched.submit(j)
    sched.start()
    try:
        for j in (gone, left, stays):
            assert j.done.wait(5)
    finally:
        sched.stop()
    assert isinstance(gone.error, Cancelled)
    assert stays.error is None and stays.result == [["STAYS"]] and left.result == [["LEFT"]]
    assert seen == [(["left", "stays"], False)]


def test_source_lang_reaches_the_engine_and_is_checked(server):
    """parameters.source_lang (and score's source_lang) go to the engine, which names a family without
    source-language control (this T5); a non-string is refused by the parser."""
    srv, _ = server
    status, _, text = _post(srv, "/v1/generate", {"inputs": "hello", "parameters": {"source_lang": "fr_XX"}})
    assert status == 400 and "source_lang" in text and "no source-language control" in text, text
    status, _, text = _post(srv, "/v1/generate", {"inputs": "hello", "parameters": {"source_lang": 5}})
    assert status == 400 and "parameters.source_lang = 5: expected a string" in text, text
    status, _, text = _post(srv, "/v1/score", {"sources": ["a"], "targets": ["b"], "source_lang": "fr_XX"})
    assert status == 400 and "no source-language control" in text, text
    status, _, _ = _post(srv, "/v1/generate", {"inputs": "hello", "parameters": {"source_lang": None,
                                                                                 "max_new_tokens": 2}})
    assert status == 200


def test_serve_asks_for_the_ranks_of_a_parallel_engine(engine_dir, builtin_registry, tmp_path, capsys):
    """A tensor-parallel engine is served under mpirun / torchrun (test_parallel_cli); one process is
    told how to launch it."""
    import shutil

    eng = tmp_path / "tp2"
    shutil.copytree(engine_dir, eng)
    cfg = json.loads((eng / "config.json").read_text())
    cfg["mapping"].update(tp_size=2, pp_size=1, world_size=2)
    (eng / "config.json").write_text(json.dumps(cfg))
    assert main(["serve", "--engine-dir", str(eng), "--port", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "the mapping needs tp_size 2 x pp_size 1 = 2 rank(s); launch 2 ranks" in err, err


def test_stop_decisions_follow_the_agreement():
    """On several ranks every stop decision is rank 0's (cancel.set_agreement): a follower with no
    reason of its own stops when told, and rank 0's own reason is what it sends."""
    from encdec_core import cancel

    sent = []
    try:
        cancel.set_agreement(lambda stop: True)  # a follower told to stop
        with pytest.raises(cancel.Cancelled):
            cancel.check()
        with pytest.raises(cancel.Cancelled):
            cancel.check_step()
        cancel.set_agreement(lambda stop: sent.append(stop) or stop)  # rank 0: sends its own
        cancel.check()
        with cancel.cancel_when(lambda: True), pytest.raises(cancel.Cancelled):
            cancel.check()
        assert sent == [False, True]
    finally:
        cancel.set_agreement(None)
    with cancel.cancel_when(lambda: False):
        cancel.check()


def test_the_leader_sends_each_model_call_before_making_it(engine_dir, builtin_registry):
    """Rank 0's engine (parallel/serving.Leader) sends every call, without its runner, then makes it; a
    stream closed before its first event still runs (the followers run theirs from the message on)."""
    from encdec_core.engine import Engine
    from encdec_core.parallel.serving import Leader

    engine = Engine.load(engine_dir)

    class Channel:
        def __init__(self):
            self.sent = []

        def send(self, msg):
            self.sent.append(msg)

    ch = Channel()
    lead = Leader(engine, ch)
    assert lead.limits is engine.limits
    assert lead.generate(["hello"], runner=None, max_new_tokens=3) == engine.generate(["hello"], max_new_tokens=3)
    lead.score(["hello"], ["world"])
    calls = []
    real = engine.generate_ids
    engine.generate_ids = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        lead.generate_stream(["hello"], runner=None, max_new_tokens=3).close()
    finally:
        del engine.generate_ids
    assert calls == [1]
    assert [m[0] for m in ch.sent] == ["generate", "score", "stream"]
    assert ch.sent[0] == ("generate", (["hello"],), {"max_new_tokens": 3})
    lead.stop_followers()
    assert ch.sent[-1] is None
