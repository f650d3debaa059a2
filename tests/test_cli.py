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
    eager runner's outputs, greedy and beam; options that disagree or need CUDA are refused in one line."""
    _, eng = _pipeline(tmp_path, t5_dir)
    capsys.readouterr()
    texts = ["hello world", "a much longer input here", "abc"]
    outs = {}
    for runner in ("eager", "compiled"):
        for beams in ("1", "2"):
            j = tmp_path / f"{runner}{beams}.json"
            assert main(["run", "--engine-dir", str(eng), "--input-text", *texts, "--device", "cpu",
                         "--runner", runner, "--num-beams", beams, "--max-new-tokens", "8",
                         "--output-json", str(j)]) == 0
            outs[runner, beams] = json.loads(j.read_text())
    for beams in ("1", "2"):
        assert outs["compiled", beams] == outs["eager", beams]
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
