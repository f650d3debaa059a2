"""``encdec serve``: one engine behind an HTTP/JSON API, with dynamic batching and streaming.

Standard library only (``http.server``), one process, one engine. Connection threads parse
requests and wait; a single scheduler thread owns the model (the CUDA-graph runner and its static
buffers are not thread-safe) and runs the jobs:

- ``POST /v1/generate`` ``{"inputs": "text" | ["text", ...], "parameters": {...}, "stream": false}``
  -> ``{"outputs": [[text, ...], ...]}`` (one list per input, ``num_return_sequences`` long), or
  with ``"return_scores": true`` a dict per output (text, tokens, score, token_logprobs).
  ``parameters``: HF's generation option names (max_new_tokens, num_beams, do_sample, top_p, ...),
  plus ``target_lang``, ``target_prefix``, ``lora_uid``, ``source_lang`` and ``return_scores``.
- ``"stream": true``: ``text/event-stream``, one ``data: {json}`` event per StreamEvent (index,
  sequence, text, finished, output), then ``data: [DONE]``.
- ``POST /v1/score`` ``{"sources": [...], "targets": [...], "target_lang": ..., "source_lang": ..., "lora_uid": ...}``
  -> ``{"results": [{score, sum, num_tokens, tokens, token_logprobs}, ...]}``.
- ``GET /health`` (queue length, requests and batches served), ``GET /v1/model`` (family, limits,
  dtype, device), ``GET /metrics`` (Prometheus' text format: requests by endpoint and status, latency
  histograms, batches and their inputs, pending jobs).

Dynamic batching: the scheduler takes the oldest job, then waits up to ``max_delay`` for more jobs
with the same generation options (and the same return_scores), up to the engine's max batch size
in inputs, and runs them as one batch (target languages, prefixes and adapters may differ per
request: they go per input). Outputs equal each request run alone (batched == one at a time is
a tested property of generate). A sampling request with a seed runs alone, so that its tokens
depend on its seed only, not on the requests it would have been merged with. A batch that fails
is rerun request by request, so one bad request gets its own error and the others their outputs.
Streaming and scoring jobs run one at a time. Errors are JSON ``{"error": message}``: 400 for bad
input (the message names the field and value), 404 / 405 / 411 / 413 for the path, method,
length and size, 408 when a request stops arriving for the request timeout, or its request line
and headers take longer than it in all (REQUEST_TIMEOUT, ``--request-timeout``; then the
connection closes), 500 for an internal error. A client that hangs up before its reply is one
line on stderr. A client that closes its connection while its request waits or runs cancels the
request: queued, it is dropped; running, it stops before the engine's next batch of inputs (a batch
shared with other clients' requests runs on for them); the metrics count it with code 499.
"""
from __future__ import annotations

import json
import queue
import select
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .cancel import Cancelled, cancel_when
from .errors import EncDecError, LimitError

MAX_BODY = 16 << 20  # bytes of one request body
# seconds a connection may go without a byte of the request it is sending (request line, headers,
# body) or without taking a byte of its reply, and an idle keep-alive connection stays open; then it
# is answered 408 where a request had begun, and closed. Without it a client that sent less than its
# Content-Length (or nothing) held its handler thread forever. The socket's timeout: per read or
# write. The request line and headers must also arrive within it in all, from their first byte
# (``_RequestReader``): a client that sends a header byte now and then is cut off; the body, like
# nginx's, is timed per read only. ``--request-timeout``.
REQUEST_TIMEOUT = 30.0
MAX_REQUEST_TIMEOUT = 86400.0  # a day; socket.settimeout overflows near 1e10 s
# a client that hung up: its connection reset or closed while its request was read or its reply written
_HANGUP = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
_PER_REQUEST = ("target_lang", "target_prefix", "lora_uid")  # per input in a merged batch
MAX_REQUEST_INPUTS = 1024  # inputs (or score pairs) per request, by default
_GET_PATHS, _POST_PATHS = ("/health", "/v1/model", "/metrics"), ("/v1/generate", "/v1/score")
_PATHS = "GET /health, /metrics, /v1/model; POST /v1/generate, /v1/score"
# a request whose client closed its connection before the reply (nginx's code), in the metrics
CLIENT_CLOSED_REQUEST = 499
GONE_POLL = 0.1  # seconds between two looks at a waiting request's connection


