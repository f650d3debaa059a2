"""BART and mBART as data: ConfigMaps, one WeightMap and the HF names they answer to.

BART:  post-LN, learned positions with a row offset of 2, layernorm_embedding, biases on every
       linear, tied embeddings, final_logits_bias, sqrt(d_model) embedding scale when configured.
mBART: the same tensors plus pre-LN and a final layer norm on each stack; language-code tokens
       (MBart50 / MBart tokenizers) choose the target language through forced_bos_token_id
       (many-to-many mBART-50) or decoder_start_token_id (mBART-cc25 fine-tunes).
"""
from __future__ import annotations

import difflib
import math
import re
from pathlib import Path

from encdec_core.config import ConfigMap, source_activation
from encdec_core.errors import ConfigError, EncDecError, WeightError
from encdec_core.family import Family, Source, output_embedding_tied, read_hf_source
from encdec_core.plugins import hookimpl
from encdec_core.tokenizer import HFTokenizer
from encdec_core.weights import Rule, WeightMap

# ------------------------------------------------------------------------------------ config


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _head_dim(src: dict) -> int:
    """HF BART/mBART: head_dim = d_model // heads on each side; encdec keeps one head_dim."""
    d = src["d_model"]
    dims = {}
    for key in ("encoder_attention_heads", "decoder_attention_heads"):
        h = src[key]
        if not isinstance(h, int) or h <= 0 or d % h:
            raise ConfigError(f"field '{key}' = {h!r}: expected a positive divisor of d_model ({d})")
        dims[key] = d // h
    if len(set(dims.values())) != 1:
        raise ConfigError(
            f"fields 'encoder_attention_heads' = {src['encoder_attention_heads']} and 'decoder_attention_heads' = "
            f"{src['decoder_attention_heads']} give different head sizes {sorted(dims.values())} for d_model {d}: "
            "expected one head size for both stacks")
    return dims["encoder_attention_heads"]


def _activation(src: dict) -> str:
    return source_activation(src, "activation_function", "gelu")


def _embedding_scale(src: dict) -> float:
    return math.sqrt(src["d_model"]) if src.get("scale_embedding") else 1.0


def _tied(src: dict) -> bool:
    return src.get("tie_word_embeddings", True) is not False


def _config_map(family: str, pre_norm: bool) -> ConfigMap:
    return ConfigMap(
        fields={
            "family": lambda s: family,
            "vocab_size": "vocab_size",
            "d_model": "d_model",
            "encoder_layers": "encoder_layers",
            "decoder_layers": "decoder_layers",
            "encoder_heads": "encoder_attention_heads",
            "decoder_heads": "decoder_attention_heads",
            "head_dim": _head_dim,
            "encoder_ffn_dim": "encoder_ffn_dim",
            "decoder_ffn_dim": "decoder_ffn_dim",
            "activation": _activation,
            "max_position_embeddings": "max_position_embeddings",
            "embedding_scale": _embedding_scale,
            # transformers v5: tie_word_embeddings=False unties the lm_head AND both stacks' embed_tokens
            "tie_lm_head": output_embedding_tied,
            "shared_embeddings": _tied,
            "pad_token_id": "pad_token_id",
            "eos_token_id": lambda s: _first(s.get("eos_token_id")),
            "bos_token_id": "bos_token_id",
            # HF generate falls back to bos when no decoder_start_token_id is configured
            "decoder_start_token_id": ("decoder_start_token_id", "bos_token_id"),
            "forced_bos_token_id": "forced_bos_token_id",
            "forced_eos_token_id": lambda s: _first(s.get("forced_eos_token_id")),
        },
        constants={
            "norm_type": "layer",
            "norm_bias": True,
            "norm_eps": 1e-5,  # nn.LayerNorm's default; BART configs carry no epsilon
            "linear_bias": True,
            "gated_ffn": False,
            "position_type": "learned",
            "position_offset": 2,
            "layernorm_embedding": True,
            "final_logits_bias": True,  # dropped by read_bart_source when absent or all zero
            "q_scaling": 1.0,
            "output_scale": 1.0,
            "encoder_pre_norm": pre_norm,
            "decoder_pre_norm": pre_norm,
            "encoder_final_norm": pre_norm,
            "decoder_final_norm": pre_norm,
        },
        defaults={
            "max_position_embeddings": 1024,
            "pad_token_id": 1,
            "eos_token_id": 2,
            "bos_token_id": 0,
            "decoder_start_token_id": 2,
            "forced_bos_token_id": None,
            "forced_eos_token_id": None,
        },
    )


