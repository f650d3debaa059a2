"""The convert -> build -> run pipeline from the CLI and the Python API, and its error handling."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from encdec_core.cli import main

from _cli_helpers import make_t5_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def t5_dir(tmp_path):
    return make_t5_dir(tmp_path / "hf-t5")


def _pipeline(tmp_path, src, *convert_args, build_args=()):
    ck, eng = tmp_path / "ckpt", tmp_path / "engine"
    assert main(["convert", "--model-dir", str(src), "--output-dir", str(ck), "--quiet", *convert_args]) == 0
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(eng), "--max-batch-size", "4",
                 "--max-input-len", "32", "--max-output-len", "16", "--max-beam-width", "4", *build_args]) == 0
    return ck, eng


def test_list_families_json(builtin_registry, capsys):
    assert main(["list-families", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    t5 = next(r for r in rows if r["name"] == "t5")
    assert "T5ForConditionalGeneration" in t5["architectures"]
    assert "flan-t5" in t5["aliases"]
    assert t5["origin"]["module"]


def test_convert_build_run_matches_hf(builtin_registry, tmp_path, t5_dir, capsys):
    ck, eng = _pipeline(tmp_path, t5_dir)
    meta = json.loads((ck / "config.json").read_text())
    assert meta["format"] == "encdec-checkpoint" and meta["family"] == "t5"
    assert (ck / "rank0.safetensors").is_file() and (ck / "tokenizer_config.json").is_file()
    info = json.loads((eng / "engine.json").read_text())
    assert info["limits"] == {"max_batch_size": 4, "max_input_len": 32, "max_output_len": 16, "max_beam_width": 4}
    out_json = tmp_path / "out.json"
    rc = main(["run", "--engine-dir", str(eng), "--input-text", "hello world", "a much longer input here",
               "--max-output-len", "8", "--num-beams", "2", "--compare-hf", "--hf-model-dir", str(t5_dir),
               "--device", "cpu", "--output-json", str(out_json)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "token ids match HF fp32: yes" in printed
    res = json.loads(out_json.read_text())["results"]
    assert [r["match"] for r in res] == [True, True]
    assert len(res[1]["ids"][0]) > 0
    # --hf-model-dir must be the engine's model: another family, or no model, is named (the BART folder
    # loaded and "matched: NO"; an empty folder was an internal error; a file retried the hub)
    spell_bart = Path(__file__).resolve().parents[1] / "models" / "spell-bart"
    (tmp_path / "afile").write_text("x")
    for other, words in ((spell_bart, "a 'bart' model, but the engine"), (tmp_path / "afile", "not a model")):
        rc = main(["run", "--engine-dir", str(eng), "--input-text", "hello", "--max-output-len", "4",
                   "--compare-hf", "--hf-model-dir", str(other), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and f"--hf-model-dir {other}: {words}" in err, err


def test_compare_hf_with_a_family_given_at_convert(builtin_registry, tmp_path, t5_dir, capsys):
    """A T5 folder whose architectures names BART converts with --family t5, and --compare-hf loads it as
    transformers does (by model_type): it said "a 'bart' model, but the engine is 't5'"."""
    import shutil

    src = tmp_path / "t5-mislabelled"
    shutil.copytree(t5_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["BartForConditionalGeneration"]
    (src / "config.json").write_text(json.dumps(cfg))
    _, eng = _pipeline(tmp_path, src, "--family", "t5")
    rc = main(["run", "--engine-dir", str(eng), "--input-text", "hello world", "--max-output-len", "6",
               "--compare-hf", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0 and "token ids match HF fp32: yes" in out.out, out.err


def test_python_api(builtin_registry, tmp_path, t5_dir):
    from encdec_core import Engine, registry

    assert registry.get("t5").name == "t5" and registry.get("T5ForConditionalGeneration").name == "t5"
    _, eng = _pipeline(tmp_path, t5_dir)
    engine = Engine.load(eng)
    texts = engine.generate(["abc", "defgh"], max_new_tokens=5, num_beams=2, num_return_sequences=2)
    assert len(texts) == 2 and all(len(t) == 2 for t in texts)
    assert all(isinstance(s, str) for t in texts for s in t)


def test_static_runner_for_a_cpu_engine(builtin_registry, tmp_path, t5_dir):
    """CudaGraphRunner.for_engine on a CPU engine: sized by the build limits, no graphs; the static
    step (uncompiled here: the compiled one is tests/test_cuda_runner.py's) gives the eager ids."""
    from encdec_core import Engine
    from encdec_core.runtime.cuda import CudaGraphRunner

    _, eng = _pipeline(tmp_path, t5_dir)
    engine = Engine.load(eng, device="cpu")
    runner = CudaGraphRunner.for_engine(engine, compile=False)
    assert not runner.use_graphs and runner.dec.max_batch == 4 * 4 and runner.dec.max_len == 17
    ids = engine.tokenizer().encode(["hello world", "a much longer input here"])
    ref = engine.generate_ids(ids, max_new_tokens=8, num_beams=2)
    got = engine.generate_ids(ids, max_new_tokens=8, num_beams=2, runner=runner)
    assert torch.equal(got.sequences, ref.sequences)


def test_build_casts_dtype(builtin_registry, tmp_path, t5_dir):
    from encdec_core import Engine

    _, eng = _pipeline(tmp_path, t5_dir, build_args=("--dtype", "bfloat16"))
    engine = Engine.load(eng)
    assert engine.model.decoder.tokens.weight.dtype == torch.bfloat16


def test_tp_sharded_checkpoint(builtin_registry, tmp_path, t5_dir):
    ck = tmp_path / "ck-tp2"
    assert main(["convert", "--model-dir", str(t5_dir), "--output-dir", str(ck), "--tp-size", "2",
                 "--pp-size", "2", "--quiet"]) == 0
    assert sorted(p.name for p in ck.glob("rank*.safetensors")) == [f"rank{r}.safetensors" for r in range(4)]
    meta = json.loads((ck / "config.json").read_text())
    assert meta["mapping"] == {"tp_size": 2, "pp_size": 2, "world_size": 4}


# ---------------------------------------------------------------------------- bad input
def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("encdec: error:"), err
    return err[0]


def _no_partial(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp")]


def test_error_missing_config(builtin_registry, tmp_path, capsys):
    d = tmp_path / "empty"
    d.mkdir()
    assert main(["convert", "--model-dir", str(d), "--output-dir", str(tmp_path / "o")]) == 2
    assert "config.json" in _err(capsys) or "no config.json" in capsys.readouterr().err
    _no_partial(tmp_path, "o")


def test_error_corrupt_config(builtin_registry, tmp_path, t5_dir, capsys):
    (t5_dir / "config.json").write_text("{ not json")
    assert main(["convert", "--model-dir", str(t5_dir), "--output-dir", str(tmp_path / "o")]) == 2
    msg = _err(capsys)
    assert "config.json" in msg and "JSON" in msg
    _no_partial(tmp_path, "o")


def test_error_corrupt_safetensors(builtin_registry, tmp_path, t5_dir, capsys):
    (t5_dir / "model.safetensors").write_bytes(b"garbage" * 10)
    assert main(["convert", "--model-dir", str(t5_dir), "--output-dir", str(tmp_path / "o")]) == 2
    assert "model.safetensors" in _err(capsys)
    _no_partial(tmp_path, "o")


@pytest.mark.parametrize("wmap", [["model.safetensors"], {}, {"shared.weight": 3}])
def test_error_bad_sharded_index(builtin_registry, tmp_path, t5_dir, capsys, wmap):
    (t5_dir / "model.safetensors").rename(t5_dir / "model-00001-of-00001.safetensors")
    (t5_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    assert main(["convert", "--model-dir", str(t5_dir), "--output-dir", str(tmp_path / "o")]) == 2
    msg = _err(capsys)
    assert "model.safetensors.index.json" in msg and "'weight_map'" in msg and "expected a non-empty object" in msg
    _no_partial(tmp_path, "o")


def _rewrite_weights(d: Path, fn):
    from safetensors.torch import load_file, save_file

    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_error_missing_tensor(builtin_registry, tmp_path, t5_dir, capsys):
    name = "decoder.block.1.layer.2.DenseReluDense.wo.weight"
    _rewrite_weights(t5_dir, lambda t: t.pop(name))
    assert main(["convert", "--model-dir", str(t5_dir), "--output-dir", str(tmp_path / "o")]) == 2
    msg = _err(capsys)
    assert "decoder.layers.1.ffn.wo.weight" in msg and "missing" in msg
    _no_partial(tmp_path, "o")


def test_error_wrong_shape(builtin_registry, tmp_path, t5_dir, capsys):
    name = "encoder.block.0.layer.1.DenseReluDense.wi.weight"
    _rewrite_weights(t5_dir, lambda t: t.__setitem__(name, torch.zeros(7, 32)))
    assert main(["convert", "--model-dir", str(t5_dir), "--output-dir", str(tmp_path / "o")]) == 2
    msg = _err(capsys)
    assert "encoder.layers.0.ffn.wi.weight" in msg and "(7, 32)" in msg
    _no_partial(tmp_path, "o")


def test_error_unknown_family(builtin_registry, tmp_path, t5_dir, capsys):
    assert main(["convert", "--model-dir", str(t5_dir), "--output-dir", str(tmp_path / "o"),
                 "--family", "t6"]) == 2
    msg = _err(capsys)
    assert "unknown family 't6'" in msg and "t5" in msg
    _no_partial(tmp_path, "o")


def test_error_unknown_architecture(builtin_registry, tmp_path, t5_dir, capsys):
    cfg = json.loads((t5_dir / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (t5_dir / "config.json").write_text(json.dumps(cfg))
    assert main(["convert", "--model-dir", str(t5_dir), "--output-dir", str(tmp_path / "o")]) == 2
    assert "GPT2LMHeadModel" in _err(capsys)


def test_error_tp_not_dividing_heads(builtin_registry, tmp_path, t5_dir, capsys):
    assert main(["convert", "--model-dir", str(t5_dir), "--output-dir", str(tmp_path / "o"),
                 "--tp-size", "3"]) == 2
    msg = _err(capsys)
    assert "--tp-size 3" in msg and "heads" in msg
    _no_partial(tmp_path, "o")


def test_error_unknown_dtype(builtin_registry, tmp_path, t5_dir, capsys):
    assert main(["convert", "--model-dir", str(t5_dir), "--output-dir", str(tmp_path / "o"),
                 "--dtype", "float8"]) == 2
    assert "'float8'" in _err(capsys)
    _no_partial(tmp_path, "o")


def test_error_input_too_long(builtin_registry, tmp_path, t5_dir, capsys):
    _, eng = _pipeline(tmp_path, t5_dir)
    rc = main(["run", "--engine-dir", str(eng), "--input-text", "x" * 40, "--device", "cpu"])
    assert rc == 2
    msg = _err(capsys)
    assert "input length 41 exceeds the engine's limit 32" in msg


def test_error_default_output_length_beyond_the_limit(builtin_registry, tmp_path, t5_dir, capsys):
    """The default 20 new tokens on an engine built for 16: the message says how to ask for fewer."""
    _, eng = _pipeline(tmp_path, t5_dir)
    capsys.readouterr()
    assert main(["run", "--engine-dir", str(eng), "--input-text", "abc", "--device", "cpu"]) == 2
    msg = _err(capsys)
    assert "output length 20 exceeds the engine's limit 16 (ask for at most 16 new tokens, or rebuild" in msg


@pytest.mark.parametrize("opts,want", [
    (["--num-beams", "0"], "--num-beams 0: expected a positive integer"),
    (["--sampling", "--top-p", "2"], "--top-p 2.0: expected a number in [0, 1]"),
    (["--max-output-len", "0"], "--max-output-len 0: expected a positive integer"),
    (["--sampling", "--temperature", "1e-308"], "--temperature 1e-308: expected a number >= 1e-05"),
    (["--num-beams", "2", "--max-output-len", "8", "--length-penalty", "400"],
     "--length-penalty 400.0: expected a number in [-20.18, 20.18] for beam search with max_length 9"),
])
def test_error_generation_options_name_the_flag(builtin_registry, tmp_path, t5_dir, capsys, opts, want):
    _, eng = _pipeline(tmp_path, t5_dir)
    capsys.readouterr()
    assert main(["run", "--engine-dir", str(eng), "--input-text", "abc", "--device", "cpu", *opts]) == 2
    msg = _err(capsys)
    assert want in msg and "field '" not in msg


def test_build_defaults_cover_the_models_generation_defaults(builtin_registry, tmp_path, t5_dir, capsys):
    """A model that decodes with 6 beams and 300 tokens by default (fairseq NMT: 5 beams) gets an engine
    that serves its defaults when the build leaves the limits out; explicit limits still win."""
    (t5_dir / "generation_config.json").write_text(json.dumps({"num_beams": 6, "max_length": 300,
                                                               "decoder_start_token_id": 0}))
    ck = tmp_path / "ck"
    assert main(["convert", "--model-dir", str(t5_dir), "--output-dir", str(ck), "--quiet"]) == 0
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(tmp_path / "e1")]) == 0
    lim = json.loads((tmp_path / "e1" / "engine.json").read_text())["limits"]
    assert (lim["max_beam_width"], lim["max_output_len"]) == (6, 300)
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(tmp_path / "e2"),
                 "--max-beam-width", "2", "--max-output-len", "16"]) == 0
    lim = json.loads((tmp_path / "e2" / "engine.json").read_text())["limits"]
    assert (lim["max_beam_width"], lim["max_output_len"]) == (2, 16)
    (t5_dir / "generation_config.json").unlink()
    assert main(["convert", "--model-dir", str(t5_dir), "--output-dir", str(tmp_path / "ck0"), "--quiet"]) == 0
    assert main(["build", "--checkpoint-dir", str(tmp_path / "ck0"), "--output-dir", str(tmp_path / "e3")]) == 0
    lim = json.loads((tmp_path / "e3" / "engine.json").read_text())["limits"]
    assert (lim["max_beam_width"], lim["max_output_len"]) == (4, 200)


def test_error_tampered_shard(builtin_registry, tmp_path, t5_dir, capsys):
    ck = tmp_path / "ckpt"
    assert main(["convert", "--model-dir", str(t5_dir), "--output-dir", str(ck), "--quiet"]) == 0
    capsys.readouterr()
    other = make_t5_dir(tmp_path / "other", seed=1)
    ck2 = tmp_path / "ckpt2"
    assert main(["convert", "--model-dir", str(other), "--output-dir", str(ck2), "--quiet"]) == 0
    capsys.readouterr()
    (ck / "rank0.safetensors").write_bytes((ck2 / "rank0.safetensors").read_bytes())
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(tmp_path / "e")]) == 2
    assert "checksum" in _err(capsys)
    _no_partial(tmp_path, "e")