class _RequestReader:
    """A handler's rfile (a buffered socket reader) with a deadline for a request's head: from the
    first byte of its request line, the line and the headers must arrive within ``timeout`` in all,
    while each read still waits at most ``timeout`` (so an idle keep-alive connection waits that long
    for its next request). Between ``begin()`` and ``end_head()`` lines are read through ``peek`` and
    ``read``, each doing at most one socket read, with the socket's timeout cut to what is left;
    past the deadline ``readline`` raises TimeoutError. Everything else goes to the wrapped reader."""

    def __init__(self, raw, sock, timeout: float):
        self.raw, self.sock, self.timeout = raw, sock, float(timeout)
        self.head = False
        self.deadline: float | None = None  # monotonic; None until the request's first byte
        self.last_byte = 0.0  # monotonic time of the head's last bytes

    def begin(self) -> None:
        self.head, self.deadline = True, None
        self.sock.settimeout(self.timeout)

    def end_head(self) -> None:
        self.head, self.deadline = False, None
        self.sock.settimeout(self.timeout)

    def readline(self, limit: int = -1) -> bytes:
        if not self.head:
            return self.raw.readline(limit)
        out = bytearray()
        while limit < 0 or len(out) < limit:
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the request's head did not arrive within {self.timeout:g} s")
                self.sock.settimeout(min(self.timeout, left))
            chunk = self.raw.peek(1)
            if not chunk:  # the client closed
                break
            self.last_byte = time.monotonic()
            if self.deadline is None:
                self.deadline = self.last_byte + self.timeout
            i = chunk.find(b"\n")
            n = i + 1 if i >= 0 else len(chunk)
            out += self.raw.read(n if limit < 0 else min(n, limit - len(out)))
            if out.endswith(b"\n"):
                break
        return bytes(out)

    def stalled(self) -> bool:
        """After a timeout in the head: the client sent nothing for the whole timeout (else it was
        still sending when the deadline passed)."""
        return time.monotonic() - self.last_byte >= self.timeout - 1e-3

    def __getattr__(self, name):
        return getattr(self.raw, name)


