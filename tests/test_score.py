"""Teacher-forced scoring (Engine.score / score_ids, `encdec score`): per-token log-probabilities of
given targets against HF transformers' ``log_softmax(model(input_ids, attention_mask, labels).logits)``
gathered at the labels (T5, BART, mBART-50 with a target language, fairseq NMT against FSMT), in
padded batches split by the engine's max batch size; batched equals one at a time; the CLI end to
end; bad input refused with the argument, value and what was expected."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from _bart_helpers import load_hf, tiny  # noqa: E402
from _cli_helpers import make_t5_dir  # noqa: E402
from _mpi import MPIRUN, need_mpi  # noqa: E402
from conftest import fill_builtin_registry  # noqa: E402
from encdec_core.cli import main  # noqa: E402
from encdec_core.convert import convert  # noqa: E402
from encdec_core.engine import Engine, build  # noqa: E402
from encdec_core.errors import EncDecError, LimitError  # noqa: E402
from encdec_core.scoring import ScoreResult  # noqa: E402

TOL = 1e-4
# mixed source and target lengths: padding on both sides of every batch
SOURCES = ["hello", "a longer source sentence here", "x", "two words", "the house is wonderful"]
TARGETS = ["hi there friend", "ab", "a somewhat longer", "", "das Haus"]


@pytest.fixture(scope="module")
def reg():
    """The process-wide registry with the built-in families (Engine.tokenizer finds the family there)."""
    yield fill_builtin_registry()
    from encdec_core import registry

    registry.reset()


def _engine_dir(src, out, reg, **limits):
    kw = dict(max_batch_size=2, max_input_len=32, max_output_len=20, max_beam_width=1)
    kw.update(limits)
    return build(convert(src, out / "ck", reg=reg), out / "eng", **kw)


@pytest.fixture(scope="module")
def t5(tmp_path_factory, reg):
    tmp = tmp_path_factory.mktemp("score-t5")
    src = make_t5_dir(tmp / "hf")
    eng = _engine_dir(src, tmp, reg)
    return src, eng, Engine.load(eng)


def _hf_gather(hf, enc, labels) -> list[list[float]]:
    """HF's log-probability of each label (rows padded with -100), per row without the padding."""
    with torch.no_grad():
        logits = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).logits
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return [lp[i][labels[i] != -100].tolist() for i in range(labels.shape[0])]


def _labels(rows: list[list[int]]) -> torch.Tensor:
    n = max(len(r) for r in rows)
    return torch.tensor([r + [-100] * (n - len(r)) for r in rows])


def _close(a, b, tol=TOL) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= tol


def _check_result(r: ScoreResult, eos: int) -> None:
    assert r.tokens[-1] == eos and len(r.token_logprobs) == len(r.tokens) == r.num_tokens
    assert all(x <= 0 for x in r.token_logprobs)
    assert r.sum == pytest.approx(math.fsum(r.token_logprobs), abs=1e-9)
    assert r.mean == pytest.approx(r.sum / len(r.tokens), abs=1e-9)


# ---------------------------------------------------------------------------- parity with HF
def test_t5_matches_hf_labels_in_padded_batches(t5, monkeypatch):
    """T5 (relative bias): five pairs of mixed lengths in batches of 2 (the engine's limit) equal
    HF's log-softmax at the labels (text_target ids: bytes + </s>) within 1e-4; a shifted alignment
    (predicting the token after the label, or the label at the wrong step) would not."""
    from transformers import ByT5Tokenizer, T5ForConditionalGeneration

    src, _, engine = t5
    tok = ByT5Tokenizer()
    res = engine.score(SOURCES, TARGETS)
    assert [r.tokens for r in res] == [tok(text_target=t)["input_ids"] for t in TARGETS]
    assert res[3].tokens == [1]  # an empty target: the log-probability of stopping at once
    assert res[0].token_strings == ["h", "i", " ", "t", "h", "e", "r", "e", " ", "f", "r", "i", "e", "n", "d", "</s>"]
    hf = T5ForConditionalGeneration.from_pretrained(str(src)).eval()
    ref = _hf_gather(hf, tok(SOURCES, padding=True, return_tensors="pt"), _labels([r.tokens for r in res]))
    for r, h in zip(res, ref):
        _check_result(r, eos=1)
        assert r.prefix == [] and r.prefix_logprobs == []
        assert _close(r.token_logprobs, h), (r.token_logprobs, h)
    # the test has teeth: an off-by-one alignment is far outside the tolerance
    shifted_next = [h[1:] for h in ref]  # the log-prob of the NEXT label at each step
    assert any(not _close(r.token_logprobs[:-1], s, 1e-2) for r, s in zip(res, shifted_next) if s)
    assert any(not _close(r.token_logprobs[1:], h[:-1], 1e-2) for r, h in zip(res, ref) if len(h) > 1)
    # batched (sorted, split in twos) equals one pair at a time, and a one-row logits block too
    alone = [engine.score([s], [t])[0] for s, t in zip(SOURCES, TARGETS)]
    assert all(_close(a.token_logprobs, r.token_logprobs, 1e-5) for a, r in zip(alone, res))
    import encdec_core.scoring as scoring

    monkeypatch.setattr(scoring, "_LOGITS_BUDGET", 1)
    again = engine.score(SOURCES, TARGETS)
    assert all(_close(a.token_logprobs, r.token_logprobs, 1e-5) for a, r in zip(again, res))