def test_error_checkpoint_missing_tensor_at_load(builtin_registry, tmp_path, t5_dir, capsys):
    from safetensors.torch import load_file, save_file

    _, eng = _pipeline(tmp_path, t5_dir)
    t = load_file(str(eng / "rank0.safetensors"))
    t.pop("decoder.final_norm.weight")
    (eng / "rank0.safetensors").unlink()
    save_file(t, str(eng / "rank0.safetensors"))
    assert main(["run", "--engine-dir", str(eng), "--input-text", "abc", "--device", "cpu"]) == 2
    assert "decoder.final_norm.weight" in _err(capsys)


def test_console_script_entry_points(tmp_path):
    """The installed `encdec` finds the built-in families through entry points (autoload on)."""
    env = {k: v for k, v in os.environ.items() if k != "ENCDEC_DISABLE_PLUGIN_AUTOLOAD"}
    r = subprocess.run([sys.executable, "-m", "encdec_core.cli", "list-families", "--json"], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    names = {row["name"] for row in json.loads(r.stdout)}
    assert "t5" in names


def test_benchmark_command_on_engine(builtin_registry, tmp_path, t5_dir, capsys):
    _, eng = _pipeline(tmp_path, t5_dir)
    capsys.readouterr()
    js = tmp_path / "bench.json"
    rc = main(["benchmark", "--engine-dir", str(eng), "--batch-size", "1;2", "--input-output-len", "8,3",
               "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", str(js), "--quiet"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| encdec |" in table
    rows = json.loads(js.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    ours = [r for r in rows if r["system"] == "encdec"]
    assert sorted(r["batch_size"] for r in ours) == [1, 2]
    assert all(r["tokens_per_s"] > 0 and r["output_len"] == 3 for r in ours)


def test_benchmark_command_bad_option(builtin_registry, capsys):
    assert main(["benchmark", "--preset", "t5-small", "--batch-size", "1;x"]) == 2
    assert "--batch-size" in _err(capsys)
    assert main(["benchmark", "--batch-size", "1"]) == 2
    assert "--engine-dir" in _err(capsys)


def test_run_without_engine_uses_bundled_model(builtin_registry, tmp_path, monkeypatch, capsys):
    """No model arguments: the bundled default is converted and built into the cache once, then answers."""
    from encdec_core.assets import spell_task

    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "cache"))
    out_json = tmp_path / "o.json"
    assert main(["run", "--input-text", "spell: 4721", "digits: nine hundred five", "--device", "cpu",
                 "--output-json", str(out_json)]) == 0
    res = json.loads(out_json.read_text())["results"]
    assert [r["output"][0] for r in res] == ["four thousand seven hundred twenty-one", "905"]
    assert all(spell_task.check(r["input"], r["output"][0]) for r in res)
    built = list((tmp_path / "cache").glob("default-*/engine/engine.json"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert main(["run", "--input-text", "spell: 12", "--device", "cpu"]) == 0  # reuses the cache
    assert built[0].stat().st_mtime_ns == stamp
    assert "twelve" in capsys.readouterr().out


def test_run_cuda_graph_needs_cuda(builtin_registry, tmp_path, t5_dir, capsys):
    _, eng = _pipeline(tmp_path, t5_dir)
    capsys.readouterr()
    assert main(["run", "--engine-dir", str(eng), "--input-text", "abc", "--device", "cpu", "--cuda-graph"]) == 2
    assert "--cuda-graph needs a CUDA device" in _err(capsys)


def test_run_compiled_runner_on_cpu(builtin_registry, tmp_path, t5_dir, capsys):
    """encdec run --runner compiled on a CPU: the inductor-compiled static step (no graphs) gives the
    eager runner's outputs (greedy: each batch bucket is a compilation, ~25 s on CI's cold cache;
    beam search in the compiled step is test_cuda_runner's test_cpu_compiled_step_matches_eager);
    options that disagree or need CUDA are refused in one line."""
    from encdec_core.runtime.cuda import runner as runner_mod

    _, eng = _pipeline(tmp_path, t5_dir)
    capsys.readouterr()
    texts = ["hello world", "a much longer input here", "abc"]
    outs = {}
    built = []
    real_init = runner_mod.CudaGraphRunner.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        built.append(self)

    for runner in ("eager", "compiled"):
        j = tmp_path / f"{runner}.json"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(runner_mod.CudaGraphRunner, "__init__", spy)
            assert main(["run", "--engine-dir", str(eng), "--input-text", *texts, "--device", "cpu",
                         "--runner", runner, "--max-new-tokens", "8", "--output-json", str(j)]) == 0
        outs[runner] = json.loads(j.read_text())
    assert outs["compiled"] == outs["eager"]
    # the compiled run went through the compiled step (not its eager fallback after a failed compile)
    assert isinstance(built[-1]._step, runner_mod._CpuCompiledStep) and built[-1]._step.state == "ok"
    capsys.readouterr()
    assert main(["run", "--engine-dir", str(eng), "--input-text", "abc", "--device", "cpu", "--cuda-graph",
                 "--runner", "compiled"]) == 2
    assert "--cuda-graph and --runner compiled disagree" in _err(capsys)
    assert main(["run", "--engine-dir", str(eng), "--input-text", "abc", "--device", "cpu",
                 "--runner", "cuda-graph"]) == 2
    assert "--runner compiled runs the compiled static step" in _err(capsys)


def test_run_more_inputs_than_the_batch_limit(builtin_registry, tmp_path, t5_dir, capsys):
    """An input file longer than the engine's max batch size runs in batches (requests sorted by
    length), every output next to its own input: each matches HF fp32 on that input, and the Python
    API gives the rows of one big batch in the input order."""
    from encdec_core.engine import Engine

    ck, eng = _pipeline(tmp_path, t5_dir, build_args=("--max-batch-size", "3"))
    lines = ["hello", "a much longer input here", "x y", "another input", "one",
             "the longest input of them", "short", "mid sized line"]
    f = tmp_path / "in.txt"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out_json = tmp_path / "out.json"
    rc = main(["run", "--engine-dir", str(eng), "--input-file", str(f), "--max-output-len", "8", "--num-beams", "2",
               "--num-return-sequences", "2", "--compare-hf", "--hf-model-dir", str(t5_dir), "--device", "cpu",
               "--output-json", str(out_json)])
    cap = capsys.readouterr()
    assert rc == 0, cap.out + cap.err
    res = json.loads(out_json.read_text())["results"]
    assert [r["input"] for r in res] == lines and all(r["match"] for r in res) and len(res[0]["output"]) == 2

    small = Engine.load(eng, device="cpu")
    big = Engine.load(_pipeline(tmp_path / "big", t5_dir, build_args=("--max-batch-size", "8"))[1], device="cpu")
    ids = small.tokenizer().encode(lines)
    for kw in (dict(max_new_tokens=8), dict(max_new_tokens=8, num_beams=2, num_return_sequences=2)):
        a, b = small.generate_ids(ids, **kw), big.generate_ids(ids, **kw)
        assert a.all_tokens() == b.all_tokens(), kw
        if b.sequences_scores is not None:
            torch.testing.assert_close(a.sequences_scores, b.sequences_scores, rtol=1e-5, atol=1e-5)


def test_run_output_log_probs(builtin_registry, tmp_path, t5_dir, capsys):
    """--output-log-probs prints each output's score and token log-probs and writes scores, token_logprobs
    and output_ids to --output-json: the same numbers as Engine.generate(return_scores=True), also when the inputs
    run in several batches (max batch size 3); the outputs are those of a run without scores."""
    from encdec_core.engine import Engine, Hypothesis

    ck, eng = _pipeline(tmp_path, t5_dir, build_args=("--max-batch-size", "3"))
    lines = ["hello", "a much longer input here", "x y", "another input", "one"]
    f = tmp_path / "in.txt"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    engine = Engine.load(eng, device="cpu")
    for extra in ((), ("--num-beams", "2", "--num-return-sequences", "2")):
        base = ["run", "--engine-dir", str(eng), "--input-file", str(f), "--max-output-len", "8", "--device", "cpu",
                *extra]
        plain, scored = tmp_path / "plain.json", tmp_path / "scored.json"
        assert main([*base, "--output-json", str(plain)]) == 0
        assert main([*base, "--output-log-probs", "--output-json", str(scored)]) == 0
        printed = capsys.readouterr().out
        assert printed.count("score ") == len(lines) * (2 if extra else 1)
        p_res = json.loads(plain.read_text())["results"]
        s_res = json.loads(scored.read_text())["results"]
        shown = [ln.split(":", 1)[1].split() for ln in printed.splitlines() if "token log-probs:" in ln]
        assert shown == [[f"{v:.4f}" for v in lps] for r in s_res for lps in r["token_logprobs"]]
        assert [r["output"] for r in s_res] == [r["output"] for r in p_res]
        assert "scores" not in p_res[0]
        kw = dict(max_new_tokens=8, num_beams=2, num_return_sequences=2) if extra else dict(max_new_tokens=8)
        hyps = engine.generate(lines, return_scores=True, **kw)
        for row, hs in zip(s_res, hyps):
            assert all(isinstance(h, Hypothesis) for h in hs)
            assert row["output"] == [h.text for h in hs] and row["output_ids"] == [h.tokens for h in hs]
            assert row["scores"] == pytest.approx([h.score for h in hs], abs=1e-5)
            for lps, h in zip(row["token_logprobs"], hs):
                assert lps == pytest.approx(h.token_logprobs, abs=1e-5)
                assert len(lps) in (len(h.tokens), len(h.tokens) + 1) and all(x <= 0 for x in lps)
                if not extra:
                    assert h.score == pytest.approx(sum(lps), abs=1e-5)
        if extra:  # beams of a request in score order
            assert all(r["scores"][0] >= r["scores"][1] for r in s_res)
    with pytest.raises(Exception, match="return_scores = 'yes'"):
        engine.generate(lines, return_scores="yes")


def test_run_output_file(builtin_registry, tmp_path, t5_dir, capsys):
    """--output-file: the outputs one per line in input order (n per input with num_return_sequences),
    the same as --output-json's, with more inputs than the batch limit, with --streaming, and with
    --compare-hf (only its verdict printed); a directory is refused before any work."""
    ck, eng = _pipeline(tmp_path, t5_dir, build_args=("--max-batch-size", "2"))
    lines = ["hello", "a much longer input here", "x y", "another input", "one"]
    f = tmp_path / "in.txt"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    base = ["run", "--engine-dir", str(eng), "--input-file", str(f), "--max-output-len", "6", "--device", "cpu"]
    js = tmp_path / "o.json"
    for extra in ((), ("--num-beams", "2", "--num-return-sequences", "2"), ("--streaming",)):
        o = tmp_path / "out.txt"
        assert main([*base, *extra, "--output-file", str(o), "--output-json", str(js)]) == 0
        printed = capsys.readouterr().out
        want = [x for r in json.loads(js.read_text())["results"] for x in r["output"]]
        assert o.read_text(encoding="utf-8").split("\n") == [" ".join(w.splitlines()) for w in want] + [""]
        assert len(want) == len(lines) * (2 if extra and extra[0] == "--num-beams" else 1)
        assert "Output" not in printed and f"for {len(lines)} input line(s)" in printed
    assert main([*base, "--output-file", str(tmp_path / "c.txt"), "--compare-hf", "--hf-model-dir", str(t5_dir)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("token ids match HF fp32: yes") == len(lines) and "Output" not in printed
    assert main([*base, "--output-file", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--output-file {tmp_path}: is a directory" in err
    # blank input lines keep their place (an empty output line each); - is standard input / output
    f.write_text("hello\n\n  \none\n", encoding="utf-8")
    o = tmp_path / "blank.txt"
    assert main([*base, "--output-file", str(o)]) == 0
    got = o.read_text(encoding="utf-8").split("\n")
    capsys.readouterr()
    assert main(["run", "--engine-dir", str(eng), "--input-text", "hello", "one", "--max-output-len", "6",
                 "--device", "cpu", "--output-json", str(js)]) == 0
    want = [r["output"][0] for r in json.loads(js.read_text())["results"]]
    assert got == [want[0], "", "", want[1], ""]
    import io
    import sys

    class Stdin:
        buffer = io.BytesIO("hello\n\none\n".encode())

    capsys.readouterr()
    real = sys.stdin
    sys.stdin = Stdin()
    try:
        assert main(["run", "--engine-dir", str(eng), "--input-file", "-", "--output-file", "-",
                     "--max-output-len", "6", "--device", "cpu"]) == 0
    finally:
        sys.stdin = real
    cap = capsys.readouterr()
    assert cap.out == f"{want[0]}\n\n{want[1]}\n" and "wrote 3 output line(s)" in cap.err


def test_run_suppress_and_bad_words(builtin_registry, tmp_path, t5_dir, capsys):
    """--suppress-tokens / --begin-suppress-tokens / --bad-words reach generation (the words tokenized
    as target text without the closing EOS): the banned tokens and phrases are gone from outputs that
    had them, and --compare-hf gives HF the same options (ids match)."""
    from encdec_core.engine import Engine

    ck, eng = _pipeline(tmp_path, t5_dir)
    engine = Engine.load(eng, device="cpu")
    tok = engine.tokenizer()
    texts = ["hello", "a much longer input here"]
    plain = engine.generate_ids(tok.encode(texts), max_new_tokens=8).all_tokens()
    top = max(set(t for r in plain for t in r), key=lambda t: sum(r.count(t) for r in plain))
    word = tok.decode(plain[1][2:4])
    assert engine.word_ids(tok, [word]) == [plain[1][2:4]]
    base = ["run", "--engine-dir", str(eng), "--input-text", *texts, "--max-output-len", "8", "--device", "cpu",
            "--compare-hf", "--hf-model-dir", str(t5_dir)]
    for extra, check in ((["--suppress-tokens", str(top)], lambda r: top not in r),
                         (["--begin-suppress-tokens", str(plain[0][0])], lambda r: r[:1] != plain[0][:1]),
                         (["--bad-words", word], lambda r: all(r[j:j + 2] != plain[1][2:4] for j in range(len(r))))):
        out_json = tmp_path / "o.json"
        assert main([*base, *extra, "--output-json", str(out_json)]) == 0, extra
        rows = json.loads(out_json.read_text())["results"]
        assert all(r["match"] for r in rows), extra
        ids = [r["ids"][0] for r in rows]
        assert all(check(r) for r in ids) and ids != plain, extra
    assert main([*base[:-3], "--suppress-tokens", "100000"]) == 2
    assert "--suppress-tokens [100000]" in capsys.readouterr().err


def test_run_truncates_long_inputs(builtin_registry, tmp_path, t5_dir, tmp_path_factory, capsys):
    """--max-input-length N / --truncate cut long inputs the way HF's tokenizer truncation does (the
    closing special tokens kept: T5's </s>, BART's <s> ... </s>); without them a long input is refused;
    N beyond the engine's limit is refused; --compare-hf runs HF on the same cut ids."""
    from transformers import AutoTokenizer

    from _bart_helpers import tiny
    from encdec_core.engine import Engine

    ck, eng = _pipeline(tmp_path, t5_dir)  # --max-input-len 32
    long_text = "a long input " * 6
    base = ["run", "--engine-dir", str(eng), "--input-text", "short", long_text, "--max-output-len", "4",
            "--device", "cpu"]
    assert main(base) == 2
    assert "input length" in capsys.readouterr().err
    out_json = tmp_path / "o.json"
    assert main([*base, "--truncate", "--compare-hf", "--hf-model-dir", str(t5_dir),
                 "--output-json", str(out_json)]) == 0
    cap = capsys.readouterr()
    assert "1 input(s) cut to 32 tokens (first: input 1)" in cap.err
    rows = json.loads(out_json.read_text())["results"]
    hf_tok = AutoTokenizer.from_pretrained(str(t5_dir))
    assert rows[1]["input_ids"] == hf_tok(long_text, truncation=True, max_length=32)["input_ids"]
    assert rows[0]["input_ids"] == hf_tok("short")["input_ids"] and all(r["match"] for r in rows)
    assert main([*base, "--max-input-length", "10", "--output-json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["results"][1]["input_ids"] == hf_tok(
        long_text, truncation=True, max_length=10)["input_ids"]
    assert main([*base, "--max-input-length", "33"]) == 2
    assert "--max-input-length 33 exceeds the engine's limit 32" in capsys.readouterr().err

    bart = tiny("bart", tmp_path_factory)
    b_eng = _pipeline(tmp_path / "bart", bart)[1]
    engine = Engine.load(b_eng, device="cpu")
    tok = engine.tokenizer()
    text = "The house is wonderful. The cat sleeps on the sofa. I like green apples."
    cut, which = engine.truncate(tok, tok.encode([text, "The cat."]), 9)
    hf_b = AutoTokenizer.from_pretrained(str(bart))
    assert which == [0] and cut[0] == hf_b(text, truncation=True, max_length=9)["input_ids"]
    assert cut[1] == hf_b("The cat.")["input_ids"] and cut[0][0] == 0 and cut[0][-1] == 2


def test_tp_allreduce_option(builtin_registry, tmp_path, t5_dir, capsys, monkeypatch):
    """--tp-allreduce: the CUDA-graph runner's tensor-parallel all-reduce; refused where no such
    runner runs (run without --cuda-graph, benchmark on the eager runner), and a bad
    ENCDEC_TP_ALLREDUCE is named."""
    _, eng = _pipeline(tmp_path, t5_dir)
    capsys.readouterr()
    assert main(["run", "--engine-dir", str(eng), "--input-text", "x", "--device", "cpu",
                 "--tp-allreduce", "nccl"]) != 0
    assert "--cuda-graph" in _err(capsys)
    assert main(["benchmark", "--engine-dir", str(eng), "--batch-size", "1", "--input-output-len", "8,2",
                 "--repeats", "1", "--warmup", "0", "--device", "cpu", "--runner", "eager", "--tp-allreduce",
                 "nccl", "--quiet"]) != 0
    assert "eager runner" in _err(capsys)
    rc = main(["benchmark", "--engine-dir", str(eng), "--batch-size", "1", "--input-output-len", "8,2",
               "--repeats", "1", "--warmup", "0", "--device", "cpu", "--runner", "compiled",
               "--tp_allreduce", "symm", "--quiet"])  # tp 1: accepted, nothing to set up
    assert rc == 0 and "| encdec |" in capsys.readouterr().out
    from encdec_core.errors import ConfigError
    from encdec_core.runtime.cuda.runner import tp_allreduce_default

    monkeypatch.setenv("ENCDEC_TP_ALLREDUCE", "NCCL")
    assert tp_allreduce_default() == "nccl"
    monkeypatch.setenv("ENCDEC_TP_ALLREDUCE", "mpi")
    with pytest.raises(ConfigError, match="ENCDEC_TP_ALLREDUCE='mpi'"):
        tp_allreduce_default()


# ---------------------------------------------------------------------------- bad input (audit)
def _edit_json(path: Path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _convert(src, out, *extra):
    return main(["convert", "--model-dir", str(src), "--output-dir", str(out), "--quiet", *extra])


def test_error_source_config_field_of_a_wrong_type(builtin_registry, tmp_path, t5_dir, capsys):
    """A source field a family rule cannot read, or a value of the wrong type, is named with the file
    (not an AttributeError, not a checkpoint that fails at run time)."""
    cfg = t5_dir / "config.json"
    good = cfg.read_text()
    _edit_json(cfg, lambda d: d.__setitem__("feed_forward_proj", 5))
    assert _convert(t5_dir, tmp_path / "o") == 2
    msg = _err(capsys)
    assert "config.json: cannot derive 'activation'" in msg and "field 'feed_forward_proj' = 5" in msg
    cfg.write_text(good)
    _edit_json(cfg, lambda d: d.__setitem__("layer_norm_epsilon", "x"))
    assert _convert(t5_dir, tmp_path / "o") == 2
    msg = _err(capsys)
    assert "config.json" in msg and "'norm_eps' = 'x'" in msg and "a positive number" in msg
    _no_partial(tmp_path, "o")


def test_error_integer_weights(builtin_registry, tmp_path, t5_dir, capsys):
    """An integer tensor where a weight belongs is refused (convert: the source; run: the engine's
    shard), not cast silently."""
    _, eng = _pipeline(tmp_path, t5_dir)
    capsys.readouterr()
    from safetensors.torch import load_file, save_file

    t = load_file(str(eng / "rank0.safetensors"))
    t["decoder.final_norm.weight"] = t["decoder.final_norm.weight"].long()
    (eng / "rank0.safetensors").unlink()
    save_file(t, str(eng / "rank0.safetensors"))
    assert main(["run", "--engine-dir", str(eng), "--input-text", "abc", "--device", "cpu",
                 "--max-output-len", "4"]) == 2
    msg = _err(capsys)
    assert "rank0.safetensors" in msg and "decoder.final_norm.weight (int64)" in msg and "float32" in msg
    name = "encoder.final_layer_norm.weight"
    _rewrite_weights(t5_dir, lambda t: t.__setitem__(name, t[name].long()))
    assert _convert(t5_dir, tmp_path / "o") == 2
    msg = _err(capsys)
    assert str(t5_dir) in msg and f"{name} (int64)" in msg  # named as in the source (dafb690)
    _no_partial(tmp_path, "o")


@pytest.mark.parametrize("edit,words", [
    (lambda d: d.__setitem__("mapping", {"pp_size": 1}), "field 'mapping.tp_size' = None: expected a positive integer"),
    (lambda d: d["mapping"].__setitem__("world_size", "one"), "field 'mapping.world_size' = 'one'"),
    (lambda d: d["mapping"].__setitem__("world_size", 2), "field 'mapping.world_size' = 2: expected tp_size x pp_size"),
    (lambda d: d.__setitem__("model", [1]), "field 'model' = [1]: expected an object"),
    (lambda d: d["model"].__setitem__("d_model", -1), "field 'd_model' = -1: expected a positive integer"),
    (lambda d: d["model"].__setitem__("pad_token_id", 10**6), "field 'pad_token_id' = 1000000: expected a token id"),
    (lambda d: d.__setitem__("generation_config", [1]), "field 'generation_config' = [1]: expected an object"),
])
def test_error_bad_checkpoint_config(builtin_registry, tmp_path, t5_dir, capsys, edit, words):
    ck = tmp_path / "ckpt"
    assert _convert(t5_dir, ck) == 0
    capsys.readouterr()
    _edit_json(ck / "config.json", edit)
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(tmp_path / "e")]) == 2
    msg = _err(capsys)
    assert str(ck / "config.json") in msg and words in msg
    _no_partial(tmp_path, "e")


def test_build_refuses_a_truncated_shard(builtin_registry, tmp_path, t5_dir, capsys):
    """Without a checksum to compare, build still reads every shard's header: a truncated shard is
    refused at build, not copied into an engine that fails at run."""
    ck = tmp_path / "ckpt"
    assert _convert(t5_dir, ck) == 0
    capsys.readouterr()
    _edit_json(ck / "config.json", lambda d: (d.pop("checksum"), d.pop("shard_checksums")))
    f = ck / "rank0.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(tmp_path / "e")]) == 2
    msg = _err(capsys)
    assert str(f) in msg and "not a valid safetensors file" in msg
    _no_partial(tmp_path, "e")


def test_build_refuses_tensors_that_do_not_fit_the_config(builtin_registry, tmp_path, t5_dir, capsys):
    """A config.json edited after convert (its checksum covers the shards only) or a shard of integer
    weights is refused at build, from the shard headers, not written into an engine every run refuses."""
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ckpt"
    assert _convert(t5_dir, ck) == 0
    capsys.readouterr()
    good = (ck / "config.json").read_text()
    _edit_json(ck / "config.json", lambda d: d["model"].__setitem__("encoder_ffn_dim", 64))
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(tmp_path / "e")]) == 2
    msg = _err(capsys)
    assert str(ck / "rank0.safetensors") in msg and str(ck / "config.json") in msg
    assert "encoder.layers.0.ffn.wi.weight has (48, 32), expected (64, 32)" in msg
    _no_partial(tmp_path, "e")
    (ck / "config.json").write_text(good)
    _edit_json(ck / "config.json", lambda d: (d.pop("checksum"), d.pop("shard_checksums")))
    f = ck / "rank0.safetensors"
    t = load_file(str(f))
    t["shared.weight"] = t["shared.weight"].to(torch.int32)
    save_file(t, str(f))
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(tmp_path / "e")]) == 2
    msg = _err(capsys)
    assert str(f) in msg and "non-floating dtype: shared.weight (I32)" in msg
    _no_partial(tmp_path, "e")


def test_build_learned_positions_message(builtin_registry, tmp_path, t5_dir, capsys):
    ck = tmp_path / "ckpt"
    assert _convert(t5_dir, ck) == 0
    capsys.readouterr()
    _edit_json(ck / "config.json", lambda d: d["model"].update(position_type="learned", max_position_embeddings=16))
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(tmp_path / "e"),
                 "--max-input-len", "32", "--max-output-len", "8"]) == 2
    msg = _err(capsys)
    assert "--max-input-len 32 exceeds the model's learned positions: expected at most 16" in msg
    assert str(ck / "config.json") in msg
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(tmp_path / "e"),
                 "--max-input-len", "8", "--max-output-len", "16"]) == 2
    assert "--max-output-len 16 exceeds the model's learned positions: expected at most 15" in _err(capsys)