class RequestError(EncDecError):
    """A request the server refuses (HTTP 4xx)."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    kind: str  # "generate", "stream" or "score"
    payload: dict
    key: str = ""  # generate: jobs with equal keys may share a batch
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    events: queue.Queue | None = None  # stream: StreamEvents, then None
    cancelled: bool = False

    def finish(self, result=None, error=None) -> None:
        self.result, self.error = result, error
        self.done.set()


# ---------------------------------------------------------------------------- request parsing
def _unicode(t: str, name: str) -> str:
    """``t``, refused when it holds a lone surrogate: JSON can write one (``"\\ud800"``), UTF-8 and the
    tokenizer cannot (an internal UnicodeEncodeError that failed the whole batch)."""
    try:
        t.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"{name} = {json.dumps(t)[:200]}: expected Unicode text (a lone surrogate "
                           f"{json.dumps(t[exc.start])} at character {exc.start})") from None
    return t


def _texts(v, name: str) -> list[str]:
    if isinstance(v, str):
        return [_unicode(v, name)]
    if not isinstance(v, list) or not v:
        raise RequestError(f"{name} = {json.dumps(v)[:200]}: expected a string or a non-empty list of strings")
    bad = next((i for i, t in enumerate(v) if not isinstance(t, str)), None)
    if bad is not None:
        raise RequestError(f"{name}[{bad}] = {json.dumps(v[bad])[:200]}: expected a string")
    return [_unicode(t, f"{name}[{i}]") for i, t in enumerate(v)]


def batch_key(params: dict, scores: bool):
    """The scheduler merges generate jobs of equal keys: the same options and return_scores. A sampling
    request with a seed gets a key of its own (it runs alone): a merged batch draws every row from one
    generator, so its tokens would depend on the requests it happened to be merged with."""
    if params.get("do_sample") is True and params.get("seed") is not None:
        return object()  # equal to nothing else
    return json.dumps([params, scores], sort_keys=True)


def _lora_uid(u, field: str) -> int | None:
    """A request's adapter uid: an integer; None for the base model (null or -1), so that no endpoint
    hands an engine without run-time adapters a uid."""
    if u is None:
        return None
    if isinstance(u, bool) or not isinstance(u, int):
        raise RequestError(f"{field} = {json.dumps(u)[:200]}: expected an integer (-1: the base model)")
    return None if u == -1 else u


def parse_generate(body: dict, gen_fields) -> tuple[list[str], dict, dict, bool, bool]:
    """(texts, generation options, per-request options, return_scores, stream) of a generate request."""
    unknown = sorted(set(body) - {"inputs", "parameters", "stream"})
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}: expected inputs, parameters, stream")
    if "inputs" not in body:
        raise RequestError("missing field 'inputs': a string or a list of strings")
    texts = _texts(body["inputs"], "inputs")
    params = body.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise RequestError(f"parameters = {json.dumps(params)[:200]}: expected an object")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream = {json.dumps(stream)}: expected true or false")
    params = dict(params)
    scores = params.pop("return_scores", False)
    if not isinstance(scores, bool):
        raise RequestError(f"parameters.return_scores = {json.dumps(scores)}: expected true or false")
    per = {k: params.pop(k) for k in _PER_REQUEST if k in params}
    per = {k: v for k, v in per.items() if v is not None}  # null: not given (the base model, no language)
    source_lang = params.pop("source_lang", None)
    unknown = sorted(k for k in params if k not in gen_fields)
    if unknown:
        raise RequestError(f"parameters: unknown option(s) {unknown}; known: {sorted(gen_fields)} and "
                           f"{sorted(_PER_REQUEST + ('return_scores', 'source_lang'))}")
    if source_lang is not None:  # how the texts are encoded: requests merge only with the same one
        if not isinstance(source_lang, str):
            raise RequestError(f"parameters.source_lang = {json.dumps(source_lang)[:200]}: expected a string")
        params["source_lang"] = _unicode(source_lang, "parameters.source_lang")
    for k in ("target_lang", "target_prefix"):
        if per.get(k) is not None:
            if not isinstance(per[k], str):
                raise RequestError(f"parameters.{k} = {json.dumps(per[k])[:200]}: expected a string")
            _unicode(per[k], f"parameters.{k}")
    uid = _lora_uid(per.pop("lora_uid", None), "parameters.lora_uid")
    if uid is not None:
        per["lora_uid"] = uid
    if stream and scores:
        raise RequestError("stream and parameters.return_scores do not go together")
    return texts, params, per, scores, stream


# ---------------------------------------------------------------------------- metrics
class Metrics:
    """Counters for ``GET /metrics`` (Prometheus' text format, 0.0.4): requests by endpoint and HTTP
    status, request latency histograms by endpoint, batches and the inputs they held, the queue."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list] = {}  # endpoint -> [count per bucket..., sum, count]
        self.batches = 0
        self.batch_inputs = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, int(status))] = self.requests.get((endpoint, int(status)), 0) + 1
            h = self.latency.setdefault(endpoint, [0] * len(self.BUCKETS) + [0.0, 0])
            for i, le in enumerate(self.BUCKETS):
                if seconds <= le:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def batch(self, inputs: int) -> None:
        with self._lock:
            self.batches += 1
            self.batch_inputs += int(inputs)

    def render(self, pending: int) -> str:
        with self._lock:
            out = ["# HELP encdec_requests_total HTTP requests answered, by endpoint and status code.",
                   "# TYPE encdec_requests_total counter"]
            for (ep, code), n in sorted(self.requests.items()):
                out.append(f'encdec_requests_total{{endpoint="{ep}",code="{code}"}} {n}')
            out += ["# HELP encdec_request_seconds Time from a request's arrival to the end of its answer.",
                    "# TYPE encdec_request_seconds histogram"]
            for ep, h in sorted(self.latency.items()):
                for le, c in zip(self.BUCKETS, h):
                    out.append(f'encdec_request_seconds_bucket{{endpoint="{ep}",le="{le}"}} {c}')
                out.append(f'encdec_request_seconds_bucket{{endpoint="{ep}",le="+Inf"}} {h[-1]}')
                out.append(f'encdec_request_seconds_sum{{endpoint="{ep}"}} {h[-2]:.6f}')
                out.append(f'encdec_request_seconds_count{{endpoint="{ep}"}} {h[-1]}')
            out += ["# HELP encdec_batches_total Model calls run by the scheduler (a generate batch, a stream, a score).",
                    "# TYPE encdec_batches_total counter", f"encdec_batches_total {self.batches}",
                    "# HELP encdec_batch_inputs_total Inputs those calls held (divided by the batches: the mean batch).",
                    "# TYPE encdec_batch_inputs_total counter", f"encdec_batch_inputs_total {self.batch_inputs}"]
        out += ["# HELP encdec_pending_jobs Jobs waiting for the scheduler.", "# TYPE encdec_pending_jobs gauge",
                f"encdec_pending_jobs {pending}"]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- the scheduler
