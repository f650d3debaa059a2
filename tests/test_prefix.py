"""Decoder / target prefixes (CTranslate2's target_prefix): Engine.generate(target_prefix=...),
generate_ids(decoder_prefix=...) and `encdec run --target-prefix`, against HF generate with the
same decoder_input_ids, request by request (prefixes of different lengths in one call run in
separate batches)."""
from __future__ import annotations

import json

import pytest
import torch

from encdec_core.cli import main
from encdec_core.errors import EncDecError, LimitError

from _bart_helpers import load_hf, pad_batch, rewrite_config, tiny
from _cli_helpers import make_t5_dir


def _engine(tmp, src, *build):
    from encdec_core.engine import Engine

    ck, eng = tmp / "ckpt", tmp / "engine"
    assert main(["convert", "--model-dir", str(src), "--output-dir", str(ck), "--quiet"]) == 0
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(eng), "--max-input-len", "32",
                 "--max-output-len", "16", "--max-beam-width", "3", *build]) == 0
    return eng, Engine.load(eng, device="cpu")


def _hf_rows(hf, ids, prefixes, start, pad, **kw):
    """HF generate one request at a time with decoder_input_ids = [start] + prefix (none: HF's default)."""
    rows = []
    for x, p in zip(ids, prefixes):
        inp, mask = pad_batch([x], pad)
        extra = {} if not p else {"decoder_input_ids": torch.tensor([[start] + p])}
        with torch.no_grad():
            out = hf.generate(inp, attention_mask=mask, **extra, **kw)
        rows.append(out)
    return rows


def _strip(row, eos, pad):
    """An HF output row (num_return_sequences of them) as our tokens(): no start token, cut at EOS."""
    out = []
    for r in row.tolist():
        r = r[1:]
        if eos in r:
            r = r[: r.index(eos)]
        out.append(r)
    return out


@pytest.mark.parametrize("kw", [dict(max_new_tokens=6), dict(max_new_tokens=5, num_beams=3, num_return_sequences=2)],
                         ids=["greedy", "beam"])
def test_t5_prefixes_match_hf_request_by_request(builtin_registry, tmp_path, kw):
    """Prefixes of lengths 0-3 over 5 requests with max batch size 2: every output starts with its
    prefix and equals HF's generate with that prefix; one prefix for all works the same; scores too."""
    src = make_t5_dir(tmp_path / "hf")
    _, engine = _engine(tmp_path, src, "--max-batch-size", "2")
    hf = load_hf(src)
    tok = engine.tokenizer()
    ids = tok.encode(["hello there", "a much longer input here", "x y", "another input", "one"])
    prefixes = [[70, 71, 72], None, [100], [70, 71, 72], [101, 102]]
    out = engine.generate_ids(ids, decoder_prefix=prefixes, output_scores=True, **kw)
    n = out.num_return_sequences
    ref = _hf_rows(hf, ids, [p or [] for p in prefixes], 0, 0, **kw)
    for i, p in enumerate(prefixes):
        for j, want in enumerate(_strip(ref[i], 1, 0)):
            got = out.tokens(i * n + j)
            assert got == want, (i, j)
            assert got[: len(p or [])] == (p or [])
            assert len(out.token_logprobs(i * n + j)) <= kw["max_new_tokens"]
    same = engine.generate_ids(ids, decoder_prefix=[101, 102], **kw)
    ref = _hf_rows(hf, ids, [[101, 102]] * len(ids), 0, 0, **kw)
    assert [same.tokens(r) for r in range(len(same))] == [t for row in ref for t in _strip(row, 1, 0)]


def test_prefix_limits_and_bad_input(builtin_registry, tmp_path):
    src = make_t5_dir(tmp_path / "hf")
    _, engine = _engine(tmp_path, src)
    ids = engine.tokenizer().encode(["hello", "world"])
    engine.generate_ids(ids, decoder_prefix=[5] * 6, max_new_tokens=10)  # 6 + 10 = the limit 16
    with pytest.raises(LimitError, match="prefix of 7 tokens plus 10 new tokens exceeds .* limit 16 .*at most 9"):
        engine.generate_ids(ids, decoder_prefix=[5] * 7, max_new_tokens=10)
    for bad, words in (("abc", "expected a list of token ids"), ([[1], [2], [3]], "3 for 2 inputs"),
                       ([[1], "x"], r"decoder prefix\[1\] = 'x'"), ([[1], [10 ** 6]], r"contains 1000000"),
                       ([[1.5], None], r"contains 1.5")):
        with pytest.raises(EncDecError, match=words):
            engine.generate_ids(ids, decoder_prefix=bad, max_new_tokens=4)
    for bad, words in ((["a", "b", "c"], "3 for 2 inputs"), ([3, None], r"target prefix\[0\] = 3"),
                       (b"x", "expected a string")):
        with pytest.raises(EncDecError, match=words):
            engine.generate(["hello", "world"], target_prefix=bad, max_new_tokens=4)


