"""`encdec run` multi-rank, end to end: mpirun and torchrun launches equal the single-rank run,
only rank 0 prints, and a launch of the wrong size fails on every rank with one line each."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _mpi import MPIRUN, need_mpi

from encdec_core.cli import main

from _cli_helpers import make_t5_dir

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
MPI_ARGS = ["--allow-run-as-root", "--oversubscribe"]
TEXTS = ["hello world", "a somewhat longer input sentence"]
RUN_ARGS = ["--input-text", *TEXTS, "--max-output-len", "10", "--num-beams", "3", "--device", "cpu"]


def run_args(root: Path) -> list:
    """Beam search, compared with HF fp32 on every run (so the JSON carries token ids)."""
    return [*RUN_ARGS, "--compare-hf", "--hf-model-dir", str(root / "hf")]

pytestmark = [pytest.mark.mpi]



def _encdec() -> list[str]:
    exe = BIN / "encdec"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "encdec_core.cli"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ENCDEC_DISABLE_PLUGIN_AUTOLOAD"}  # entry points on
    env.update(ENCDEC_DIST_TIMEOUT="90", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _launch(cmd, timeout=300) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=_env(), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(map(str, cmd))} hung (> {timeout}s):\n{exc.stdout}\n{exc.stderr}")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """A tiny T5 (byte tokenizer) converted and built for tp1, tp2 and pp2, plus the single-rank output."""
    from encdec_core import registry
    from conftest import builtin_modules
    import importlib

    root = tmp_path_factory.mktemp("par-cli")
    hf = make_t5_dir(root / "hf")
    registry.reset()
    for m in builtin_modules():
        registry.register_plugin(importlib.import_module(m), name=m)
    try:
        for tp, pp in ((1, 1), (2, 1), (1, 2)):
            ck, en = root / f"ck{tp}{pp}", root / f"en{tp}{pp}"
            assert main(["convert", "--model-dir", str(hf), "--output-dir", str(ck), "--tp-size", str(tp),
                         "--pp-size", str(pp), "--quiet"]) == 0
            assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(en), "--max-batch-size", "4",
                         "--max-input-len", "64", "--max-output-len", "16", "--max-beam-width", "4"]) == 0
        assert main(["run", "--engine-dir", str(root / "en11"), *run_args(root), "--output-json",
                     str(root / "single.json")]) == 0
    finally:
        registry.reset()
    return root, json.loads((root / "single.json").read_text())["results"]


def _check(root: Path, r: subprocess.CompletedProcess, out: Path, single) -> None:
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(out.read_text())["results"]
    assert [row["ids"] for row in got] == [row["ids"] for row in single]
    assert got == single and all(row["match"] for row in got)  # and equal to HF fp32
    assert r.stdout.count("Input :") == len(TEXTS), r.stdout  # rank 0 prints, the others do not


@need_mpi
def test_mpirun_encdec_run_tp2_equals_single_rank(engines):
    root, single = engines
    out = root / "mpi-tp2.json"
    r = _launch([MPIRUN, *MPI_ARGS, "-n", "2", *_encdec(), "run", "--engine-dir", root / "en21",
                 *run_args(root), "--output-json", out])
    _check(root, r, out, single)


def test_torchrun_encdec_run_pp2_equals_single_rank(engines):
    root, single = engines
    out = root / "torchrun-pp2.json"
    r = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "encdec_core.cli", "run", "--engine-dir", root / "en12", *run_args(root),
                 "--output-json", out])
    _check(root, r, out, single)


@need_mpi
def test_mpirun_wrong_world_size_fails_on_every_rank(engines):
    root, _ = engines
    r = _launch([MPIRUN, *MPI_ARGS, "-n", "3", *_encdec(), "run", "--engine-dir", root / "en21", *RUN_ARGS],
                timeout=180)
    assert r.returncode != 0
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("encdec: error:")]
    assert len(errs) == 3, r.stderr
    assert all("this launch has 3 rank(s) (mpirun) but the mapping needs tp_size 2 x pp_size 1 = 2" in e
               for e in errs), errs
    assert "Traceback" not in r.stderr + r.stdout


@need_mpi
def test_mpirun_ranks_given_different_options_fail_on_every_rank(engines):
    """Ranks of one launch given another --dtype (or any other option) met in their collectives with
    tensors of other sizes: a gloo abort with a C++ stack on one rank, an internal error on the other.
    Now every rank names the ranks that differ."""
    root, _ = engines
    cmd = [*_encdec(), "run", "--engine-dir", root / "en21", "--device", "cpu", "--input-text", "hello",
           "--max-new-tokens", "4"]
    r = _launch([MPIRUN, *MPI_ARGS, "-n", "1", *cmd, "--dtype", "float32", ":", "-n", "1", *cmd, "--dtype", "bfloat16"],
                timeout=180)
    assert r.returncode != 0
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("encdec: error:")]
    assert len(errs) == 2 and all("the ranks were given different options (ranks grouped by their options: "
                                  "[[0], [1]])" in e for e in errs), r.stderr
    assert "Traceback" not in r.stderr + r.stdout and "internal error" not in r.stderr


@need_mpi
def test_mpirun_benchmark_preset_tp2_matches_hf(tmp_path):
    """encdec benchmark --preset ... --tp-size 2: each rank builds the preset from one seed (HF's
    initialisation with --compare-hf) and keeps its part; rank 0 compares with HF in the same run."""
    out = tmp_path / "bench.json"
    r = _launch([MPIRUN, *MPI_ARGS, "-n", "2", *_encdec(), "benchmark", "--preset", "t5-small", "--tp-size", "2",
                 "--device", "cpu", "--batch-size", "2", "--input-output-len", "12,6", "--repeats", "1",
                 "--warmup", "0", "--compare-hf", "--json", out, "--quiet"])
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["environment"]["tp_size"] == 2 and res["environment"]["pp_size"] == 1
    rows = {row["system"]: row for row in res["rows"]}
    assert rows["encdec"]["tokens_per_s"] > 0 and rows["hf"]["token_match_vs_ours"] == 1.0


def test_benchmark_parallel_options_are_checked(tmp_path, capsys, builtin_registry):
    from encdec_core.cli import main as cli_main

    def fails(*argv) -> str:
        assert cli_main(["benchmark", *argv, "--device", "cpu"]) != 0
        return capsys.readouterr().err

    # an engine's mapping comes from its config.json
    assert "apply to --preset" in fails("--engine-dir", str(tmp_path), "--tp-size", "2")
    # the launch must have tp x pp ranks: a plain process has one
    assert "needs tp_size 2 x pp_size 1 = 2 rank(s)" in fails("--preset", "t5-small", "--tp-size", "2")


def _http(addr, path, body=None):
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{addr}{path}", data=data, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _stream_then_leave(addr, body, events: int) -> list:
    """A streaming client that reads ``events`` events, then closes its connection (cancels the stream)."""
    import socket

    host, port = addr.rsplit(":", 1)
    data = json.dumps({**body, "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(data) + data)
        f = sock.makefile("rb")
        got = []
        while len(got) < events:
            line = f.readline().decode()
            assert line, "the stream ended early"
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))
        f.close()
    return got


@need_mpi
def test_mpirun_serve_tp2_equals_single_rank(engines):
    """encdec serve of a tp=2 engine under mpirun: rank 0 serves HTTP and every rank runs each batch.
    Batched requests, a stream whose client leaves mid-way (every rank stops at rank 0's step, so the
    next requests still meet in their collectives), scoring and seeded sampling equal the single-rank
    engine; a SIGTERM to rank 0 ends every rank cleanly (exit 0)."""
    import importlib
    import signal
    import threading

    from conftest import builtin_modules
    from encdec_core import registry
    from encdec_core.engine import Engine

    root, _ = engines
    registry.reset()
    for m in builtin_modules():
        registry.register_plugin(importlib.import_module(m), name=m)
    try:
        single = Engine.load(root / "en11")
        beam = dict(num_beams=3, max_new_tokens=10)
        want = single.generate(TEXTS, **beam)
        want_sample = single.generate(TEXTS[:1], do_sample=True, seed=5, max_new_tokens=8)
        want_score = single.score(TEXTS, ["world", "a target"])
    finally:
        registry.reset()
    p = subprocess.Popen([str(MPIRUN), *MPI_ARGS, "-n", "2", *_encdec(), "serve", "--engine-dir", str(root / "en21"),
                          "--port", "0", "--device", "cpu", "--max-batch-delay-ms", "200"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    try:
        first = p.stderr.readline()  # rank 0's "... on http://HOST:PORT ..." (or the error it stopped with)
        assert "tp_size 2 x pp_size 1" in first and "http://" in first, first + p.stderr.read()
        addr = first.split("http://", 1)[1].split()[0]
        assert _http(addr, "/v1/model")["tp_size"] == 2
        out = [None] * len(TEXTS)  # concurrent clients, batched together
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(
            i, _http(addr, "/v1/generate", {"inputs": TEXTS[i], "parameters": beam})["outputs"][0]))
            for i in range(len(TEXTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert out == want
        got = _stream_then_leave(addr, {"inputs": TEXTS[1], "parameters": {"max_new_tokens": 12,
                                                                           "min_new_tokens": 12}}, 2)
        assert [e["finished"] for e in got] == [False, False]
        assert _http(addr, "/v1/generate", {"inputs": TEXTS[:1], "parameters": {"do_sample": True, "seed": 5,
                                                                                 "max_new_tokens": 8}})["outputs"] == want_sample
        res = _http(addr, "/v1/score", {"sources": TEXTS, "targets": ["world", "a target"]})["results"]
        assert [r["tokens"] for r in res] == [w.tokens for w in want_score]
        assert max(abs(r["sum"] - w.sum) for r, w in zip(res, want_score)) < 1e-4
        assert _http(addr, "/health")["batches"] >= 4
        rank0 = int(first.split("rank 0 is pid ", 1)[1].split(")")[0])
        os.kill(rank0, signal.SIGTERM)  # rank 0 stops listening, then ends the other rank: a clean exit
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0 and "Traceback" not in err, err
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@need_mpi
def test_mpirun_serve_ranks_end_with_their_launcher(engines):
    """A SIGKILL to mpirun reaches none of its ranks: serving ranks notice that their launcher is gone and
    exit within seconds (they ran on as orphans, rank 0 listening, the others waiting for it)."""
    import signal
    import time

    root, _ = engines
    eng = root / "en21"
    p = subprocess.Popen([str(MPIRUN), *MPI_ARGS, "-n", "2", *_encdec(), "serve", "--engine-dir", str(eng),
                          "--port", "0", "--device", "cpu"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)

    def ranks():
        out = subprocess.run(["pgrep", "-f", f"python.* serve --engine-dir {eng} "], capture_output=True, text=True).stdout
        return out.split()

    try:
        first = p.stderr.readline()
        assert "http://" in first, first + p.stderr.read()
        assert len(ranks()) == 2
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        deadline = time.monotonic() + 20
        while ranks() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not ranks(), "serving ranks outlived their launcher"
    finally:
        for pid in ranks():
            os.kill(int(pid), signal.SIGKILL)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