class Scheduler:
    """The one thread that runs the model: batches generate jobs, runs stream and score jobs."""

    def __init__(self, engine, runner=None, max_delay: float = 0.005, max_inputs: int | None = None):
        self.engine, self.runner = engine, runner
        self.max_delay = float(max_delay)
        self.max_inputs = int(max_inputs or engine.limits.max_batch_size)
        self.q: queue.Queue = queue.Queue()
        self.held: list[Job] = []  # taken from the queue while gathering a batch, not in it
        self.requests = 0
        self.metrics = Metrics()  # also counts the batches run
        self._thread = threading.Thread(target=self._loop, name="encdec-scheduler", daemon=True)
        self._stop = False

    @property
    def batches(self) -> int:
        """Model calls run so far (a generate batch, a stream, a score)."""
        return self.metrics.batches

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self.q.put(None)
        self._thread.join(timeout=60)

    def running(self) -> bool:
        """The scheduler's thread is alive (started, and not stopped or still ending its batch)."""
        return self._thread.is_alive()

    def submit(self, job: Job) -> Job:
        self.q.put(job)
        return job

    def pending(self) -> int:
        return self.q.qsize() + len(self.held)

    # -- the loop
    def _next(self, timeout: float | None) -> Job | None:
        """The next job: held ones first; ``timeout`` None waits, 0 takes only what is queued."""
        if self.held:
            return self.held.pop(0)
        if timeout is None:
            return self.q.get()
        return self.q.get(block=timeout > 0, timeout=timeout if timeout > 0 else None)

    def _loop(self) -> None:
        if self.engine.model.device.type == "cuda":
            import torch

            torch.cuda.set_device(self.engine.model.device)
        while not self._stop:
            job = self._next(None)
            if job is None:
                break
            if self._dropped(job):
                continue
            batch = [job]
            try:
                if job.kind == "generate":
                    batch = self._gather(job)
                    self._generate(batch)
                elif job.kind == "stream":
                    self._stream(job)
                else:
                    self._score(job)
            except BaseException as exc:  # never leave a waiting connection behind
                for j in batch:
                    if not j.done.is_set():
                        j.finish(error=exc)

    @staticmethod
    def _dropped(job: Job) -> bool:
        """A job whose client left while it was queued is finished unrun."""
        if job.cancelled and not job.done.is_set():
            if job.events is not None:
                job.events.put(None)
            job.finish(error=Cancelled("cancelled before it ran: the client closed its connection"))
        return job.cancelled

    def _gather(self, first: Job) -> list[Job]:
        """``first`` and the jobs with its key that arrive within max_delay, up to max_inputs inputs."""
        batch, n = [first], len(first.payload["texts"])
        deadline = time.monotonic() + self.max_delay
        skipped: list[Job] = []
        held = self.held  # jobs taken earlier but not batched: looked at once, then the queue
        self.held = []
        try:
            while n < self.max_inputs:
                left = max(0.0, deadline - time.monotonic())  # past the deadline: what is queued, no waiting
                try:
                    job = held.pop(0) if held else self.q.get(block=left > 0, timeout=left if left > 0 else None)
                except queue.Empty:
                    break
                if job is None:  # stop: let the loop see it after this batch
                    self.q.put(None)
                    break
                if self._dropped(job):
                    continue
                skipped.append(job)  # until it is known to join the batch
                # only generate jobs have "texts" to count (a score job's payload has sources)
                if job.kind == "generate" and job.key == first.key and n + len(job.payload["texts"]) <= self.max_inputs:
                    batch.append(skipped.pop())
                    n += len(job.payload["texts"])
        except BaseException:  # no job taken from the queue may vanish: all but the first wait again
            skipped, batch = batch[1:] + skipped, batch[:1]
            raise
        finally:
            self.held = skipped + held
        return batch

    def _generate(self, batch: list[Job]) -> None:
        try:
            results = self._run_generate(batch)
        except Exception:  # an EncDecError, or an internal error one request's input may have caused
            if len(batch) == 1:
                raise
            for job in batch:  # one request's error must not fail the others
                if self._dropped(job):
                    continue
                try:
                    job.finish(self._run_generate([job])[0])
                except BaseException as exc:
                    job.finish(error=exc)
            return
        for job, res in zip(batch, results):
            job.finish(res)

    def _run_generate(self, batch: list[Job]) -> list:
        texts, langs, prefixes, uids = [], [], [], []
        for job in batch:
            p = job.payload
            texts += p["texts"]
            langs += [p["per"].get("target_lang")] * len(p["texts"])
            prefixes += [p["per"].get("target_prefix")] * len(p["texts"])
            uids += [p["per"].get("lora_uid", -1)] * len(p["texts"])
        first = batch[0].payload
        kw = dict(first["params"])
        if any(x is not None for x in langs):
            kw["target_lang"] = langs
        if any(x is not None for x in prefixes):
            kw["target_prefix"] = prefixes
        if any(u != -1 for u in uids):
            kw["lora_uids"] = uids
        # stops between the engine's batches once every client of this batch has gone
        with cancel_when(lambda: all(j.cancelled for j in batch)):
            out = self.engine.generate(texts, runner=self.runner, return_scores=first["scores"], **kw)
        self.requests += len(batch)
        self.metrics.batch(len(texts))
        res, i = [], 0
        for job in batch:
            k = len(job.payload["texts"])
            res.append(out[i: i + k])
            i += k
        return res

    def _stream(self, job: Job) -> None:
        p = job.payload
        kw = dict(p["params"])
        for k in ("target_lang", "target_prefix"):
            if p["per"].get(k) is not None:
                kw[k] = p["per"][k]
        if p["per"].get("lora_uid") is not None:
            kw["lora_uids"] = p["per"]["lora_uid"]
        self.requests += 1
        self.metrics.batch(len(p["texts"]))
        stream = None
        try:
            stream = self.engine.generate_stream(p["texts"], runner=self.runner, **kw)
            for ev in stream:
                if job.cancelled:
                    break
                job.events.put(ev)
        except BaseException as exc:
            job.events.put(exc)
        finally:
            if stream is not None:
                stream.close()
            job.events.put(None)
            job.finish()

    def _score(self, job: Job) -> None:
        p = job.payload
        with cancel_when(lambda: job.cancelled):
            res = self.engine.score(p["sources"], p["targets"], target_lang=p.get("target_lang"),
                                    source_lang=p.get("source_lang"), lora_uids=p.get("lora_uid"))
        self.requests += 1
        self.metrics.batch(len(p["sources"]))
        job.finish(res)