def test_build_defaults_stop_at_learned_positions(builtin_registry, tmp_path, capsys):
    """The default lengths (512 in, 200 out) failed every default build of a BART with fewer
    positions (the bundled spell-bart has 64); explicit ones beyond are still refused (above)."""
    spell_bart = Path(__file__).resolve().parents[1] / "models" / "spell-bart"
    assert main(["convert", "--model-dir", str(spell_bart), "--output-dir", str(tmp_path / "ck"), "--quiet"]) == 0
    assert main(["build", "--checkpoint-dir", str(tmp_path / "ck"), "--output-dir", str(tmp_path / "e")]) == 0
    limits = json.loads((tmp_path / "e" / "engine.json").read_text())["limits"]
    assert (limits["max_input_len"], limits["max_output_len"]) == (64, 63)
    # limits below the model's own defaults (max_new_tokens 24): a note, as every plain run would be refused
    capsys.readouterr()
    assert main(["build", "--checkpoint-dir", str(tmp_path / "ck"), "--output-dir", str(tmp_path / "e10"),
                 "--max-output-len", "10"]) == 0
    assert "note: --max-output-len 10 is below the model's default output length 24" in capsys.readouterr().err


@pytest.mark.parametrize("limits,words", [
    ({"max_batch_size": "4", "max_input_len": 32, "max_output_len": 16, "max_beam_width": 4},
     "field 'limits.max_batch_size' = '4': expected a positive integer"),
    ({"max_batch_size": 4}, "field 'limits.max_input_len' = None"),
    ({"max_batch_size": 4, "max_input_len": -1, "max_output_len": 16, "max_beam_width": 4},
     "field 'limits.max_input_len' = -1"),
    ({"max_batch_size": 4, "max_input_len": 32, "max_output_len": 16, "max_beam_width": 4, "bogus": 1},
     "unknown key(s) ['bogus']"),
    ([4, 32], "field 'limits' = [4, 32]: expected an object"),
])
def test_error_bad_engine_limits(builtin_registry, tmp_path, t5_dir, capsys, limits, words):
    _, eng = _pipeline(tmp_path, t5_dir)
    capsys.readouterr()
    _edit_json(eng / "engine.json", lambda d: d.__setitem__("limits", limits))
    assert main(["run", "--engine-dir", str(eng), "--input-text", "abc", "--device", "cpu",
                 "--max-output-len", "4"]) == 2
    msg = _err(capsys)
    assert str(eng / "engine.json") in msg and words in msg