def test_score_ids_equals_score_and_takes_labels_with_or_without_eos(t5):
    _, _, engine = t5
    tok = engine.tokenizer()
    res = engine.score(SOURCES[:3], TARGETS[:3])
    src = tok.encode(SOURCES[:3])
    with_eos = [r.tokens for r in res]
    by_ids = engine.score_ids(src, with_eos)
    no_eos = engine.score_ids(src, [t[:-1] for t in with_eos])  # EOS appended
    for r, a, b in zip(res, by_ids, no_eos):
        assert a.tokens == b.tokens == r.tokens
        assert _close(a.token_logprobs, r.token_logprobs, 1e-6) and _close(b.token_logprobs, r.token_logprobs, 1e-6)
        assert a.token_strings is None  # ids in, no tokenizer involved


@pytest.fixture(scope="module")
def bart(tmp_path_factory, reg):
    src = tiny("bart", tmp_path_factory)
    eng = _engine_dir(src, tmp_path_factory.mktemp("score-bart"), reg, max_output_len=24)
    return src, Engine.load(eng)


BART_SOURCES = ["The house is wonderful.", "I like green apples and red cherries.", "The cat."]
BART_TARGETS = ["Das Haus ist wunderbar.", "Le chat", "We translate many sentences today."]


def test_bart_matches_hf_labels(bart):
    """BART (learned positions with offset 2, final_logits_bias): labels <s> tokens </s>; with no forced
    BOS in the model's config the <s> is scored like any label."""
    src, engine = bart
    hf = load_hf(src)
    tok = engine.tokenizer().tok
    res = engine.score(BART_SOURCES, BART_TARGETS)
    labels = [tok(text_target=t)["input_ids"] for t in BART_TARGETS]
    assert [r.tokens for r in res] == labels and all(r.tokens[0] == 0 for r in res)
    ref = _hf_gather(hf, tok(BART_SOURCES, padding=True, return_tensors="pt"), _labels(labels))
    for r, h in zip(res, ref):
        _check_result(r, eos=2)
        assert _close(r.token_logprobs, h), (r.token_logprobs, h)
    assert any(not _close(r.token_logprobs[:-1], h[1:], 1e-2) for r, h in zip(res, ref))
    # a forced BOS (BART's generation default forced_bos_token_id=0): the <s> the labels start with is
    # fed, not scored; prefix + tokens are HF's labels, prefix_logprobs + token_logprobs its log-probs
    forced = engine.score_ids(engine.tokenizer().encode(BART_SOURCES), labels, target_lang_ids=[0] * 3)
    for f, r, h, lab in zip(forced, res, ref, labels):
        assert f.prefix == [0] and f.tokens == lab[1:]
        assert _close(f.prefix_logprobs + f.token_logprobs, h)
        assert f.sum == pytest.approx(r.sum - r.token_logprobs[0], abs=1e-4)


