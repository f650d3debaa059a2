"""Tiny BART / mBART models and tokenizers built offline (fixed seeds, no hub).

BART: byte-level BPE trained with `tokenizers`, loaded as BartTokenizer.
mBART: a sentencepiece BPE model turned into an MBart50Tokenizer (language codes appended after the
pieces, fairseq order), saved with the model.
Every weight, bias, layer norm and final_logits_bias is randomised (HF initialises biases to zero
and norms to one, which would hide a mapping mistake).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "The house is wonderful.", "Das Haus ist wunderbar.", "La maison est magnifique.",
    "I like green apples and red cherries.", "Ich mag grüne Äpfel und rote Kirschen.",
    "Le chat dort sur le canapé.", "The cat sleeps on the sofa.", "Die Katze schläft auf dem Sofa.",
    "A quick brown fox jumps over the lazy dog.", "Un renard brun saute par-dessus le chien.",
    "We translate many sentences into several languages today.",
]

BART_TINY = dict(d_model=40, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=56, decoder_ffn_dim=72,
                 max_position_embeddings=64, scale_embedding=False)
# scale_embedding on, unequal layer counts and ffn dims
BART_SCALED = dict(d_model=36, encoder_layers=3, decoder_layers=1, encoder_attention_heads=3,
                   decoder_attention_heads=3, encoder_ffn_dim=44, decoder_ffn_dim=28,
                   max_position_embeddings=48, scale_embedding=True)
MBART_TINY = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=40,
                  max_position_embeddings=64, scale_embedding=True)


def bart_tokenizer(out: Path):
    """Byte-level BPE (ids 0..4 = <s> <pad> </s> <unk> <mask>) saved as a BartTokenizer in ``out``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 3, vocab_size=320, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe.save_model(str(out))
    tok = BartTokenizer.from_pretrained(str(out))
    tok.save_pretrained(str(out))
    return tok


def mbart50_tokenizer(out: Path, cc25: bool = False):
    """A sentencepiece BPE model as an MBart50Tokenizer (language codes such as de_DE, en_XX), or
    with ``cc25`` an MBartTokenizer (mBART-cc25 layout: source = tokens </s> src_lang)."""
    import sentencepiece as spm
    from transformers import MBart50Tokenizer, MBartTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 3), encoding="utf-8")
    prefix = out / "spm"
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), model_type="bpe",
                                   vocab_size=120, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = (MBartTokenizer if cc25 else MBart50Tokenizer)(vocab=vocab, src_lang="en_XX")
    tok.save_pretrained(str(out))
    for f in (corpus, Path(str(prefix) + ".model"), Path(str(prefix) + ".vocab")):
        f.unlink()
    return tok


def _randomise(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
        model.final_logits_bias.copy_(0.5 * torch.randn(model.final_logits_bias.shape, generator=g))


def make_model(out: Path, kind: str, shape: dict, vocab_size: int, seed: int = 0, tokenizer=None,
               zero_final_logits_bias: bool = False, **overrides):
    """A random HF BART (kind='bart') or mBART (kind='mbart') saved in ``out``; returns the HF model."""
    from transformers import BartConfig, BartForConditionalGeneration, MBartConfig, MBartForConditionalGeneration

    cfg_cls, model_cls = ((BartConfig, BartForConditionalGeneration) if kind == "bart"
                          else (MBartConfig, MBartForConditionalGeneration))
    ids = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
    cfg = cfg_cls(vocab_size=vocab_size, activation_function="gelu", init_std=0.2, dropout=0.0,
                  attention_dropout=0.0, activation_dropout=0.0, **{**ids, **shape, **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    _randomise(model, seed + 1)
    if zero_final_logits_bias:
        with torch.no_grad():
            model.final_logits_bias.zero_()
    out = Path(out)
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return model


def one_thread():
    """Tiny models run far faster on one thread, above all on a shared, busy CPU (a generator for a
    module-scoped fixture: the previous thread count comes back afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_hf(path: Path):
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(str(path)).eval()


def rewrite_config(path: Path, **changes) -> None:
    f = Path(path) / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg, indent=2))


def pad_batch(seqs: list[list[int]], pad: int):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


# ------------------------------------------------------------------------------ cached tiny models
_CACHE: dict = {}

SPECS = {
    # name: (kind, shape, extra vocab rows beyond the tokenizer, seed, overrides)
    "bart": ("bart", BART_TINY, 1, 0, {}),
    "bart_scaled": ("bart", BART_SCALED, 3, 3, {}),
    "bart_untied": ("bart", BART_TINY, 1, 5, {"tie_word_embeddings": False}),
    "mbart": ("mbart", MBART_TINY, 1, 7, {}),
}


def tokenizer_dir(kind: str, factory) -> Path:
    key = ("tok", kind)
    if key not in _CACHE:
        d = factory.mktemp(f"{kind}_tok")
        (bart_tokenizer if kind == "bart" else mbart50_tokenizer)(d)
        _CACHE[key] = d
    return _CACHE[key]


def tiny(name: str, factory) -> Path:
    """The folder of a tiny random HF model (built once per test session) with its tokenizer."""
    if name not in _CACHE:
        from transformers import AutoTokenizer

        kind, shape, extra, seed, over = SPECS[name]
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(kind, factory)))
        d = factory.mktemp(name)
        make_model(d, kind, shape, len(tok) + extra, seed=seed, tokenizer=tok, **over)
        _CACHE[name] = d
    return _CACHE[name]