def test_error_bad_generation_config_names_the_engine_file(builtin_registry, tmp_path, t5_dir, capsys):
    _, eng = _pipeline(tmp_path, t5_dir)
    capsys.readouterr()
    _edit_json(eng / "config.json", lambda d: d.__setitem__("generation_config", {"num_beams": "two"}))
    assert main(["run", "--engine-dir", str(eng), "--input-text", "abc", "--device", "cpu",
                 "--max-output-len", "4"]) == 2
    msg = _err(capsys)
    assert f"{eng / 'config.json'} field 'generation_config'" in msg and "'num_beams' = 'two'" in msg
    _edit_json(eng / "config.json", lambda d: d.__setitem__("generation_config", "greedy"))  # not an object
    assert main(["run", "--engine-dir", str(eng), "--input-text", "abc", "--device", "cpu",
                 "--max-output-len", "4"]) == 2
    msg = _err(capsys)
    assert f"{eng / 'config.json'}: field 'generation_config' = 'greedy': expected an object" in msg
    # a token id beyond the vocabulary is named with the engine file too (not a bare generation_config.json)
    _edit_json(eng / "config.json", lambda d: d.__setitem__("generation_config", {"decoder_start_token_id": 5000}))
    assert main(["run", "--engine-dir", str(eng), "--input-text", "abc", "--device", "cpu",
                 "--max-output-len", "4"]) == 2
    msg = _err(capsys)
    assert f"{eng / 'config.json'} field 'generation_config'" in msg
    assert "'decoder_start_token_id' = 5000: expected a token id in [0, 384)" in msg