# ---------------------------------------------------------------------------- HTTP
def make_handler(server_state: "Server"):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "encdec"
        timeout = server_state.request_timeout  # StreamRequestHandler.setup: the socket's timeout
        _t0 = None  # a POST's arrival time until it is counted (_count); GETs are not counted

        def log_message(self, fmt, *args):  # quiet unless asked
            if server_state.log is not None:
                server_state.log(f"{self.address_string()} {fmt % args}")

        def setup(self) -> None:
            super().setup()
            self.rfile = _RequestReader(self.rfile, self.connection, self.timeout)

        def send_error(self, code, message=None, explain=None) -> None:
            """http.server's own refusals (a request line it cannot read, headers too long or too many,
            an unknown method) in JSON like every other error, not its HTML page; the connection closes."""
            self.close_connection = True
            phrase = self.responses.get(code, ("error",))[0]
            self.log_error("code %d, message %s", code, message)
            data = (json.dumps({"error": f"{int(code)} {phrase}" + (f": {message}" if message else "")}) + "\n").encode()
            self.send_response(code, message)
            self.send_header("Connection", "close")
            body = self.command != "HEAD" and code >= 200 and code not in (204, 205, 304)
            if body:
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def handle_one_request(self) -> None:
            """http.server's, with a client that hangs up (a reset while its request is read, a broken
            pipe writing its reply) told in one line on stderr: it escaped to socketserver's
            handle_error, which printed a traceback. Other exceptions still go there. The request line
            and headers are read against the request timeout in all (``_RequestReader``)."""
            self.command = None  # set by parse_request: a request was read, a reply was due
            self.rfile.begin()
            try:
                super().handle_one_request()
            except _HANGUP as exc:
                self.close_connection = True
                self._tell_hangup(exc, f"closed the connection before the reply to {self.command} {self.path}"
                                  if self.command else "closed the connection")

        def _tell_hangup(self, exc: BaseException, what: str) -> None:
            """One line on stderr for a client that left: 'client HOST:PORT <what> (<exception type>)'."""
            host, port = self.client_address[:2]
            print(f"encdec serve: client {host}:{port} {what} ({type(exc).__name__})", file=sys.stderr, flush=True)

        # -- replies
        def _json(self, status: int, obj, headers=()) -> None:
            data = (json.dumps(obj, ensure_ascii=False) + "\n").encode()
            self._status = int(status)
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self._count()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, exc: BaseException) -> None:
            if isinstance(exc, RequestError):
                self._json(exc.status, {"error": str(exc)})
            elif isinstance(exc, EncDecError):
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            else:
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR,
                           {"error": f"internal error: {type(exc).__name__}: {exc}"})

        def _length(self) -> int:
            """The body's length, from Content-Length (RequestError 411 / 413). When refused the body is
            left unread, so the connection closes after the answer (its bytes were read as the next request)."""
            te = self.headers.get("Transfer-Encoding")
            if te is not None:  # never read by the length beside it (RFC 9112 6.1: request smuggling)
                self.close_connection = True
                raise RequestError(f"Transfer-Encoding {te!r}: not supported; send the body with a Content-Length",
                                   HTTPStatus.NOT_IMPLEMENTED)
            n = self.headers.get("Content-Length")
            if n is None or not (n.isascii() and n.isdigit()):
                self.close_connection = True
                raise RequestError("a JSON body with a Content-Length header is expected" if n is None else
                                   f"Content-Length = {n!r}: expected the body's length in bytes",
                                   HTTPStatus.LENGTH_REQUIRED)
            if int(n) > MAX_BODY:
                self.close_connection = True
                raise RequestError(f"request body of {n} bytes: at most {MAX_BODY}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return int(n)

        def _read_body(self, n: int) -> bytes:
            """The body's ``n`` bytes (fewer when the client closed first, as rfile.read gives); a
            RequestError 408 when the request timeout passes without a byte, the connection then closed."""
            chunks, got = [], 0
            try:
                while got < n:
                    chunk = self.rfile.read1(n - got)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    got += len(chunk)
            except TimeoutError:
                self.close_connection = True
                raise RequestError(f"request body: {got} of the {n} bytes announced by Content-Length arrived, "
                                   f"then nothing for {self.timeout:g} s", HTTPStatus.REQUEST_TIMEOUT) from None
            return b"".join(chunks)

        def parse_request(self) -> bool:
            """http.server's, with a JSON 408 when the headers stop coming (the request line came: a
            request had begun). A timeout before the request line closes the connection without a word
            (handle_one_request: an idle keep-alive connection, or one that never sent anything)."""
            try:
                ok = super().parse_request()
            except TimeoutError:
                self.close_connection = True
                self._json(HTTPStatus.REQUEST_TIMEOUT, {"error": (
                    f"request headers: incomplete after {self.timeout:g} s without more bytes"
                    if self.rfile.stalled() else
                    f"request headers: still incomplete {self.timeout:g} s after the request began")})
                return False
            self.rfile.end_head()
            # the path the routes compare: without a query string ("/health?probe=1" is /health)
            self.route = self.path.split("?", 1)[0] if ok else ""
            return ok

        def _body(self) -> dict:
            raw = self._read_body(self._length())
            try:
                body = json.loads(raw.decode("utf-8"))
            # ValueError: bad UTF-8, bad JSON, an integer of more than 4300 digits; RecursionError: nesting
            except (ValueError, RecursionError) as exc:
                raise RequestError(f"the body is not JSON: {exc}") from None
            if not isinstance(body, dict):
                raise RequestError(f"the body is {type(body).__name__}: expected a JSON object")
            return body

        def _discard_body(self) -> None:
            """Read the body of a request refused unread, so that the connection can go on (a
            RequestError 408 when it does not arrive)."""
            if self.headers.get("Content-Length") is not None and self.headers.get("Transfer-Encoding") is None:
                try:
                    n = self._length()
                except RequestError:  # a length not to trust: the connection closes instead
                    return
                self._read_body(n)

        def _not_allowed(self) -> None:
            """405 for a method the path does not take (any method but GET and POST: every path)."""
            try:
                self._discard_body()
            except RequestError as exc:  # the body did not arrive: its 408
                return self._error(exc)
            allow = "POST" if self.route in _POST_PATHS else "GET" if self.route in _GET_PATHS else None
            if allow is None:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path!r}: {_PATHS}"})
            else:
                self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.command} {self.path}: expected "
                                                                    f"{allow} {self.route}"}, [("Allow", allow)])

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _not_allowed  # noqa: N815

        # -- routes
        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.route in _POST_PATHS:
                self._not_allowed()
            elif self.route == "/health":
                s = server_state.scheduler
                self._json(HTTPStatus.OK, {"status": "ok", "pending": s.pending(), "requests": s.requests,
                                           "batches": s.batches})
            elif self.route == "/v1/model":
                self._json(HTTPStatus.OK, server_state.model_info())
            elif self.route == "/metrics":
                s = server_state.scheduler
                data = s.metrics.render(s.pending()).encode()
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path!r}: {_PATHS}"})

        def do_POST(self):  # noqa: N802
            self._t0, self._status, self._endpoint = time.monotonic(), 0, "other"
            try:
                self._post()
            finally:  # not answered (the connection broke) or answered: counted once in any case
                self._count()

        def _count(self) -> None:
            """Count this POST with its status and time, once: just before the last bytes of its
            answer go out (a client that reads /metrics as soon as it has its reply finds it counted;
            counted after the write, it raced the next request), else when it ends unanswered."""
            t0, self._t0 = self._t0, None
            if t0 is not None:
                server_state.scheduler.metrics.request(self._endpoint, self._status, time.monotonic() - t0)

        def _post(self):
            try:
                if self.route in _GET_PATHS:
                    return self._not_allowed()
                if self.route not in _POST_PATHS:
                    self._discard_body()
                    raise RequestError(f"no such path {self.path!r}: POST /v1/generate, /v1/score",
                                       HTTPStatus.NOT_FOUND)
                self._endpoint = "score" if self.route == "/v1/score" else "generate"
                body = self._body()
                if self.route == "/v1/score":
                    return self._score(body)
                texts, params, per, scores, stream = parse_generate(body, server_state.gen_fields)
                server_state.check_inputs(len(texts), "inputs")
                payload = {"texts": texts, "params": params, "per": per, "scores": scores}
                if stream:
                    self._endpoint = "generate_stream"
                    return self._stream(Job("stream", payload, events=queue.Queue()))
                job = self._await(server_state.scheduler.submit(Job("generate", payload, batch_key(params, scores))))
                if job.error is not None:
                    raise job.error
                outs = job.result
                if scores:
                    outs = [[asdict(h) for h in row] for row in outs]
                self._json(HTTPStatus.OK, {"outputs": outs})
            except _HANGUP:  # the client is gone: no error reply to write (it was a 500 that failed too)
                raise
            except BaseException as exc:
                self._error(exc)

        def _score(self, body: dict) -> None:
            unknown = sorted(set(body) - {"sources", "targets", "target_lang", "source_lang", "lora_uid"})
            if unknown:
                raise RequestError(f"unknown field(s) {unknown}: expected sources, targets, target_lang, source_lang, "
                                   f"lora_uid")
            for k in ("sources", "targets"):
                if k not in body:
                    raise RequestError(f"missing field {k!r}: a list of strings")
            for k in ("target_lang", "source_lang"):
                if isinstance(body.get(k), str):
                    _unicode(body[k], k)
            payload = {"sources": _texts(body["sources"], "sources"), "targets": _texts(body["targets"], "targets"),
                       "target_lang": body.get("target_lang"), "source_lang": body.get("source_lang"),
                       "lora_uid": _lora_uid(body.get("lora_uid"), "lora_uid")}
            server_state.check_inputs(len(payload["sources"]), "sources")
            job = self._await(server_state.scheduler.submit(Job("score", payload)))
            if job.error is not None:
                raise job.error
            self._json(HTTPStatus.OK, {"results": [
                {"score": r.mean, "sum": r.sum, "num_tokens": r.num_tokens, "tokens": r.tokens,
                 "token_logprobs": r.token_logprobs} for r in job.result]})

        def _await(self, job: Job) -> Job:
            """``job`` once the scheduler has finished it. A client that closes its connection meanwhile
            cancels it: a queued job is dropped unrun, a running one stops before the engine's next
            batch of requests (a batch shared with other clients' requests runs on for them); then
            ConnectionAbortedError (a hang-up: one line on stderr, code 499 in the metrics)."""
            while not job.done.wait(GONE_POLL):
                if self._client_gone():
                    job.cancelled = True
                    job.done.wait()
                    self._status = CLIENT_CLOSED_REQUEST
                    raise ConnectionAbortedError("the client closed its connection while its request ran")
            return job

        def _client_gone(self) -> bool:
            """Whether the client has closed (or reset) its side of the connection: the socket reads as
            ended. Bytes waiting there (a next request sent ahead) mean it is still there."""
            sock = self.connection
            try:
                if not select.select([sock], [], [], 0)[0]:
                    return False
                return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:  # reset
                return True

        def _stream(self, job: Job) -> None:
            server_state.scheduler.submit(job)
            first = job.events.get()
            if isinstance(first, BaseException):  # refused before any token: a plain JSON error
                job.done.wait()
                raise first
            self._status = HTTPStatus.OK
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            item = first
            try:
                while item is not None:
                    if isinstance(item, BaseException):
                        msg = item if isinstance(item, EncDecError) else f"internal error: {type(item).__name__}: {item}"
                        data = {"error": str(msg)}
                    else:
                        data = {"index": item.index, "sequence": item.sequence, "text": item.text,
                                "tokens": item.tokens, "finished": item.finished, "output": item.output}
                    self.wfile.write(f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode())
                    self.wfile.flush()
                    item = job.events.get()
                self._count()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (*_HANGUP, TimeoutError) as exc:
                # the client left (or took nothing of the reply for the request timeout): the scheduler
                # stops this generation
                job.cancelled = True
                self._tell_hangup(exc, f"took nothing of the stream of {self.command} {self.path} for "
                                       f"{self.timeout:g} s" if isinstance(exc, TimeoutError) else
                                  f"closed the connection during the stream of {self.command} {self.path}")
                while job.events.get() is not None:
                    pass

    return Handler


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 256  # listen backlog: many clients connect at once (the default 5 resets them)
    daemon_threads = True