def test_mbart50_target_language_is_the_forced_prefix(tmp_path_factory, reg):
    """mBART-50: the target language (one per pair) is the forced BOS after the decoder start </s>;
    HF's labels are [lang] + tokens + </s> (MBart50Tokenizer with tgt_lang), and ours are the same."""
    src = tiny("mbart", tmp_path_factory)
    engine = Engine.load(_engine_dir(src, tmp_path_factory.mktemp("score-mbart"), reg, max_output_len=40))
    hf = load_hf(src)
    tok = engine.tokenizer()
    langs = ["de_DE", "fr_XX", "de_DE"]
    res = engine.score(BART_SOURCES, BART_TARGETS, target_lang=langs)
    labels = []
    for t, code in zip(BART_TARGETS, langs):
        tok.tok.tgt_lang = code
        labels.append(tok.tok(text_target=t)["input_ids"])
    ref = _hf_gather(hf, tok.tok(BART_SOURCES, padding=True, return_tensors="pt"), _labels(labels))
    for r, lab, h, code in zip(res, labels, ref, langs):
        _check_result(r, eos=2)
        assert r.prefix == [tok.lang_id(code)] == lab[:1] and r.tokens == lab[1:]
        assert _close(r.prefix_logprobs + r.token_logprobs, h), (r.prefix_logprobs + r.token_logprobs, h)
    # the language matters: the same target after another language code scores differently
    other = engine.score(BART_SOURCES[:1], BART_TARGETS[:1], target_lang="fr_XX")[0]
    assert other.tokens == res[0].tokens and not _close(other.token_logprobs, res[0].token_logprobs, 1e-3)


def test_fairseq_nmt_matches_fsmt(tmp_path_factory, reg):
    """fairseq NMT (sinusoidal positions, separate source and target dictionaries): targets through
    moses + BPE + the TARGET dictionary + </s>; log-probs equal FSMT's with the same weights."""
    from _nmt_helpers import CORPUS, build_dictionary, learn_bpe_codes, tiny_fsmt, write_fairseq_folder

    d = tmp_path_factory.mktemp("score-nmt")
    codes = learn_bpe_codes(d, CORPUS, num_symbols=60)
    _, n_src = build_dictionary(d, CORPUS, codes, "en")
    sources = ["The house is wonderful.", "Is the river cold in the winter?", "The cat sat."]
    targets = ["Das Haus ist wunderbar.", "The river is cold.", "ein Haus"]
    _, n_tgt = build_dictionary(d, CORPUS + targets * 2, codes, "de")  # another order, more entries
    fs = tiny_fsmt(seed=3, src_vocab=n_src, tgt_vocab=n_tgt, tie=False)
    folder = write_fairseq_folder(d / "fairseq", fs, d)
    engine = Engine.load(_engine_dir(folder, d, reg))
    tok = engine.tokenizer()
    res = engine.score(sources, targets)
    assert all(3 not in r.tokens for r in res)  # no <unk>
    assert res[0].tokens != tok.encode(targets[:1])[0]  # the target dictionary, not the source one
    assert [tok.decode(r.tokens) for r in res] == targets
    strings = res[0].token_strings
    assert strings[-1] == "</s>" and " ".join(strings[:-1]).replace("@@ ", "") == "Das Haus ist wunderbar ."
    for s, r in zip(sources, res):
        _check_result(r, eos=2)
        x = torch.tensor([tok.encode([s])[0]])
        dec = torch.tensor([[2] + r.tokens[:-1]])  # fairseq: decoding starts with </s>
        with torch.no_grad():
            logits = fs(input_ids=x, attention_mask=torch.ones_like(x), decoder_input_ids=dec, use_cache=False).logits
        h = torch.log_softmax(logits.float(), -1)[0].gather(-1, torch.tensor(r.tokens)[:, None])[:, 0].tolist()
        assert _close(r.token_logprobs, h), (r.token_logprobs, h)