BART_CONFIG = _config_map("bart", pre_norm=False)
MBART_CONFIG = _config_map("mbart", pre_norm=True)

# ------------------------------------------------------------------------------------ weights


def _weight_rules() -> list[Rule]:
    out = [
        Rule("lm_head.weight", "lm_head.weight", when="!tie_lm_head"),
        Rule("lm_head.weight", op="drop", when="tie_lm_head", copy_of="model.shared.weight"),
        Rule("final_logits_bias", "final_logits_bias", when="final_logits_bias"),
        Rule("final_logits_bias", op="drop", when="!final_logits_bias"),
    ]
    # ForConditionalGeneration checkpoints prefix everything with "model."; BartModel ones do not
    for p in ("model.", ""):
        e, d = f"{p}encoder.layers.{{i}}", f"{p}decoder.layers.{{i}}"
        out += [
            # tied (the default): one table; the stacks' embed_tokens are copies of it
            Rule(f"{p}shared.weight", "shared.weight", when="shared_embeddings"),
            Rule(f"{p}encoder.embed_tokens.weight", op="drop", when="shared_embeddings", copy_of=f"{p}shared.weight"),
            Rule(f"{p}decoder.embed_tokens.weight", op="drop", when="shared_embeddings", copy_of=f"{p}shared.weight"),
            # fairseq-era BART checkpoints' version buffers (transformers ignores them on load)
            Rule(f"{p}{{side}}.version", op="drop"),
            # untied: each stack reads its own embed_tokens. Files saved where they were still tied
            # to `shared` (transformers v4) hold only `shared`: it fills both, and a stack's own
            # embed_tokens, when present, overwrites it (a later rule writes the same target).
            Rule(f"{p}shared.weight", ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"), "alias",
                 when="!shared_embeddings"),
            Rule(f"{p}{{side}}.embed_tokens.weight", "{side}.embed_tokens.weight", when="!shared_embeddings"),
            Rule(f"{p}{{side}}.embed_positions.weight", "{side}.embed_positions.weight"),
            Rule(f"{p}{{side}}.layernorm_embedding.{{w}}", "{side}.layernorm_embedding.{w}"),
            Rule(f"{p}{{side}}.layer_norm.{{w}}", "{side}.final_norm.{w}"),  # mBART
        ]
        for side, base in (("encoder", e), ("decoder", d)):
            tgt = f"{side}.layers.{{i}}"
            out += [
                Rule(tuple(f"{base}.self_attn.{x}_proj.{{w}}" for x in "qkv"), f"{tgt}.self_attn.qkv.{{w}}", "fuse"),
                Rule(f"{base}.self_attn.out_proj.{{w}}", f"{tgt}.self_attn.out.{{w}}"),
                Rule(f"{base}.self_attn_layer_norm.{{w}}", f"{tgt}.self_attn_norm.{{w}}"),
                Rule(f"{base}.fc1.{{w}}", f"{tgt}.ffn.wi.{{w}}"),
                Rule(f"{base}.fc2.{{w}}", f"{tgt}.ffn.wo.{{w}}"),
                Rule(f"{base}.final_layer_norm.{{w}}", f"{tgt}.ffn_norm.{{w}}"),
            ]
        out += [
            Rule(f"{d}.encoder_attn.q_proj.{{w}}", "decoder.layers.{i}.cross_attn.q.{w}"),
            Rule((f"{d}.encoder_attn.k_proj.{{w}}", f"{d}.encoder_attn.v_proj.{{w}}"),
                 "decoder.layers.{i}.cross_attn.kv.{w}", "fuse"),
            Rule(f"{d}.encoder_attn.out_proj.{{w}}", "decoder.layers.{i}.cross_attn.out.{w}"),
            Rule(f"{d}.encoder_attn_layer_norm.{{w}}", "decoder.layers.{i}.cross_attn_norm.{w}"),
        ]
    return out