def warmup_plan(runner, limits, batch_sizes=None, input_lens=None) -> tuple[list[int], list[int]]:
    """The (request rows, source length) grid ``warm_up`` captures: by default every batch bucket of
    the runner up to the engine's max batch size (the largest batch the scheduler forms), and every
    source bucket of the runner (16, 32, ...) up to the max input length; given lists are checked against the
    limits (EncDecError naming the value)."""
    max_b, max_s = int(limits.max_batch_size), int(limits.max_input_len)
    if batch_sizes is None:
        batch_sizes = sorted({b for b in runner.batch_buckets if b <= max_b} | {max_b})
    if input_lens is None:
        input_lens = sorted({s for s in runner.source_buckets if s <= max_s} | {max_s})
    for flag, vals, top in (("--warmup-batch-sizes", batch_sizes, max_b), ("--warmup-input-lens", input_lens, max_s)):
        for v in vals:
            if not 1 <= int(v) <= top:
                raise EncDecError(f"{flag}: {v} is beyond the engine's limit (expected 1..{top})")
    return [int(b) for b in batch_sizes], [int(s) for s in input_lens]


def warm_up(runner, limits, batch_sizes=None, input_lens=None, log=None, engine=None) -> float:
    """Capture the runner's graphs before the first request, so that no request waits for a compile
    and capture (seconds each with the compiled step; measured in docs/performance.md). Greedy
    requests replay the fused greedy loop ("greedy"), sampling, streaming and scores the runner's step
    ("step"), and both need the prefill graph of their bucket; ``runner.warmup`` captures all three
    for each (batch, source) bucket of ``warmup_plan``. When the engine's default options decode with
    beams (``engine`` given, its generation defaults' num_beams > 1: translation models), one request
    batch per (batch, source) bucket runs with those defaults, which captures their beam graph (one
    per bucket of rows; a batch size between two planned ones shares the larger one's graph). Beam
    graphs of other options are captured at their first use. Returns the seconds taken."""
    import torch

    batch_sizes, input_lens = warmup_plan(runner, limits, batch_sizes, input_lens)
    beams = engine is not None and engine.generation_config().num_beams > 1
    tok = None
    if beams:
        cfg = engine.model.cfg
        tok = min(cfg.vocab_size - 1, cfg.pad_token_id + 1)
    t0 = time.perf_counter()
    for i, b in enumerate(batch_sizes):
        # in inference mode, as requests run (Engine.generate): a step compiled under no_grad alone
        # fails the compiled code's guards there and compiles again at the first request
        with torch.inference_mode():
            runner.warmup(batch_sizes=(b,), source_lens=tuple(input_lens), kinds=("greedy", "step"))
        if beams:
            try:
                for s in input_lens:
                    engine.generate_ids([[tok] * s] * b, runner=runner)
            except LimitError as exc:  # the defaults do not fit the engine: requests must override them
                beams = False
                if log is not None:
                    log(f"warm-up: no beam graphs for the default options ({exc})")
        if log is not None:
            log(f"warm-up: batch {b} at input lengths {input_lens} ({i + 1}/{len(batch_sizes)}, "
                f"{time.perf_counter() - t0:.1f} s)")
    return time.perf_counter() - t0