def test_bart_prefix_gets_the_forced_bos(builtin_registry, tmp_path, tmp_path_factory):
    """BART with forced_bos_token_id (bart-large's <s>): a text prefix is tokenized as a target
    (<s> first), an id prefix without <s> gets it put in front; both equal HF with decoder_input_ids
    [</s>, <s>, prefix]."""
    import shutil

    src = tmp_path / "bart"
    shutil.copytree(tiny("bart", tmp_path_factory), src)
    rewrite_config(src, forced_bos_token_id=0)
    gen = src / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "forced_bos_token_id": 0}))
    _, engine = _engine(tmp_path, src, "--max-batch-size", "4")
    hf = load_hf(src)
    tok = engine.tokenizer()
    ids = tok.encode(["The house is wonderful.", "The cat sleeps on the sofa."])
    words = tok.encode_target(["Das Haus"])[0]
    assert words[0] == 0 and words[-1] == 2  # <s> ... </s>
    kw = dict(max_new_tokens=6, num_beams=1)
    by_text = engine.generate_ids(ids, decoder_prefix=engine.prefix_ids(tok, ["Das Haus", None], 2), **kw)
    by_ids = engine.generate_ids(ids, decoder_prefix=[words[1:-1], None], **kw)
    ref = _hf_rows(hf, ids, [words[:-1], []], 2, 1, **kw)
    want = [t for row in ref for t in _strip(row, 2, 1)]
    assert by_text.all_tokens() == by_ids.all_tokens() == want
    assert want[0][: len(words) - 1] == words[:-1]
    texts = engine.generate(["The house is wonderful."], target_prefix="Das Haus", **kw)
    assert texts[0][0].startswith("Das Haus") and texts[0][0] == tok.decode(want[0])


def test_mbart_prefix_after_the_target_language(builtin_registry, tmp_path, tmp_path_factory):
    """mBART-50 with a target language per input: the language code comes first, then the prefix."""
    src = tiny("mbart", tmp_path_factory)
    _, engine = _engine(tmp_path, src, "--max-batch-size", "4")
    hf = load_hf(src)
    tok = engine.tokenizer()
    ids = tok.encode(["The house is wonderful.", "The cat sleeps on the sofa."])
    langs = [tok.lang_id("de_DE"), tok.lang_id("fr_XX")]
    pre = engine.prefix_ids(tok, ["Das", "Le chat"], 2)
    assert not any(t in langs for p in pre for t in p)
    out = engine.generate_ids(ids, target_lang_ids=langs, decoder_prefix=pre, max_new_tokens=5)
    ref = _hf_rows(hf, ids, [[langs[0]] + pre[0], [langs[1]] + pre[1]], 2, 1, max_new_tokens=5)
    assert out.all_tokens() == [t for row in ref for t in _strip(row, 2, 1)]


def test_run_target_prefix_cli(builtin_registry, tmp_path, capsys):
    """run --target-prefix (one for all, or one per input) and with --streaming: outputs start with
    the prefix, equal to the Python API, and --compare-hf gives HF the same prefix."""
    src = make_t5_dir(tmp_path / "hf")
    eng, engine = _engine(tmp_path, src)
    base = ["run", "--engine-dir", str(eng), "--device", "cpu", "--max-output-len", "8",
            "--input-text", "hello", "world wide"]
    res = tmp_path / "o.json"
    assert main([*base, "--target-prefix", "ab", "c", "--compare-hf", "--hf-model-dir", str(src),
                 "--output-json", str(res)]) == 0
    rows = json.loads(res.read_text())["results"]
    api = engine.generate(["hello", "world wide"], target_prefix=["ab", "c"], max_new_tokens=8)
    assert [r["output"] for r in rows] == api and all(r["match"] for r in rows)
    assert rows[0]["output"][0].startswith("ab") and rows[1]["output"][0].startswith("c")
    capsys.readouterr()
    assert main([*base[:-3], "--input-text", "hello", "--target-prefix", "ab", "--streaming"]) == 0
    assert capsys.readouterr().out == f"Input : hello\nOutput: {api[0][0]}\n\n"
    assert main([*base, "--target-prefix", "a", "b", "c"]) == 2
    assert "--target-prefix: 3 for 2 inputs" in capsys.readouterr().err