def test_error_output_dir_that_is_not_ours(builtin_registry, tmp_path, t5_dir, capsys):
    """An --output-dir that is a file, lies under a file, or is a folder of other files (the model's
    own folder above all) is refused before any work and left as it was; encdec's own output is
    replaced."""
    before = sorted(p.name for p in t5_dir.iterdir())
    assert _convert(t5_dir, t5_dir) == 2
    msg = _err(capsys)
    assert f"--output-dir {t5_dir}: exists and is not an encdec checkpoint or engine" in msg
    assert "model.safetensors" in msg and sorted(p.name for p in t5_dir.iterdir()) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert _convert(t5_dir, other) == 2
    assert "notes.txt" in _err(capsys) and (other / "notes.txt").read_text() == "keep"
    f = tmp_path / "afile"
    f.write_text("x")
    assert _convert(t5_dir, f) == 2
    assert f"--output-dir {f}: exists and is not a directory" in _err(capsys)
    assert _convert(t5_dir, f / "sub") == 2
    assert f"--output-dir {f / 'sub'}: {f} is a file, expected a directory" in _err(capsys)
    assert main(["build", "--checkpoint-dir", str(t5_dir), "--output-dir", str(f / "e")]) == 2
    _err(capsys)
    # encdec's own output (and an empty folder) is replaced
    ck, eng = _pipeline(tmp_path, t5_dir)
    assert _convert(t5_dir, ck) == 0
    (tmp_path / "empty").mkdir()
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(eng)]) == 0
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "engine.json").is_file()
    assert f.read_text() == "x"