def test_fsmt_tokenizer_targets_use_the_target_vocabulary(tmp_path):
    """FSMT folders (facebook/wmt19-*): HF's FSMTTokenizer encodes only with the source vocabulary;
    encode_target looks the pieces up in vocab-tgt.json (here the source order reversed)."""
    import string

    from transformers import FSMTTokenizer

    from encdec_nmt.text import FSMTTextTokenizer

    toks = ["<s>", "<pad>", "</s>", "<unk>", "th", "the</w>"]
    for c in string.ascii_letters + string.digits + ".,!?'":
        toks += [c, c + "</w>"]
    tgt = toks[:4] + toks[4:][::-1]
    (tmp_path / "vocab-src.json").write_text(json.dumps({t: i for i, t in enumerate(toks)}), encoding="utf-8")
    (tmp_path / "vocab-tgt.json").write_text(json.dumps({t: i for i, t in enumerate(tgt)}), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("t h\nth e</w>\n", encoding="utf-8")
    FSMTTokenizer(langs=["en", "de"], src_vocab_file=str(tmp_path / "vocab-src.json"),
                  tgt_vocab_file=str(tmp_path / "vocab-tgt.json"),
                  merges_file=str(tmp_path / "merges.txt")).save_pretrained(tmp_path)
    tok = FSMTTextTokenizer(tmp_path)
    ids = tok.encode_target(["the cat."])[0]
    assert ids[-1] == 2 and ids[0] == tgt.index("the</w>") and 3 not in ids
    assert ids != tok.encode(["the cat."])[0]
    assert tok.decode(ids) == "the cat." and tok.target_token_strings(ids)[:2] == ["the</w>", "c"]


# ---------------------------------------------------------------------------- CLI
def test_cli_score_files_and_json(t5, tmp_path, capsys):
    _, eng, engine = t5
    sf, tf = tmp_path / "src.txt", tmp_path / "tgt.txt"
    sf.write_text("\n".join(SOURCES) + "\n", encoding="utf-8")
    tf.write_text("\n".join(TARGETS) + "\n", encoding="utf-8")  # line 4 is blank: an empty target, kept
    out = tmp_path / "out" / "scores.json"
    capsys.readouterr()
    rc = main(["score", "--engine-dir", str(eng), "--source-file", str(sf), "--target-file", str(tf),
               "--device", "cpu", "--output-json", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert rc == 0
    api = engine.score(SOURCES, TARGETS)
    rows = json.loads(out.read_text())["results"]
    assert [r["source"] for r in rows] == SOURCES and [r["target"] for r in rows] == TARGETS
    for i, (row, r) in enumerate(zip(rows, api)):
        assert row["target_ids"] == r.tokens and row["num_tokens"] == len(r.tokens)
        assert row["score"] == pytest.approx(r.mean, abs=1e-6) and row["sum"] == pytest.approx(r.sum, abs=1e-6)
        assert _close(row["token_logprobs"], r.token_logprobs, 1e-6) and row["tokens"] == r.token_strings
        assert printed[i] == f"[{i}] score {r.mean:.6f}  sum {r.sum:.6f}  tokens {len(r.tokens)}"
    assert not list(out.parent.glob(".*"))  # written through a temp file, renamed
    # texts on the command line, snake_case spellings too
    rc = main(["score", "--engine_dir", str(eng), "--source_text", *SOURCES[:2], "--target-text", *TARGETS[:2],
               "--device", "cpu"])
    again = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(again) == 2
    for line, r in zip(again, api):  # other batches, other padding: equal to the last digits or so
        f = line.split()
        assert f[0] == f"[{api.index(r)}]" and float(f[2]) == pytest.approx(r.mean, abs=1e-5)
        assert float(f[4]) == pytest.approx(r.sum, abs=1e-4) and int(f[6]) == r.num_tokens


@pytest.mark.parametrize("argv, words", [
    (["--source-text", "a", "b", "--target-text", "c"], ["--source-text gives 2 source(s)", "1 target(s)"]),
    (["--source-text", "a", "--source-file", "F", "--target-text", "c"], ["--source-text or --source-file"]),
    (["--source-text", "a"], ["no targets", "--target-text", "--target-file"]),
    (["--source-text", "a", "--target-file", "/nonexistent/t.txt"], ["--target-file /nonexistent/t.txt", "no such"]),
    (["--source-text", "a" * 40, "--target-text", "b"], ["pair 0", "source length 41", "limit 32", "--max-input-len"]),
    (["--source-text", "a", "b", "--target-text", "b", "c" * 30],
     ["pair 1", "target length 31", "limit 20", "--max-output-len"]),
])
def test_cli_score_refusals(t5, tmp_path, capsys, argv, words):
    _, eng, _ = t5
    rc = main(["score", "--engine-dir", str(eng), "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("encdec: error: ") and all(w in err for w in words), err


def test_cli_score_output_json_checked_first(t5, tmp_path, capsys):
    _, eng, _ = t5
    rc = main(["score", "--engine-dir", str(eng), "--source-text", "a", "--target-text", "b", "--device", "cpu",
               "--output-json", str(tmp_path)])
    assert rc == 2 and "--output-json" in capsys.readouterr().err


@pytest.mark.mpi
@need_mpi
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_mpirun_score_equals_single_rank(t5, reg, tmp_path, tp, pp):
    """`mpirun -n 2 encdec score` on tensor- and pipeline-parallel engines: every rank runs the same
    forward (vocab-parallel logits gathered; the last stage's hidden states broadcast), rank 0
    prints and writes, and the scores equal the single-rank ones."""
    import os
    import subprocess
    import sys

    src, _, engine = t5
    eng = build(convert(src, tmp_path / "ck", tp=tp, pp=pp, reg=reg), tmp_path / "eng", max_batch_size=2,
                max_input_len=32, max_output_len=20)
    out = tmp_path / "scores.json"
    exe = [sys.executable, "-m", "encdec_core.cli"]
    env = {k: v for k, v in os.environ.items() if k != "ENCDEC_DISABLE_PLUGIN_AUTOLOAD"}
    env.update(ENCDEC_DIST_TIMEOUT="90", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [str(MPIRUN), "--allow-run-as-root", "--oversubscribe", "-n", "2", *exe, "score", "--engine-dir", str(eng),
           "--source-text", *SOURCES[:3], "--target-text", *TARGETS[:3], "--device", "cpu", "--output-json", str(out)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpirun hung:\n{exc.stdout}\n{exc.stderr}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("] score ") == 3, r.stdout  # rank 0 prints, the other does not
    single = engine.score(SOURCES[:3], TARGETS[:3])
    for row, s in zip(json.loads(out.read_text())["results"], single):
        assert row["target_ids"] == s.tokens and _close(row["token_logprobs"], s.token_logprobs, 1e-5)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, words", [
    (lambda e: e.score([], []), ["sources = []", "at least one pair"]),
    (lambda e: e.score(["a"], ["b", "c"]), ["1 sources but 2 targets", "one target per source"]),
    (lambda e: e.score(["a", 3], ["b", "c"]), ["sources[1] = 3", "expected a string"]),
    (lambda e: e.score(["a"], [None]), ["targets[0] = None", "expected a string"]),
    (lambda e: e.score("a", ["b"]), ["sources = 'a'", "expected a list of strings"]),
    (lambda e: e.score(["a"], None), ["targets = None"]),
    (lambda e: e.score_ids([[5, 6]], [[400]]), ["target_ids[0], position 0", "token id 400", "[0, 384)", "decoder"]),
    (lambda e: e.score_ids([[5, -1]], [[7]]), ["source_ids[0], position 1", "token id -1", "encoder"]),
    (lambda e: e.score_ids([[5, 2.5]], [[7]]), ["source_ids[0], position 1", "2.5", "expected an int"]),
    (lambda e: e.score_ids([[5]], ["ab"]), ["target_ids[0] = 'ab'", "expected a list of token ids"]),
    (lambda e: e.score_ids("abc", [[7]]), ["source_ids = 'abc'", "list of requests"]),
    (lambda e: e.score_ids([[]], [[7]]), ["source_ids[0] = []", "at least one token"]),
    (lambda e: e.score_ids([[5], [6]], [[7]]), ["2 source_ids but 1 target_ids"]),
    (lambda e: e.score_ids([[5]], [[7]], target_lang_ids=[1, 2]), ["target_lang_ids has 2 entries for 1 pairs"]),
    (lambda e: e.score_ids([[5]], [[7]], target_lang_ids=[999]), ["target_lang_ids[0] = 999", "[0, 384)"]),
    (lambda e: e.score(["a"], ["b"], target_lang=3), ["target language = 3"]),
    (lambda e: e.score(["a"], ["b"], source_lang=3), ["source_lang = 3"]),
])
def test_bad_input_is_refused(t5, call, words):
    _, _, engine = t5
    with pytest.raises(EncDecError) as ei:
        call(engine)
    assert all(w in str(ei.value) for w in words), str(ei.value)


def test_limits_name_the_pair_length_and_limit(t5):
    _, _, engine = t5
    with pytest.raises(LimitError, match=r"pair 1: source length 33 tokens exceeds the engine's limit 32 .*"
                                         r"--max-input-len"):
        engine.score_ids([[5], [5] * 33], [[7], [7]])
    with pytest.raises(LimitError, match=r"pair 0: target length 21 tokens \(with the EOS\) exceeds the engine's "
                                         r"limit 20 .*--max-output-len"):
        engine.score_ids([[5]], [[7] * 20])
    assert engine.score_ids([[5]], [[7] * 19])[0].num_tokens == 20  # exactly at the limit is fine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_equal_cpu(t5):
    """On a GPU in fp32 the scores equal the CPU's within 1e-4; in bf16 they stay finite and close."""
    _, eng, cpu = t5
    want = cpu.score(SOURCES, TARGETS)
    got = Engine.load(eng, device="cuda").score(SOURCES, TARGETS)
    for g, w in zip(got, want):
        assert g.tokens == w.tokens and _close(g.token_logprobs, w.token_logprobs)
    half = Engine.load(eng, device="cuda", dtype="bfloat16").score(SOURCES, TARGETS)
    for h, w in zip(half, want):
        assert all(math.isfinite(x) for x in h.token_logprobs)
        assert abs(h.mean - w.mean) <= 0.05 * max(1.0, abs(w.mean))