BART_WEIGHTS = WeightMap(_weight_rules())

# ------------------------------------------------------------------------------------ source

def read_bart_source(path: Path, family: Family) -> Source:
    """An HF BART/mBART folder. final_logits_bias [1, V] becomes [V]; a missing or all-zero bias
    (HF treats it as zeros) is left out of the model, which changes no logit."""
    src = read_hf_source(Path(path), family)
    tensors = dict(src.tensors)
    cfg = src.config
    key = next((k for k in ("final_logits_bias", "model.final_logits_bias") if k in tensors), None)
    if key is not None:
        t = tensors.pop(key)
        if t.dim() not in (1, 2) or t.numel() != cfg.vocab_size or (t.dim() == 2 and t.shape[0] != 1):
            raise WeightError(f"{path}: tensor '{key}' has shape {tuple(t.shape)}, expected (1, {cfg.vocab_size})")
        if bool(t.count_nonzero()):
            tensors["final_logits_bias"] = t.reshape(-1)
    if "final_logits_bias" not in tensors:
        cfg = cfg.replace(final_logits_bias=False)
    return Source(src.path, cfg, tensors, dict(src.generation_config), src.tokenizer_files)


# ------------------------------------------------------------------------------------ tokenizer

_LANG_CODE = re.compile(r"^[a-z]{2,3}_[A-Z]{2}$")