def test_error_build_output_dir_is_the_checkpoint(builtin_registry, tmp_path, t5_dir, capsys):
    """build --output-dir naming the --checkpoint-dir (or a folder inside it) is refused before any
    work: the engine replaced the checkpoint (with --dtype, its weights cast), or copied into itself."""
    ck = tmp_path / "ckpt"
    assert _convert(t5_dir, ck) == 0
    capsys.readouterr()
    before = sorted(p.name for p in ck.iterdir())
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(ck), "--dtype", "float16"]) == 2
    assert f"--output-dir {ck}: is the --checkpoint-dir {ck}; expected a directory outside" in _err(capsys)
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(ck / "engine")]) == 2
    assert f"--output-dir {ck / 'engine'}: lies inside the --checkpoint-dir" in _err(capsys)
    assert sorted(p.name for p in ck.iterdir()) == before
    assert json.loads((ck / "config.json").read_text())["dtype"] == "float32"


def test_error_tokenizer_files_missing(builtin_registry, tmp_path, t5_dir, capsys):
    _, eng = _pipeline(tmp_path, t5_dir)
    capsys.readouterr()
    empty = tmp_path / "tok"
    empty.mkdir()
    assert main(["run", "--engine-dir", str(eng), "--tokenizer-dir", str(empty), "--input-text", "abc",
                 "--device", "cpu", "--max-output-len", "4"]) == 2
    assert f"--tokenizer-dir {empty}: no tokenizer files" in _err(capsys)
    for name in ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        (eng / name).unlink(missing_ok=True)
    assert main(["run", "--engine-dir", str(eng), "--input-text", "abc", "--device", "cpu",
                 "--max-output-len", "4"]) == 2
    msg = _err(capsys)
    assert f"engine directory {eng}: no tokenizer files" in msg and "--tokenizer-dir" in msg