def check_request_timeout(seconds, name: str = "--request-timeout") -> None:
    """EncDecError naming ``name`` and the value unless it is a number of seconds in (0, MAX_REQUEST_TIMEOUT]."""
    ok = isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 < seconds <= MAX_REQUEST_TIMEOUT
    if not ok:
        shown = f"{seconds:g}" if isinstance(seconds, float) else repr(seconds)
        raise EncDecError(f"{name} {shown}: expected a number of seconds in (0, {MAX_REQUEST_TIMEOUT:g}]")


class Server:
    """The HTTP server and its scheduler; ``serve_forever`` blocks, ``start`` runs it in a thread.
    ``request_timeout``: seconds a connection may stay silent mid-request (REQUEST_TIMEOUT)."""

    def __init__(self, engine, host: str = "127.0.0.1", port: int = 8000, runner=None, max_delay: float = 0.005,
                 log=None, request_timeout: float = REQUEST_TIMEOUT, max_request_inputs: int = MAX_REQUEST_INPUTS):
        from .runtime.generation import GenerationConfig

        check_request_timeout(request_timeout, "request_timeout")
        if not isinstance(max_request_inputs, int) or isinstance(max_request_inputs, bool) or max_request_inputs < 1:
            raise EncDecError(f"max_request_inputs = {max_request_inputs!r}: expected a positive integer")
        self.max_request_inputs = max_request_inputs
        self.engine = engine
        self.log = log
        self.request_timeout = float(request_timeout)
        self.gen_fields = set(GenerationConfig.field_names()) - {"decoder_start_token_id", "pad_token_id"}
        self.scheduler = Scheduler(engine, runner, max_delay)
        try:
            self.httpd = _HTTPServer((host, port), make_handler(self))
        except OSError as exc:
            raise EncDecError(f"serve: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
        self._thread = None

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    def check_inputs(self, n: int, field: str) -> None:
        """One request's inputs at most max_request_inputs: a request runs to its end once started
        (its client may have left meanwhile), and the requests queued behind it wait for it."""
        if n > self.max_request_inputs:
            raise RequestError(f"{field}: {n} in one request, at most {self.max_request_inputs} (the server's "
                               f"--max-request-inputs): send several requests")

    def model_info(self) -> dict:
        e = self.engine
        lim = e.limits
        ctx = e.ctx
        return {"engine": str(e.engine_dir), "family": e.config.family, "dtype": str(e.model.dtype).replace("torch.", ""),
                "device": str(e.model.device), "runner": type(self.scheduler.runner).__name__
                if self.scheduler.runner is not None else "eager",
                "tp_size": 1 if ctx is None else ctx.tp_size, "pp_size": 1 if ctx is None else ctx.pp_size,
                "limits": {"max_batch_size": lim.max_batch_size, "max_input_len": lim.max_input_len,
                           "max_output_len": lim.max_output_len, "max_beam_width": lim.max_beam_width},
                "generation_defaults": e.generation_defaults}

    def start(self) -> "Server":
        self.scheduler.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="encdec-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.scheduler.start()
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=30)
            self._thread = None
        self.httpd.server_close()
        self.scheduler.stop()
