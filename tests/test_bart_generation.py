"""BART / mBART generation parity with HF `generate` (v5) under the same generation_config:
greedy and beam search with no_repeat_ngram_size 3, min_length, forced BOS/EOS, length_penalty 2.0,
and a mixed-language mBART batch with a target language per request."""
from __future__ import annotations

import pytest
import torch

from _bart_helpers import load_hf, one_thread, pad_batch, tiny
from conftest import make_registry

TEXTS = ["The house is wonderful.", "Le chat", "I like green apples and red cherries on the sofa."]
LANGS = ["de_DE", "fr_XX", "ro_RO"]

# the bart-large-cnn style of settings, with short lengths for a tiny model
CNN_LIKE = dict(num_beams=4, length_penalty=2.0, min_length=6, max_length=14, no_repeat_ngram_size=3,
                early_stopping=True, forced_bos_token_id=0, forced_eos_token_id=2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def reg():
    return make_registry("encdec_bart.plugin")


def _setup(name, reg, factory):
    from encdec_bart.plugin import load_tokenizer
    from encdec_core.convert import load_source_model

    path = tiny(name, factory)
    model, src, _ = load_source_model(path, reg=reg)
    return model, src, load_tokenizer(path), load_hf(path)


def _ours(model, src, ids, mask, forced=None, **opts):
    from encdec_core.runtime.generation import GenerationConfig, generate

    gc = GenerationConfig.from_model(model.cfg, src.generation_config, **opts)
    with torch.inference_mode():
        return generate(model, ids, mask, gc, forced_bos_token_ids=forced)


def _hf(hf, ids, mask, **opts):
    from transformers import GenerationConfig

    with torch.no_grad():
        gc = GenerationConfig(**opts, return_dict_in_generate=True, output_scores=opts.get("num_beams", 1) > 1)
        return hf.generate(input_ids=ids, attention_mask=mask, generation_config=gc)


def _check_same(ours, ref, beams: bool):
    assert ours.sequences.shape == ref.sequences.shape, (ours.sequences, ref.sequences)
    assert torch.equal(ours.sequences, ref.sequences), (ours.sequences, ref.sequences)
    if beams:
        assert torch.allclose(ours.sequences_scores, ref.sequences_scores, atol=1e-4)


@pytest.mark.parametrize("name", ["bart", "bart_scaled"])
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_bart_generate_matches_hf(name, mode, reg, tmp_path_factory):
    model, src, tok, hf = _setup(name, reg, tmp_path_factory)
    ids, mask = pad_batch(tok.encode(TEXTS), tok.pad_token_id)
    opts = dict(CNN_LIKE)
    if mode == "greedy":
        opts.update(num_beams=1, early_stopping=False)
    else:
        opts.update(num_return_sequences=2)
    ours = _ours(model, src, ids, mask, **opts)
    ref = _hf(hf, ids, mask, **opts)
    _check_same(ours, ref, mode == "beam")
    seqs = ours.sequences
    assert bool((seqs[:, 1] == 0).all())  # forced BOS
    assert seqs.shape[1] >= opts["min_length"]
    for row in ours.all_tokens():  # min_length and no_repeat_ngram_size 3 were in force
        assert len(row) + 2 >= opts["min_length"]  # start + tokens + EOS
        grams = [tuple(row[i:i + 3]) for i in range(len(row) - 2)]
        assert len(grams) == len(set(grams))
    # batched == one at a time
    for i in range(len(TEXTS)):
        n = int(mask[i].sum())
        one = _ours(model, src, ids[i:i + 1, :n], mask[i:i + 1, :n], **opts)
        k = opts.get("num_return_sequences", 1)
        assert one.all_tokens() == ours.all_tokens()[i * k:(i + 1) * k]


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_mbart_mixed_language_batch(mode, reg, tmp_path_factory):
    """One batch translating into three languages: each row equals the request run alone and
    equals HF generate with that request's forced_bos_token_id."""
    model, src, tok, hf = _setup("mbart", reg, tmp_path_factory)
    ids, mask = pad_batch(tok.encode(TEXTS, src_lang="en_XX"), tok.pad_token_id)
    langs = [tok.lang_id(c) for c in LANGS]
    assert len(set(langs)) == 3
    opts = dict(max_length=12, min_length=4, no_repeat_ngram_size=3, forced_eos_token_id=2)
    if mode == "beam":
        opts.update(num_beams=4, length_penalty=2.0, early_stopping=True)
    batch = _ours(model, src, ids, mask, forced=langs, **opts)
    rows = batch.all_tokens()
    for i, lang in enumerate(langs):
        assert rows[i][0] == lang  # the target language code leads each output
        n = int(mask[i].sum())
        alone = _ours(model, src, ids[i:i + 1, :n], mask[i:i + 1, :n], forced=[lang], **opts)
        assert alone.all_tokens() == [rows[i]]
        ref = _hf(hf, ids[i:i + 1, :n], mask[i:i + 1, :n], forced_bos_token_id=lang, **opts)
        _check_same(alone, ref, mode == "beam")
        # the same language given as the generation option instead of per request
        opt = _ours(model, src, ids[i:i + 1, :n], mask[i:i + 1, :n], forced_bos_token_id=lang, **opts)
        assert torch.equal(opt.sequences, alone.sequences)


def test_per_request_none_keeps_the_default_language(reg, tmp_path_factory):
    model, src, tok, _ = _setup("mbart", reg, tmp_path_factory)
    ids, mask = pad_batch(tok.encode(TEXTS[:2]), tok.pad_token_id)
    de, fr = tok.lang_id("de_DE"), tok.lang_id("fr_XX")
    out = _ours(model, src, ids, mask, forced=[None, fr], forced_bos_token_id=de, max_length=8)
    assert [r[0] for r in out.all_tokens()] == [de, fr]


def test_mbart_cc25_starts_with_the_target_language(reg, tmp_path_factory, tmp_path):
    """mBART-cc25 fine-tunes (MBartTokenizer: source = tokens </s> src_lang) start decoding with the
    target language code: decoder_start_token_id from the config, honoured like HF."""
    from _bart_helpers import MBART_TINY, make_model, mbart50_tokenizer
    from encdec_bart.plugin import load_tokenizer
    from encdec_core.convert import load_source_model

    hf_tok = mbart50_tokenizer(tmp_path / "tok", cc25=True)
    ro = hf_tok.lang_code_to_id["ro_RO"]
    path = tmp_path / "m"
    make_model(path, "mbart", MBART_TINY, len(hf_tok) | 1, seed=13, tokenizer=hf_tok, decoder_start_token_id=ro)
    model, src, _ = load_source_model(path, reg=reg)
    assert src.config.decoder_start_token_id == ro
    tok = load_tokenizer(path)
    assert tok.lang_id("ro_RO") == ro
    seqs = tok.encode(TEXTS[:2])
    assert all(s[-2:] == [2, tok.lang_id("en_XX")] for s in seqs)
    ids, mask = pad_batch(seqs, tok.pad_token_id)
    opts = dict(num_beams=4, max_length=10, no_repeat_ngram_size=3)
    ours = _ours(model, src, ids, mask, **opts)
    _check_same(ours, _hf(load_hf(path), ids, mask, **opts), beams=True)
    assert bool((ours.sequences[:, 0] == ro).all())


def test_lengths_past_the_learned_positions_are_named(reg, tmp_path_factory):
    """BART's position table has max_position_embeddings rows (64 here): a longer source, or an output
    that would feed a token past it, is a LimitError naming the lengths (it was F.embedding's
    IndexError from inside torch; HF raises that too, at the same step). An output that ends at the
    table's last row still runs, as in HF."""
    from encdec_core.errors import LimitError

    model, src, tok, hf = _setup("bart", reg, tmp_path_factory)
    ids = torch.tensor([[5] * 64 + [2]])
    with pytest.raises(LimitError, match="a source of 65 tokens exceeds the model's learned positions "
                                         r"\(max_position_embeddings 64\)"):
        _ours(model, src, ids, torch.ones_like(ids), max_new_tokens=2)
    ids = torch.tensor([[5, 6, 2]])
    full = dict(num_beams=1, max_new_tokens=64, min_new_tokens=64)
    assert _ours(model, src, ids, None, **full).sequences.shape[1] == 65  # feeds positions 0..63
    with pytest.raises(LimitError, match="an output .* of 65 tokens exceeds"):
        _ours(model, src, ids, None, **{**full, "max_new_tokens": 65, "min_new_tokens": 65})