def test_error_messages_are_one_line(builtin_registry, monkeypatch, capsys):
    """A library's multi-line message (transformers' tokenizer errors) is printed on one line."""
    import encdec_core.cli as cli
    from encdec_core.errors import EncDecError

    def boom(args):
        raise EncDecError("tok: cannot load a tokenizer (ValueError: one\n(1) two \n(2) three)")

    monkeypatch.setattr(cli, "cmd_list_families", boom)
    assert main(["list-families"]) == 2
    assert _err(capsys) == "encdec: error: tok: cannot load a tokenizer (ValueError: one (1) two (2) three)"


def test_run_output_json_path_checked_first_and_written_whole(builtin_registry, tmp_path, t5_dir, capsys,
                                                             monkeypatch):
    _, eng = _pipeline(tmp_path, t5_dir)
    capsys.readouterr()
    import encdec_core.cli as cli

    loads = []
    real = cli._load_engine
    monkeypatch.setattr(cli, "_load_engine", lambda *a: loads.append(a) or real(*a))
    base = ["run", "--engine-dir", str(eng), "--input-text", "abc", "--device", "cpu", "--max-output-len", "4"]
    f = tmp_path / "afile"
    f.write_text("x")
    assert main([*base, "--output-json", str(f / "out.json")]) == 2
    assert f"--output-json {f / 'out.json'}: {f} is a file, expected a directory" in _err(capsys)
    assert main([*base, "--output-json", str(tmp_path)]) == 2
    assert f"--output-json {tmp_path}: is a directory" in _err(capsys)
    assert loads == []  # refused before the engine was loaded
    out = tmp_path / "new" / "out.json"
    assert main([*base, "--output-json", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["input"] == "abc"
    assert [p.name for p in out.parent.iterdir()] == ["out.json"]


def test_error_bad_device_and_float_options(builtin_registry, tmp_path, t5_dir, capsys):
    _, eng = _pipeline(tmp_path, t5_dir)
    capsys.readouterr()
    assert main(["run", "--engine-dir", str(eng), "--input-text", "abc", "--device", "tpu"]) == 2
    assert "--device 'tpu': expected cpu, cuda, cuda:N or auto" in _err(capsys)
    assert main(["benchmark", "--engine-dir", str(eng), "--batch-size", "1", "--input-output-len", "8,2",
                 "--device", "tpu", "--quiet"]) == 2
    assert "--device 'tpu'" in _err(capsys)
    with pytest.raises(SystemExit) as ei:
        main(["run", "--engine-dir", str(eng), "--input-text", "abc", "--length-penalty", "nan"])
    assert ei.value.code == 2
    assert "--length-penalty/--length_penalty: expected a finite number, got 'nan'" in capsys.readouterr().err


@pytest.mark.parametrize("opts,words", [
    (["--batch-size", "8"], "batch size 8 exceeds the engine's limit 4"),
    (["--input-output-len", "40,2"], "input length 40 exceeds the engine's limit 32"),
    (["--input-output-len", "8,20"], "output length 20 exceeds the engine's limit 16"),
    (["--num-beams", "8"], "beam width 8 exceeds the engine's limit 4"),
])
def test_benchmark_respects_the_engine_limits(builtin_registry, tmp_path, t5_dir, capsys, opts, words):
    """A benchmark of an engine stays inside its build limits (beyond max_input_len a learned
    position table would fail deep inside torch)."""
    _, eng = _pipeline(tmp_path, t5_dir)
    capsys.readouterr()
    args = {"--batch-size": "1", "--input-output-len": "8,2", "--num-beams": "1"}
    args.update(dict(zip(opts[::2], opts[1::2])))
    assert main(["benchmark", "--engine-dir", str(eng), "--device", "cpu", "--repeats", "1", "--warmup", "0",
                 "--quiet", *[x for kv in args.items() for x in kv]]) == 2
    msg = _err(capsys)
    assert f"benchmark of engine {eng}: {words}" in msg and "rebuild with a larger" in msg


def test_benchmark_bad_counts_and_output_paths(builtin_registry, tmp_path, t5_dir, capsys, monkeypatch):
    """--repeats / --warmup out of range and --csv / --json / --plot paths that cannot be written are
    refused before anything is measured."""
    _, eng = _pipeline(tmp_path, t5_dir)
    capsys.readouterr()
    import encdec_core.benchmark as bm

    monkeypatch.setattr(bm, "run_benchmark", lambda *a, **k: pytest.fail("measured despite a bad option"))
    base = ["benchmark", "--engine-dir", str(eng), "--batch-size", "1", "--input-output-len", "8,2",
            "--device", "cpu", "--quiet"]
    assert main([*base, "--repeats", "0"]) == 2
    assert "--repeats 0: expected a positive integer" in _err(capsys)
    assert main([*base, "--warmup", "-1"]) == 2
    assert "--warmup -1: expected a non-negative integer" in _err(capsys)
    f = tmp_path / "afile"
    f.write_text("x")
    for flag in ("--csv", "--json", "--plot"):
        assert main([*base, flag, str(f / "x")]) == 2
        assert f"{flag} {f / 'x'}: {f} is a file, expected a directory" in _err(capsys)
    assert main([*base, "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path}: is a directory" in _err(capsys)


def test_main_tears_down_the_process_group(monkeypatch):
    """Every command ends with parallel.launch.shutdown() once the launcher module is in use (a
    multi-rank CPU run's gloo threads aborted the process at exit without it)."""
    import encdec_core.parallel.launch as launch

    calls = []
    monkeypatch.setattr(launch, "shutdown", lambda: calls.append(1))
    assert main(["list-families", "--json"]) == 0
    assert calls == [1]
