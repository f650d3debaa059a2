"""MarianMT (Helsinki-NLP opus-mt) as an encdec family, written only against encdec_core's public
pieces: a ConfigMap, a WeightMap, a read_source hook and one pluggy hook implementation.

How Marian maps onto EncDecConfig
---------------------------------
* post-LN Transformer (``normalize_before`` is ignored by HF's Marian: always post-LN), LayerNorm
  eps 1e-5, biases on every linear, no layernorm_embedding, no final norms;
* token embeddings scaled by sqrt(d_model) when ``scale_embedding`` (true for opus-mt);
* sinusoidal positions in Marian's own layout (frequency 1/10000^(2j/d), [sin | cos], first
  position 0). The core's ``sinusoidal`` position type is fairseq's (a different frequency and
  positions from pad + 1), so this family materialises Marian's table and loads it as a *learned*
  position table with offset 0: the lookup is then exactly Marian's;
* one vocabulary shared by encoder, decoder and the (tied) lm_head, plus final_logits_bias;
* decoding starts from the pad token; EOS is 0.

Limits: checkpoints with ``share_encoder_decoder_embeddings: false`` or a separate
``decoder_vocab_size`` (a few multilingual opus-mt models) are refused with a clear message.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from encdec_core.config import ConfigMap
from encdec_core.errors import ConfigError
from encdec_core.family import Family, Source, read_hf_source
from encdec_core.plugins import hookimpl
from encdec_core.weights import Rule, WeightMap

_ACTIVATIONS = {"swish": "silu", "silu": "silu", "gelu": "gelu", "relu": "relu", "gelu_new": "gelu_new",
                "gelu_fast": "gelu_fast", "gelu_pytorch_tanh": "gelu_pytorch_tanh", "tanh": "tanh"}


def _activation(src: dict) -> str:
    act = src.get("activation_function", "gelu")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"field 'activation_function' = {act!r}: expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[act]


def _head_dim(side: str):
    def rule(src: dict) -> int:
        d, h = src["d_model"], src[f"{side}_attention_heads"]
        if not isinstance(h, int) or h <= 0 or d % h:
            raise ConfigError(f"field '{side}_attention_heads' = {h!r}: expected a positive divisor of "
                              f"d_model ({d})")
        return d // h
    return rule


def _shared_vocab(src: dict) -> int:
    v = src["vocab_size"]
    if src.get("share_encoder_decoder_embeddings", True) is False:
        raise ConfigError("field 'share_encoder_decoder_embeddings' = false: this example family supports "
                          "only Marian models with one shared vocabulary")
    dv = src.get("decoder_vocab_size")
    if dv not in (None, v):
        raise ConfigError(f"field 'decoder_vocab_size' = {dv!r}: expected the same as vocab_size ({v})")
    return v


MARIAN_CONFIG = ConfigMap(
    fields={
        "vocab_size": _shared_vocab,
        "d_model": "d_model",
        "encoder_layers": "encoder_layers",
        "decoder_layers": "decoder_layers",
        "encoder_heads": "encoder_attention_heads",
        "decoder_heads": "decoder_attention_heads",
        "head_dim": _head_dim("encoder"),
        "encoder_ffn_dim": "encoder_ffn_dim",
        "decoder_ffn_dim": "decoder_ffn_dim",
        "activation": _activation,
        "max_position_embeddings": "max_position_embeddings",
        "embedding_scale": lambda s: math.sqrt(s["d_model"]) if s.get("scale_embedding") else 1.0,
        "pad_token_id": "pad_token_id",
        "eos_token_id": lambda s: s["eos_token_id"][0] if isinstance(s.get("eos_token_id"), list) else s.get("eos_token_id"),
        "decoder_start_token_id": ("decoder_start_token_id", "pad_token_id"),
        "forced_eos_token_id": "forced_eos_token_id",
        "family": lambda s: "marian",
    },
    constants={
        "gated_ffn": False,
        "norm_type": "layer",
        "norm_eps": 1e-5,
        "encoder_pre_norm": False,
        "decoder_pre_norm": False,
        "linear_bias": True,
        "position_type": "learned",
        "position_offset": 0,
        "shared_embeddings": True,
        "tie_lm_head": True,
        "final_logits_bias": True,
        "q_scaling": 1.0,
    },
    defaults={"max_position_embeddings": 512, "eos_token_id": 0, "forced_eos_token_id": None},
)


def _weight_map() -> WeightMap:
    r = [
        Rule("model.shared.weight", "shared.weight"),
        Rule("model.{side}.embed_tokens.weight", op="drop"),  # the same tensor as model.shared
        Rule("lm_head.weight", op="drop"),  # tied to the shared embedding
        Rule("final_logits_bias", "final_logits_bias"),
        Rule("model.{side}.embed_positions.weight", "{side}.embed_positions.weight"),
    ]
    for side in ("encoder", "decoder"):
        src, dst = f"model.{side}.layers.{{i}}", f"{side}.layers.{{i}}"
        r += [
            Rule(tuple(f"{src}.self_attn.{x}_proj.{{w}}" for x in "qkv"), f"{dst}.self_attn.qkv.{{w}}", "fuse"),
            Rule(f"{src}.self_attn.out_proj.{{w}}", f"{dst}.self_attn.out.{{w}}"),
            Rule(f"{src}.self_attn_layer_norm.{{w}}", f"{dst}.self_attn_norm.{{w}}"),
            Rule(f"{src}.fc1.{{w}}", f"{dst}.ffn.wi.{{w}}"),
            Rule(f"{src}.fc2.{{w}}", f"{dst}.ffn.wo.{{w}}"),
            Rule(f"{src}.final_layer_norm.{{w}}", f"{dst}.ffn_norm.{{w}}"),
        ]
    d = "model.decoder.layers.{i}"
    r += [
        Rule(f"{d}.encoder_attn.q_proj.{{w}}", "decoder.layers.{i}.cross_attn.q.{w}"),
        Rule((f"{d}.encoder_attn.k_proj.{{w}}", f"{d}.encoder_attn.v_proj.{{w}}"),
             "decoder.layers.{i}.cross_attn.kv.{w}", "fuse"),
        Rule(f"{d}.encoder_attn.out_proj.{{w}}", "decoder.layers.{i}.cross_attn.out.{w}"),
        Rule(f"{d}.encoder_attn_layer_norm.{{w}}", "decoder.layers.{i}.cross_attn_norm.{w}"),
    ]
    return WeightMap(r)


MARIAN_WEIGHTS = _weight_map()


def marian_sinusoids(n_pos: int, dim: int) -> torch.Tensor:
    """Marian's table: angle pos / 10000^(2*(j//2)/dim); sin of the even columns, then cos of the odd."""
    j = np.arange(dim)
    angle = np.arange(n_pos)[:, None] / np.power(10000, 2 * (j // 2) / dim)[None, :]
    sentinel = dim // 2 if dim % 2 == 0 else dim // 2 + 1
    out = torch.empty(n_pos, dim, dtype=torch.float32)
    out[:, :sentinel] = torch.FloatTensor(np.sin(angle[:, 0::2]))
    out[:, sentinel:] = torch.FloatTensor(np.cos(angle[:, 1::2]))
    return out


def read_marian_source(path: Path, family: Family) -> Source:
    """An HF Marian folder. Recent transformers do not save the (fixed) position tables and keep
    final_logits_bias as [1, V]: fill in the tables and flatten the bias before the WeightMap runs."""
    src = read_hf_source(Path(path), family)
    tensors = dict(src.tensors)
    cfg = src.config
    for side in ("encoder", "decoder"):
        key = f"model.{side}.embed_positions.weight"
        if key not in tensors:
            tensors[key] = marian_sinusoids(cfg.max_position_embeddings, cfg.d_model)
    bias = tensors.get("final_logits_bias")
    if bias is not None and bias.dim() == 2 and bias.shape[0] == 1:
        tensors["final_logits_bias"] = bias.reshape(-1)
    elif bias is None:
        tensors["final_logits_bias"] = torch.zeros(cfg.vocab_size)
    src.tensors = tensors
    return src


_OPUS_MT_EN_DE = dict(model_type="marian", architectures=["MarianMTModel"], vocab_size=58101, d_model=512,
                      encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
                      encoder_ffn_dim=2048, decoder_ffn_dim=2048, activation_function="swish",
                      scale_embedding=True, max_position_embeddings=512, pad_token_id=58100,
                      decoder_start_token_id=58100, eos_token_id=0, forced_eos_token_id=0)

MARIAN = Family(
    name="marian",
    description="MarianMT / Helsinki-NLP opus-mt (example third-party family)",
    config_map=MARIAN_CONFIG,
    weight_map=MARIAN_WEIGHTS,
    aliases=("opus-mt",),
    architectures=("MarianMTModel",),
    model_types=("marian",),
    read_source=read_marian_source,
    hf_class="MarianMTModel",
    presets={"opus-mt-en-de": _OPUS_MT_EN_DE},
)


@hookimpl
def encdec_families():
    return [MARIAN]
