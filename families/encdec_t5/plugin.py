"""The T5 family as data: a ConfigMap, a WeightMap and the HF names it answers to."""
from __future__ import annotations

import math

from encdec_core.config import ConfigMap
from encdec_core.errors import ConfigError
from encdec_core.family import Family, output_embedding_tied
from encdec_core.plugins import hookimpl
from encdec_core.weights import Rule, WeightMap


def get_offset_q_scaling(src: dict) -> float:
    """T5 applies no softmax scale; with scale = 1/(q_scaling*sqrt(d)) that is q_scaling = 1/sqrt(d)."""
    d = src["d_kv"]
    if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
        raise ConfigError(f"field 'd_kv' = {d!r}: expected a positive integer (the attention head size)")
    return 1.0 / math.sqrt(d)


def _activation(src: dict) -> str:
    proj = src.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ConfigError(f"field 'feed_forward_proj' = {proj!r}: expected 'ACT' or 'gated-ACT'")
    act = parts[-1]
    if proj == "gated-gelu":
        return "gelu_new"  # HF's backwards-compatible meaning
    return {"gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu", "gelu_new": "gelu_new"}.get(act, act)


def _tie_flag(src: dict) -> bool:
    return src.get("tie_word_embeddings", True) is not False


def _output_scale(src: dict) -> float:
    # transformers 5: scale_decoder_outputs where saved, else the tie_word_embeddings flag as written
    scaled = src["scale_decoder_outputs"] if "scale_decoder_outputs" in src else _tie_flag(src)
    return float(src["d_model"]) ** -0.5 if scaled else 1.0


T5_CONFIG = ConfigMap(
    fields={
        "vocab_size": "vocab_size",
        "d_model": "d_model",
        "encoder_layers": "num_layers",
        "decoder_layers": ("num_decoder_layers", "num_layers"),
        "encoder_heads": "num_heads",
        "decoder_heads": "num_heads",
        "head_dim": "d_kv",
        "encoder_ffn_dim": "d_ff",
        "decoder_ffn_dim": "d_ff",
        "activation": _activation,
        "gated_ffn": lambda s: s.get("feed_forward_proj", "relu").startswith("gated-"),
        "norm_eps": "layer_norm_epsilon",
        "relative_num_buckets": "relative_attention_num_buckets",
        "relative_max_distance": "relative_attention_max_distance",
        "relative_bias_per_layer": lambda s: s.get("model_type") == "umt5",
        "tie_lm_head": output_embedding_tied,
        "output_scale": _output_scale,
        "q_scaling": get_offset_q_scaling,
        "pad_token_id": "pad_token_id",
        "eos_token_id": lambda s: s["eos_token_id"][0] if isinstance(s.get("eos_token_id"), list) else s.get("eos_token_id"),
        "decoder_start_token_id": ("decoder_start_token_id", "pad_token_id"),
        "max_position_embeddings": lambda s: s.get("n_positions", 512),
        "family": lambda s: "t5",
    },
    constants={
        "norm_type": "rms",
        "norm_bias": False,
        "encoder_pre_norm": True,
        "decoder_pre_norm": True,
        "encoder_final_norm": True,
        "decoder_final_norm": True,
        "linear_bias": False,
        "position_type": "relative",
        "shared_embeddings": True,
    },
    defaults={
        "norm_eps": 1e-6,
        "relative_num_buckets": 32,
        "relative_max_distance": 128,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    },
)

