"""BART / mBART through the CLI: list-families, convert -> build -> run, generation defaults from the
model's generation_config.json, per-input --target-lang, --compare-hf."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from _bart_helpers import load_hf, one_thread, tiny
from encdec_core.cli import main

# bart-large-cnn style defaults (short lengths for a tiny model)
CNN_GEN = dict(num_beams=4, length_penalty=2.0, min_length=6, max_length=14, no_repeat_ngram_size=3,
               early_stopping=True, forced_bos_token_id=0, forced_eos_token_id=2, decoder_start_token_id=2,
               bos_token_id=0, eos_token_id=2, pad_token_id=1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


def _pipeline(tmp_path, src):
    ck, eng = tmp_path / "ckpt", tmp_path / "engine"
    assert main(["convert", "--model-dir", str(src), "--output-dir", str(ck), "--quiet"]) == 0
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(eng), "--max-batch-size", "4",
                 "--max-input-len", "32", "--max-output-len", "16", "--max-beam-width", "4"]) == 0
    return eng


def test_list_families_shows_bart_and_mbart(builtin_registry, capsys):
    assert main(["list-families", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert "bart-large-cnn" in rows["bart"]["aliases"] and "mbart-large-50" in rows["mbart"]["aliases"]
    assert "BartForConditionalGeneration" in rows["bart"]["architectures"]
    assert "MBartForConditionalGeneration" in rows["mbart"]["architectures"]
    assert "bart-large-cnn" in rows["bart"]["presets"] and "mbart-large-50" in rows["mbart"]["presets"]


def test_bart_run_honours_generation_config(builtin_registry, tmp_path, tmp_path_factory, capsys):
    src = tmp_path / "hf-bart"
    shutil.copytree(tiny("bart", tmp_path_factory), src)
    (src / "generation_config.json").write_text(json.dumps(CNN_GEN))
    eng = _pipeline(tmp_path, src)
    out_json = tmp_path / "out.json"
    texts = ["The house is wonderful.", "I like green apples and red cherries."]
    rc = main(["run", "--engine-dir", str(eng), "--input-text", *texts, "--compare-hf", "--hf-model-dir", str(src),
               "--device", "cpu", "--output-json", str(out_json)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = json.loads(out_json.read_text())["results"]
    assert [r["match"] for r in res] == [True, True]
    # independently: HF generate with nothing passed reads the same generation_config.json
    hf = load_hf(src)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    for text, row in zip(texts, res):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            seq = hf.generate(input_ids=ids)[0].tolist()
        assert seq[1] == 0 and len(seq) >= 6  # forced BOS, min_length from the file
        body = seq[1:]
        while body and body[-1] in (1, 2):
            body = body[:-1]
        assert row["ids"][0] == body


def test_mbart_run_with_target_language_per_input(builtin_registry, tmp_path, tmp_path_factory, capsys):
    src = tiny("mbart", tmp_path_factory)
    eng = _pipeline(tmp_path, src)
    out_json = tmp_path / "out.json"
    rc = main(["run", "--engine-dir", str(eng), "--input-text", "The house is wonderful.", "The cat sleeps.",
               "--target-lang", "de_DE", "fr_XX", "--num-beams", "4", "--max-output-len", "8",
               "--compare-hf", "--hf-model-dir", str(src), "--device", "cpu", "--output-json", str(out_json)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = json.loads(out_json.read_text())["results"]
    assert [r["match"] for r in res] == [True, True]
    from encdec_bart.plugin import lang_code_to_id

    assert [r["ids"][0][0] for r in res] == [lang_code_to_id(src, "de_DE"), lang_code_to_id(src, "fr_XX")]
    # the Python API gives the same texts (one target language per request)
    from encdec_core.engine import Engine

    engine = Engine.load(eng, device="cpu")
    outs = engine.generate(["The house is wonderful.", "The cat sleeps."], target_lang=["de_DE", "fr_XX"],
                           num_beams=4, max_new_tokens=8)
    assert outs == [r["output"] for r in res]
    # an unknown code is a one-line error listing valid ones
    rc = main(["run", "--engine-dir", str(eng), "--input-text", "x", "--target-lang", "de_XY", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc != 0
    err = captured.err + captured.out
    assert "de_XY" in err and "de_DE" in err and "Traceback" not in err


def test_mbart_run_with_source_language(builtin_registry, tmp_path, tmp_path_factory, capsys):
    from encdec_bart.plugin import lang_code_to_id

    src = tiny("mbart", tmp_path_factory)
    eng = _pipeline(tmp_path, src)
    out_json = tmp_path / "out.json"
    rc = main(["run", "--engine-dir", str(eng), "--input-text", "Le chat dort.", "--source-lang", "fr_XX",
               "--target-lang", "de_DE", "--max-output-len", "4", "--compare-hf", "--hf-model-dir", str(src),
               "--device", "cpu", "--output-json", str(out_json)])
    assert rc == 0, capsys.readouterr().out
    row = json.loads(out_json.read_text())["results"][0]
    assert row["match"]
    assert lang_code_to_id(src, "fr_XX") in row["input_ids"]
    assert lang_code_to_id(src, "en_XX") not in row["input_ids"]
    capsys.readouterr()
    rc = main(["run", "--engine-dir", str(eng), "--input-text", "x", "--source-lang", "xx_YY", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "xx_YY" in err and "Traceback" not in err


def test_mbart_source_language_in_truncation_and_the_python_api(builtin_registry, tmp_path, tmp_path_factory,
                                                                capsys):
    """--truncate with --source-lang keeps mBART-50's frame (the source code first, </s> last) as HF's
    truncation does with that src_lang (it cut the input as plain text: </s> lost, other outputs);
    Engine.generate / generate_stream take source_lang as run --source-lang does."""
    from transformers import AutoTokenizer

    from encdec_core.engine import Engine

    src = tiny("mbart", tmp_path_factory)
    eng = _pipeline(tmp_path, src)
    text = "The house is wonderful. The cat sleeps on the sofa. I like green apples. " * 3
    out_json = tmp_path / "cut.json"
    assert main(["run", "--engine-dir", str(eng), "--input-text", text, "--source-lang", "fr_XX", "--max-input-length",
                 "12", "--target-lang", "de_DE", "--max-new-tokens", "4", "--device", "cpu",
                 "--output-json", str(out_json)]) == 0
    hf_tok = AutoTokenizer.from_pretrained(str(src))
    hf_tok.src_lang = "fr_XX"
    want = hf_tok(text, truncation=True, max_length=12)["input_ids"]
    assert json.loads(out_json.read_text())["results"][0]["input_ids"] == want
    assert want[-1] == hf_tok.eos_token_id and want[0] == hf_tok.convert_tokens_to_ids("fr_XX")

    short = "Le chat dort."
    assert main(["run", "--engine-dir", str(eng), "--input-text", short, "--source-lang", "fr_XX",
                 "--target-lang", "de_DE", "--max-new-tokens", "4", "--device", "cpu", "--output-log-probs",
                 "--output-json", str(out_json)]) == 0
    row = json.loads(out_json.read_text())["results"][0]
    engine = Engine.load(eng, device="cpu")
    tok = engine.tokenizer()
    assert engine.encode_sources(tok, [short], "fr_XX") == [row["input_ids"]] != engine.encode_sources(tok, [short])
    kw = dict(target_lang="de_DE", max_new_tokens=4)
    hyp = engine.generate([short], source_lang="fr_XX", return_scores=True, **kw)[0]
    assert [h.tokens for h in hyp] == row["output_ids"] and [h.text for h in hyp] == row["output"]
    streamed = [ev for ev in engine.generate_stream([short], source_lang="fr_XX", **kw) if ev.finished]
    assert [ev.output for ev in streamed] == row["output"]
    with pytest.raises(Exception, match="xx_YY"):
        engine.generate([short], source_lang="xx_YY", **kw)
