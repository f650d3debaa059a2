"""run_benchmark on CPU with a tiny preset: sane rows, CSV and JSON; HF side by side in the same run."""
from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch

from encdec_core.errors import EncDecError
from encdec_core.plugins import hookimpl
from encdec_core.registry import Registry

TINY = dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=96, d_model=32, d_kv=8,
            d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="relu", tie_word_embeddings=True,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


@pytest.fixture
def reg():
    import encdec_t5.plugin as t5p

    fam = dataclasses.replace(t5p.T5, name="t5-bench-test", aliases=(), architectures=(), model_types=(),
                              presets={"t5-tiny-test": TINY})

    class Plugin:
        @hookimpl
        def encdec_families(self):
            return [fam]

    r = Registry()
    r.register_plugin(Plugin(), name="bench-test")
    return r


def test_rows_csv_json(reg, tmp_path):
    pytest.importorskip("transformers")
    from encdec_core.benchmark import COLUMNS, format_table, run_benchmark

    csv_path, json_path = tmp_path / "b.csv", tmp_path / "b.json"
    rows = run_benchmark("t5-tiny-test", batch_sizes=[1, 2], input_output_lens=[(8, 4)], num_beams=1,
                         compare_hf=True, device="cpu", dtype="float32", csv_path=csv_path, json_path=json_path,
                         plot_path=None, progress=False, repeats=1, warmup=0, reg=reg, compare_ct2=False)
    systems = [(r["system"], r["batch_size"]) for r in rows]
    assert systems == [("encdec", 1), ("hf", 1), ("encdec", 2), ("hf", 2)]  # no hf-static on CPU
    for r in rows:
        assert r["e2e_ms"] > 0 and r["encoder_ms"] > 0
        assert r["generated_tokens"] == r["batch_size"] * 4
        assert r["tokens_per_s"] == pytest.approx(r["generated_tokens"] / (r["e2e_ms"] / 1e3))
        assert r["ms_per_step"] == pytest.approx(max(r["e2e_ms"] - r["encoder_ms"], 0) / 4)
        assert r["peak_mem_mb"] is None and r["graph_step_ms"] is None  # CPU
    for ours, hf in zip(rows[::2], rows[1::2]):
        assert hf["speedup_vs_hf"] == pytest.approx(1.0)
        assert ours["speedup_vs_hf"] == pytest.approx(ours["tokens_per_s"] / hf["tokens_per_s"])
        assert hf["token_match_vs_ours"] == 1.0  # same weights, fp32, same greedy semantics
    with open(csv_path, newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == list(COLUMNS) and len(got) == 4
    assert [g["system"] for g in got] == [s for s, _ in systems]
    data = json.loads(json_path.read_text())
    assert data["environment"]["torch"] == torch.__version__
    assert len(data["rows"]) == 4 and data["rows"][0]["model"] == "t5-tiny-test"
    table = format_table(rows)
    assert table.count("\n") == 2 + len(rows) and "| encdec |" in table


def test_json_keeps_finished_rows_when_a_run_stops(reg, tmp_path, monkeypatch):
    """A run stopped part way (a time limit, an error) leaves the rows measured so far in the JSON,
    marked incomplete; a finished run marks it complete."""
    import encdec_core.benchmark as bm

    real = bm._inputs

    def inputs(cfg, b, *a, **kw):
        if b == 2:
            raise KeyboardInterrupt  # what a time limit's signal looks like to the loop
        return real(cfg, b, *a, **kw)

    monkeypatch.setattr(bm, "_inputs", inputs)
    json_path = tmp_path / "b.json"
    with pytest.raises(KeyboardInterrupt):
        bm.run_benchmark("t5-tiny-test", batch_sizes=[1, 2], input_output_lens=[(8, 4)], device="cpu",
                         dtype="float32", json_path=json_path, progress=False, repeats=1, warmup=0, reg=reg)
    data = json.loads(json_path.read_text())
    assert data["complete"] is False
    assert [(r["system"], r["batch_size"]) for r in data["rows"]] == [("encdec", 1)]
    assert data["rows"][0]["tokens_per_s"] > 0  # derived columns filled
    monkeypatch.setattr(bm, "_inputs", real)
    bm.run_benchmark("t5-tiny-test", batch_sizes=[1], input_output_lens=[(8, 4)], device="cpu", dtype="float32",
                     json_path=json_path, progress=False, repeats=1, warmup=0, reg=reg)
    assert json.loads(json_path.read_text())["complete"] is True


def test_runner_choice_is_checked(reg):
    from encdec_core.benchmark import run_benchmark
    from encdec_core.errors import EncDecError

    for runner, msg in (("cuda-graph", "needs a CUDA device"), ("fast", "expected one of")):
        with pytest.raises(EncDecError, match=msg):
            run_benchmark("t5-tiny-test", batch_sizes=[1], input_output_lens=[(8, 4)], device="cpu",
                          dtype="float32", progress=False, repeats=1, warmup=0, reg=reg, runner=runner)


def test_beam_and_model_object(reg):
    from encdec_core.benchmark import model_from_preset, run_benchmark

    model = model_from_preset("t5-tiny-test", torch.float32, "cpu", reg=reg)
    rows = run_benchmark(model, batch_sizes=[2], input_output_lens=[(6, 3)], num_beams=2, device="cpu",
                         dtype=torch.float32, progress=False, repeats=1, warmup=0)
    assert len(rows) == 1 and rows[0]["system"] == "encdec" and rows[0]["num_beams"] == 2
    assert rows[0]["generated_tokens"] == 6 and rows[0]["speedup_vs_hf"] is None


def test_ctranslate2_rows(reg):
    pytest.importorskip("ctranslate2")
    pytest.importorskip("transformers")
    from encdec_core.benchmark import run_benchmark

    rows = run_benchmark("t5-tiny-test", batch_sizes=[2], input_output_lens=[(8, 4)], compare_hf=True,
                         device="cpu", dtype="float32", progress=False, repeats=1, warmup=0, reg=reg,
                         compare_ct2=True)
    ct2 = [r for r in rows if r["system"] == "ctranslate2"]
    assert len(ct2) == 1 and ct2[0]["e2e_ms"] > 0, rows
    assert ct2[0]["token_match_vs_ours"] == 1.0
    rows = run_benchmark("t5-tiny-test", batch_sizes=[2], input_output_lens=[(8, 4)], compare_hf=True,
                         device="cpu", dtype="bfloat16", progress=False, repeats=1, warmup=0, reg=reg,
                         compare_ct2=True)
    assert [r["dtype"] for r in rows] == ["bfloat16", "bfloat16", "float32"]  # CTranslate2's model is float32


def test_bad_arguments(reg):
    from encdec_core.benchmark import run_benchmark

    with pytest.raises(EncDecError, match="unknown preset 'nope'.*t5-tiny-test"):
        run_benchmark("nope", device="cpu", progress=False, reg=reg)
    with pytest.raises(EncDecError, match="batch size 0"):
        run_benchmark("t5-tiny-test", batch_sizes=[0], device="cpu", progress=False, reg=reg)
    with pytest.raises(EncDecError, match="input/output length"):
        run_benchmark("t5-tiny-test", input_output_lens=[(8,)], device="cpu", progress=False, reg=reg)


def test_cli_parsers():
    from encdec_core.benchmark import parse_batch_sizes, parse_input_output_lens

    assert parse_batch_sizes("1;8;64") == [1, 8, 64] and parse_batch_sizes("4") == [4]
    assert parse_input_output_lens("128,64;512,128") == [(128, 64), (512, 128)]
    for bad in ("", "0", "1;x", "-2", "1;;8", "1;8;"):  # an empty entry was skipped without a word
        with pytest.raises(EncDecError, match="--batch-size"):
            parse_batch_sizes(bad)
    for bad in ("", "128", "128,0", "1,2,3", "a,b", "16,8;", ";16,8"):
        with pytest.raises(EncDecError, match="--input-output-len"):
            parse_input_output_lens(bad)


@pytest.mark.parametrize("name", ["plot", "plot.tmp", "plot.png"])
def test_plot_file_is_checked_before_measuring(tmp_path, monkeypatch, capsys, name):
    """--plot was only checked after every measurement: matplotlib missing, or a name without an
    extension (matplotlib took "tmp" from the temporary name as the format), failed at the end."""
    from encdec_core import benchmark, cli

    monkeypatch.setattr(benchmark, "run_benchmark", lambda *a, **k: pytest.fail("measured before the check"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        want = "matplotlib is not installed"
    else:
        if name.endswith(".png"):
            pytest.skip("a writable format: nothing to refuse")
        want = "expected a file name ending in one of"
    rc = cli.main(["benchmark", "--preset", "t5-small", "--plot", str(tmp_path / name)])
    assert rc == 2 and want in capsys.readouterr().err


def test_model_column_names_the_engine_or_preset():
    """An engine in the README's layout (engines/t5-small/bf16) is t5-small/bf16, not bf16; a parallel
    preset is named by the CLI (name=), not by its EncDecModel's family."""
    from pathlib import Path

    from encdec_core.benchmark import engine_label

    assert engine_label(Path("engines/t5-small/bf16")) == "t5-small/bf16"
    assert engine_label(Path("engines/xl/tp2pp2")) == "xl/tp2pp2"
    assert engine_label(Path("engines/my-t5")) == "my-t5"
    assert engine_label(Path("bf16")) == "bf16"


def test_name_overrides_the_model_column(reg):
    pytest.importorskip("transformers")
    from encdec_core.benchmark import model_from_preset, run_benchmark

    model = model_from_preset("t5-tiny-test", torch.float32, "cpu", reg=reg)
    rows = run_benchmark(model, batch_sizes=[1], input_output_lens=[(6, 2)], device="cpu", dtype="float32",
                         progress=False, repeats=1, warmup=0, reg=reg, compare_hf=False, compare_ct2=False,
                         name="t5-tiny-test")
    assert [r["model"] for r in rows] == ["t5-tiny-test"]


def test_sampling_rows(reg, monkeypatch):
    """``sampling=``: every system samples with the same options and seed (ours through generate with
    do_sample, HF's generate seeded alike: on a CPU in fp32 the same tokens; CTranslate2 with its own
    generator), the ``decoding`` column names the options, and no greedy graph step is reported."""
    pytest.importorskip("transformers")
    import encdec_core.runtime.generation as gen
    from encdec_core.benchmark import run_benchmark

    seen = []
    real = gen.generate
    monkeypatch.setattr(gen, "generate", lambda model, ids, mask, gc, **kw: seen.append(gc) or real(model, ids, mask,
                                                                                                     gc, **kw))
    opts = dict(temperature=0.7, top_k=20, top_p=0.9, seed=5)
    ct2 = True
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        ct2 = False
    rows = run_benchmark("t5-tiny-test", batch_sizes=[3], input_output_lens=[(8, 6)], compare_hf=True,
                         device="cpu", dtype="float32", progress=False, repeats=1, warmup=0, reg=reg,
                         compare_ct2=ct2, sampling=opts)
    label = "sampling(temperature=0.7, top_k=20, top_p=0.9, seed=5)"
    assert [r["system"] for r in rows] == ["encdec", "hf"] + (["ctranslate2"] if ct2 else [])
    assert all(r["decoding"] == label and r["e2e_ms"] > 0 for r in rows), rows
    assert seen and all(g.do_sample and (g.temperature, g.top_k, g.top_p, g.seed) == (0.7, 20, 0.9, 5) for g in seen)
    assert rows[1]["token_match_vs_ours"] == 1.0  # HF with the same seed draws the same tokens
    assert rows[0]["speedup_vs_hf"] == pytest.approx(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"])
    greedy = run_benchmark("t5-tiny-test", batch_sizes=[3], input_output_lens=[(8, 6)], device="cpu",
                           dtype="float32", progress=False, repeats=1, warmup=0, reg=reg)
    assert greedy[0]["decoding"] == "greedy"


def test_sampling_options_are_checked(reg, monkeypatch, capsys):
    from encdec_core import benchmark, cli
    from encdec_core.benchmark import run_benchmark

    kw = dict(input_output_lens=[(8, 4)], device="cpu", progress=False, repeats=1, warmup=0, reg=reg)
    with pytest.raises(EncDecError, match="sampling is measured with num_beams 1, got num_beams 4"):
        run_benchmark("t5-tiny-test", num_beams=[1, 4], sampling={"top_k": 5}, **kw)
    with pytest.raises(EncDecError, match="temperature"):
        run_benchmark("t5-tiny-test", sampling={"temperature": 0.0}, **kw)
    with pytest.raises(EncDecError, match="top_p"):
        run_benchmark("t5-tiny-test", sampling={"top_p": 1.5}, **kw)
    with pytest.raises(EncDecError, match="sampling option.*topk"):
        run_benchmark("t5-tiny-test", sampling={"topk": 5}, **kw)
    got = []
    monkeypatch.setattr(benchmark, "run_benchmark", lambda *a, **k: got.append(k["sampling"]) or [])
    assert cli.main(["benchmark", "--preset", "t5-small", "--top-k", "5", "--random-seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "--top-k, --random-seed: sampling options; add --sampling" in err and "Traceback" not in err
    assert cli.main(["benchmark", "--preset", "t5-small", "--sampling", "--top-p", "0.8", "--quiet"]) == 0
    assert cli.main(["benchmark", "--preset", "t5-small", "--quiet"]) == 0
    assert cli.main(["benchmark", "--preset", "t5-small", "--sampling", "--quiet"]) == 0
    assert got == [{"top_p": 0.8}, None, {}]
    for flags, want in ((["--temperature", "0"], "--temperature 0.0: expected a number >= "),
                        (["--top-p", "2"], "--top-p 2.0: expected a number in [0, 1]"),
                        (["--top-k", "-1"], "--top-k -1: expected a non-negative integer")):
        assert cli.main(["benchmark", "--engine-dir", "/nonexistent", "--sampling", *flags]) == 2
        err = capsys.readouterr().err
        assert want in err and "nonexistent" not in err, err  # checked before the engine is loaded
    assert len(got) == 3


def test_sampling_with_the_default_options(reg, monkeypatch):
    """``sampling={}`` (``--sampling`` alone) samples with the defaults; it is not greedy decoding. A
    seed beyond CTranslate2's 32 bits still gives its row (its generator takes the seed modulo 2**32)."""
    pytest.importorskip("transformers")
    import encdec_core.runtime.generation as gen
    from encdec_core.benchmark import decoding_label, run_benchmark

    assert decoding_label(1, {}) == "sampling(temperature=1, top_k=50, top_p=1, seed=0)"
    assert decoding_label(1, None) == "greedy" and decoding_label(3, None) == "beam"
    seen = []
    real = gen.generate
    monkeypatch.setattr(gen, "generate", lambda model, ids, mask, gc, **kw: seen.append(gc) or real(model, ids, mask,
                                                                                                     gc, **kw))
    rows = run_benchmark("t5-tiny-test", batch_sizes=[2], input_output_lens=[(8, 6)], device="cpu",
                         dtype="float32", progress=False, repeats=1, warmup=0, reg=reg, sampling={})
    assert rows[0]["decoding"] == decoding_label(1, {})
    assert seen and all(g.do_sample and (g.temperature, g.top_k, g.top_p, g.seed) == (1.0, 50, 1.0, 0) for g in seen)
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return
    rows = run_benchmark("t5-tiny-test", batch_sizes=[2], input_output_lens=[(8, 6)], device="cpu", compare_hf=True,
                         compare_ct2=True, dtype="float32", progress=False, repeats=1, warmup=0, reg=reg,
                         sampling={"seed": 2 ** 40})
    ct2 = [r for r in rows if r["system"] == "ctranslate2"]
    assert len(ct2) == 1 and ct2[0]["e2e_ms"] and not ct2[0]["note"], ct2


def test_cli_refusals_before_measuring(monkeypatch, capsys, tmp_path):
    """Two outputs naming one file (the JSON replaced the CSV), a tensor- or pipeline-parallel size
    below 1 (it ran unsplit) and a bad beam width (its message said "batch sizes") are refused before
    anything is measured."""
    from encdec_core import benchmark, cli

    monkeypatch.setattr(benchmark, "run_benchmark", lambda *a, **k: pytest.fail("measured before the check"))
    f = str(tmp_path / "out.x")
    for argv, want in ((["--csv", f, "--json", f], f"--csv and --json name the same file {f}"),
                       (["--tp-size", "0"], "--tp-size 0: expected a positive integer"),
                       (["--pp-size", "-1"], "--pp-size -1: expected a positive integer"),
                       (["--num-beams", "1;;2"], 'expected beam widths like "1;8;64"')):
        assert cli.main(["benchmark", "--preset", "t5-small", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert want in err and "Traceback" not in err, err


def test_a_compiling_runner_gets_an_untimed_first_call(reg, monkeypatch):
    """With a runner (cuda-graph, compiled) our first call compiles or captures: it is never timed, even
    with warmup 0 (it timed 18 s of compile on a CPU), as HF's static path gets its extra warm-up."""
    from types import SimpleNamespace

    import encdec_core.benchmark as bm

    real_init = bm._Ours.__init__

    def init(self, model, *a, **k):
        real_init(self, model, *a, **k)
        self.runner = SimpleNamespace(prefill_graphs=False, time_step=lambda *a: 0.5,
                                      encode=lambda ids, mask: (model.encode(ids, mask), mask))

    calls = []
    monkeypatch.setattr(bm._Ours, "__init__", init)
    monkeypatch.setattr(bm._Ours, "generate", lambda self, ids, mask, n, beams, sampling=None: calls.append(1)
                        or torch.zeros(ids.shape[0], n + 1, dtype=torch.long))
    bm.run_benchmark("t5-tiny-test", batch_sizes=[1], input_output_lens=[(8, 4)], device="cpu", dtype="float32",
                     progress=False, repeats=1, warmup=0, reg=reg)
    assert len(calls) == 2  # one untimed, one timed