_E, _D = "encoder.block.{i}.layer", "decoder.block.{i}.layer"
T5_WEIGHTS = WeightMap([
    Rule("shared.weight", "shared.weight"),
    Rule("encoder.embed_tokens.weight", op="drop", copy_of="shared.weight"),
    Rule("decoder.embed_tokens.weight", op="drop", copy_of="shared.weight"),
    Rule("lm_head.weight", "lm_head.weight", when="!tie_lm_head"),
    Rule("lm_head.weight", op="drop", when="tie_lm_head", copy_of="shared.weight"),
    # checkpoints saved before transformers 4 carry a cross-attention bias table that T5 never uses
    # (transformers ignores it on load: _keys_to_ignore_on_load_unexpected)
    Rule("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", op="drop"),
    # relative bias: one table per stack (T5) or one per layer (UMT5)
    Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "encoder.rel_bias.weight",
         when="!relative_bias_per_layer"),
    Rule("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "decoder.rel_bias.weight",
         when="!relative_bias_per_layer"),
    Rule(f"{_E}.0.SelfAttention.relative_attention_bias.weight", "encoder.layers.{i}.rel_bias.weight",
         when="relative_bias_per_layer"),
    Rule(f"{_D}.0.SelfAttention.relative_attention_bias.weight", "decoder.layers.{i}.rel_bias.weight",
         when="relative_bias_per_layer"),
    # encoder
    Rule((f"{_E}.0.SelfAttention.q.weight", f"{_E}.0.SelfAttention.k.weight", f"{_E}.0.SelfAttention.v.weight"),
         "encoder.layers.{i}.self_attn.qkv.weight", "fuse"),
    Rule(f"{_E}.0.SelfAttention.o.weight", "encoder.layers.{i}.self_attn.out.weight"),
    Rule(f"{_E}.0.layer_norm.weight", "encoder.layers.{i}.self_attn_norm.weight"),
    Rule(f"{_E}.1.DenseReluDense.wi.weight", "encoder.layers.{i}.ffn.wi.weight"),
    Rule((f"{_E}.1.DenseReluDense.wi_0.weight", f"{_E}.1.DenseReluDense.wi_1.weight"),
         "encoder.layers.{i}.ffn.wi.weight", "fuse"),
    Rule(f"{_E}.1.DenseReluDense.wo.weight", "encoder.layers.{i}.ffn.wo.weight"),
    Rule(f"{_E}.1.layer_norm.weight", "encoder.layers.{i}.ffn_norm.weight"),
    Rule("encoder.final_layer_norm.weight", "encoder.final_norm.weight"),
    # decoder
    Rule((f"{_D}.0.SelfAttention.q.weight", f"{_D}.0.SelfAttention.k.weight", f"{_D}.0.SelfAttention.v.weight"),
         "decoder.layers.{i}.self_attn.qkv.weight", "fuse"),
    Rule(f"{_D}.0.SelfAttention.o.weight", "decoder.layers.{i}.self_attn.out.weight"),
    Rule(f"{_D}.0.layer_norm.weight", "decoder.layers.{i}.self_attn_norm.weight"),
    Rule(f"{_D}.1.EncDecAttention.q.weight", "decoder.layers.{i}.cross_attn.q.weight"),
    Rule((f"{_D}.1.EncDecAttention.k.weight", f"{_D}.1.EncDecAttention.v.weight"),
         "decoder.layers.{i}.cross_attn.kv.weight", "fuse"),
    Rule(f"{_D}.1.EncDecAttention.o.weight", "decoder.layers.{i}.cross_attn.out.weight"),
    Rule(f"{_D}.1.layer_norm.weight", "decoder.layers.{i}.cross_attn_norm.weight"),
    Rule(f"{_D}.2.DenseReluDense.wi.weight", "decoder.layers.{i}.ffn.wi.weight"),
    Rule((f"{_D}.2.DenseReluDense.wi_0.weight", f"{_D}.2.DenseReluDense.wi_1.weight"),
         "decoder.layers.{i}.ffn.wi.weight", "fuse"),
    Rule(f"{_D}.2.DenseReluDense.wo.weight", "decoder.layers.{i}.ffn.wo.weight"),
    Rule(f"{_D}.2.layer_norm.weight", "decoder.layers.{i}.ffn_norm.weight"),
    Rule("decoder.final_layer_norm.weight", "decoder.final_norm.weight"),
])

_T5_SMALL = dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=32128, d_model=512,
                 d_kv=64, d_ff=2048, num_layers=6, num_heads=8, feed_forward_proj="relu",
                 tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
PRESETS = {
    "t5-small": _T5_SMALL,
    "t5-base": {**_T5_SMALL, "d_model": 768, "d_ff": 3072, "num_layers": 12, "num_heads": 12},
    "flan-t5-small": {**_T5_SMALL, "d_model": 512, "d_ff": 1024, "num_layers": 8, "num_decoder_layers": 8,
                      "num_heads": 6, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
    "flan-t5-base": {**_T5_SMALL, "d_model": 768, "d_ff": 2048, "num_layers": 12, "num_heads": 12,
                     "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
    "flan-t5-large": {**_T5_SMALL, "d_model": 1024, "d_ff": 2816, "num_layers": 24, "num_heads": 16,
                      "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
    "flan-t5-xl": {**_T5_SMALL, "d_model": 2048, "d_ff": 5120, "num_layers": 24, "num_heads": 32,
                   "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
    "byt5-small": {**_T5_SMALL, "vocab_size": 384, "d_model": 1472, "d_ff": 3584, "num_layers": 12,
                   "num_decoder_layers": 4, "num_heads": 6, "feed_forward_proj": "gated-gelu",
                   "tie_word_embeddings": False},
}

T5 = Family(
    name="t5",
    description="T5, T5 v1.1 / Flan-T5, mT5, ByT5 and UMT5 (relative position bias, RMSNorm, pre-LN)",
    config_map=T5_CONFIG,
    weight_map=T5_WEIGHTS,
    aliases=("flan-t5", "t5-v1.1", "mt5", "byt5", "umt5"),
    architectures=("T5ForConditionalGeneration", "MT5ForConditionalGeneration", "UMT5ForConditionalGeneration"),
    model_types=("t5", "mt5", "umt5"),
    hf_class="AutoModelForSeq2SeqLM",
    presets=PRESETS,
    output_embedding=("lm_head.weight", "shared.weight"),
)


@hookimpl
def encdec_families():
    return [T5]