class BartTokenizer(HFTokenizer):
    """An HF BartTokenizer / MBartTokenizer / MBart50Tokenizer loaded from a folder.

    encode(texts, src_lang=None) -> ids; decode(ids) -> text; lang_id("de_DE") -> token id, which is
    the ``forced_bos_token_id`` of a request (mBART-50) or its decoder start (mBART-cc25 fine-tunes).
    """

    def __init__(self, path: Path, cfg=None):
        super().__init__(path)
        self.cfg = cfg
        self._langs = None

    # -------------------------------------------------------------- languages
    @property
    def lang_codes(self) -> dict[str, int]:
        """Language code -> token id (empty for plain BART)."""
        if self._langs is None:
            table = getattr(self.tok, "lang_code_to_id", None)
            if isinstance(table, dict) and table:
                langs = {str(k): int(v) for k, v in table.items()}
            else:
                vocab = self.tok.get_vocab()
                langs = {t: int(i) for t, i in vocab.items() if _LANG_CODE.match(t)}
            unk = self.tok.unk_token_id
            self._langs = {k: v for k, v in langs.items() if v is not None and v != unk}
        return self._langs

    @property
    def src_lang(self) -> str | None:
        return getattr(self.tok, "src_lang", None) if self.lang_codes else None

    def lang_id(self, code: str) -> int:
        langs = self.lang_codes
        if code in langs:
            return langs[code]
        if not langs:
            raise EncDecError(
                f"target language {code!r}: the tokenizer in {self.path} ({type(self.tok).__name__}) has no "
                "language codes; target-language control needs an mBART tokenizer")
        close = difflib.get_close_matches(code, list(langs), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        few = ", ".join(sorted(langs)[:8])
        raise EncDecError(
            f"target language {code!r} is not a language code of the tokenizer in {self.path}: expected one of "
            f"{len(langs)} codes such as {few}{hint}")

    # -------------------------------------------------------------- text
    def encode(self, texts, src_lang: str | None = None) -> list[list[int]]:
        if isinstance(texts, str):
            texts = [texts]
        if src_lang is None:
            return [list(self.tok(t)["input_ids"]) for t in texts]
        self.lang_id(src_lang)  # validates, with the list of codes on error
        if not hasattr(self.tok, "src_lang"):
            raise EncDecError(f"source language {src_lang!r}: {type(self.tok).__name__} takes no source language")
        old = self.tok.src_lang
        try:
            self.tok.src_lang = src_lang
            return [list(self.tok(t)["input_ids"]) for t in texts]
        finally:
            self.tok.src_lang = old

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_target(self, texts) -> list[list[int]]:
        """Target-side ids of each text as HF tokenizes ``text_target`` (BART: ``<s> tokens </s>``),
        without the language code mBART tokenizers add (mBART-50 puts it first, cc25 after the
        ``</s>``): the target language of a scored request is its forced BOS / decoder start, as in
        generation (``Engine.score(..., target_lang=)``)."""
        if isinstance(texts, str):
            texts = [texts]
        codes = set(self.lang_codes.values())
        out = []
        for t in texts:
            ids = list(self.tok(text_target=t)["input_ids"])
            if codes:
                if ids and ids[0] in codes:
                    ids = ids[1:]
                if ids and ids[-1] in codes:
                    ids = ids[:-1]
            out.append(ids)
        return out


def load_tokenizer(path: Path, cfg=None) -> BartTokenizer:
    return BartTokenizer(Path(path), cfg)


def lang_code_to_id(tokenizer_dir, code: str) -> int:
    """Target language code ("de_DE") -> token id, read from the tokenizer in ``tokenizer_dir``."""
    return BartTokenizer(Path(tokenizer_dir)).lang_id(code)


# ------------------------------------------------------------------------------------ presets

_BART_BASE = dict(
    model_type="bart", architectures=["BartForConditionalGeneration"], vocab_size=50265, d_model=768,
    encoder_layers=6, decoder_layers=6, encoder_attention_heads=12, decoder_attention_heads=12,
    encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024, activation_function="gelu",
    scale_embedding=False, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    forced_bos_token_id=0, forced_eos_token_id=2,
)
_BART_LARGE = {**_BART_BASE, "d_model": 1024, "encoder_layers": 12, "decoder_layers": 12,
               "encoder_attention_heads": 16, "decoder_attention_heads": 16,
               "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096}
BART_PRESETS = {
    "bart-base": _BART_BASE,
    "bart-large": _BART_LARGE,
    # summarisation fine-tune: one row fewer, generation defaults in config.json
    "bart-large-cnn": {**_BART_LARGE, "vocab_size": 50264, "num_beams": 4, "length_penalty": 2.0,
                       "max_length": 142, "min_length": 56, "no_repeat_ngram_size": 3, "early_stopping": True},
}
_MBART_50 = {**_BART_LARGE, "model_type": "mbart", "architectures": ["MBartForConditionalGeneration"],
             "vocab_size": 250054, "scale_embedding": True, "forced_bos_token_id": None,
             "decoder_start_token_id": 2}
MBART_PRESETS = {
    "mbart-large-50": _MBART_50,
    "mbart-large-50-many-to-many-mmt": _MBART_50,
    "mbart-large-cc25": {**_MBART_50, "vocab_size": 250027, "decoder_start_token_id": None},
}

# ------------------------------------------------------------------------------------ families

BART = Family(
    name="bart",
    description="BART (post-LN, learned positions offset 2, layernorm_embedding, final_logits_bias)",
    config_map=BART_CONFIG,
    weight_map=BART_WEIGHTS,
    aliases=("bart-base", "bart-large", "bart-large-cnn"),
    architectures=("BartForConditionalGeneration", "BartModel"),
    model_types=("bart",),
    read_source=read_bart_source,
    tokenizer=load_tokenizer,
    hf_class="BartForConditionalGeneration",
    presets=BART_PRESETS,
    output_embedding=("lm_head.weight", "model.shared.weight"),
)

MBART = Family(
    name="mbart",
    description="mBART / mBART-50 incl. many-to-many (pre-LN, final norms, per-request target language)",
    config_map=MBART_CONFIG,
    weight_map=BART_WEIGHTS,
    aliases=("mbart-50", "mbart-large-50", "mbart-large-cc25", "mbart-cc25"),
    architectures=("MBartForConditionalGeneration", "MBartModel"),
    model_types=("mbart",),
    read_source=read_bart_source,
    tokenizer=load_tokenizer,
    hf_class="MBartForConditionalGeneration",
    presets=MBART_PRESETS,
    output_embedding=("lm_head.weight", "model.shared.weight"),
)


@hookimpl
def encdec_families():
    return [BART, MBART]
