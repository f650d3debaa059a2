"""EncDecConfig: one typed, frozen description of every supported architecture.

The core reads only this record; no code branches on a family name. A family turns its source
config (HF config.json, a fairseq checkpoint's args) into an EncDecConfig through a ConfigMap.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "silu", "swish", "tanh")
NORMS = ("layer", "rms")
POSITIONS = ("relative", "learned", "sinusoidal", "none")


def source_activation(src: dict, field: str, default: str) -> str:
    """The activation named by a source config's ``field`` (``default`` when absent), checked
    against the ones the core implements."""
    act = src.get(field, default)
    if act not in ACTIVATIONS:
        raise ConfigError(f"field '{field}' = {act!r}: expected one of {', '.join(ACTIVATIONS)}")
    return act


@dataclass(frozen=True)
class EncDecConfig:
    family: str
    vocab_size: int  # decoder (target) vocabulary: rows of the lm_head
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    head_dim: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    src_vocab_size: int | None = None  # encoder vocabulary when it differs (fairseq NMT)
    activation: str = "relu"
    gated_ffn: bool = False
    norm_type: str = "layer"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    encoder_pre_norm: bool = False
    decoder_pre_norm: bool = False
    encoder_final_norm: bool = False
    decoder_final_norm: bool = False
    layernorm_embedding: bool = False
    linear_bias: bool = True
    position_type: str = "learned"
    max_position_embeddings: int = 1024
    position_offset: int = 0  # learned table row of position 0 (BART: 2)
    position_padding_aware: bool = False  # fairseq: positions = cumsum(non_pad) + pad
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    relative_bias_per_layer: bool = False  # UMT5: a table in every layer
    embedding_scale: float = 1.0
    shared_embeddings: bool = True  # encoder and decoder share the token embedding
    tie_lm_head: bool = True  # lm_head is the decoder token embedding
    output_scale: float = 1.0  # multiplies the decoder output before the lm_head
    final_logits_bias: bool = False
    q_scaling: float = 1.0  # softmax scale = 1 / (q_scaling * sqrt(head_dim))
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int | None = None
    decoder_start_token_id: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # family data the core never reads

    def __post_init__(self) -> None:
        def bad(name, value, expected):
            raise ConfigError(f"EncDecConfig field '{name}' = {value!r}: expected {expected}")

        for name in ("vocab_size", "d_model", "encoder_heads", "decoder_heads", "head_dim",
                     "encoder_ffn_dim", "decoder_ffn_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, v, "a positive integer")
        for name in ("encoder_layers", "decoder_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                bad(name, v, "a non-negative integer")
        if self.decoder_layers < 1:
            bad("decoder_layers", self.decoder_layers, "at least 1")
        if self.activation not in ACTIVATIONS:
            bad("activation", self.activation, f"one of {ACTIVATIONS}")
        if self.norm_type not in NORMS:
            bad("norm_type", self.norm_type, f"one of {NORMS}")
        if self.position_type not in POSITIONS:
            bad("position_type", self.position_type, f"one of {POSITIONS}")

        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not number(self.q_scaling) or self.q_scaling <= 0:
            bad("q_scaling", self.q_scaling, "a positive number")
        if not number(self.norm_eps) or self.norm_eps <= 0:
            bad("norm_eps", self.norm_eps, "a positive number")
        for name in ("embedding_scale", "output_scale"):
            if not number(getattr(self, name)):
                bad(name, getattr(self, name), "a finite number")
        if not isinstance(self.family, str) or not self.family:
            bad("family", self.family, "a family name")
        for f in fields(self):
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                bad(f.name, getattr(self, f.name), "true or false")
        for name in ("max_position_embeddings", "relative_num_buckets", "relative_max_distance"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, v, "a positive integer")
        v = self.position_offset
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            bad("position_offset", v, "a non-negative integer")
        if self.src_vocab_size is not None and (not isinstance(self.src_vocab_size, int)
                                                or isinstance(self.src_vocab_size, bool) or self.src_vocab_size <= 0):
            bad("src_vocab_size", self.src_vocab_size, "a positive integer or null")
        # token ids index the embeddings: out of range, they would fail deep inside torch
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id", "bos_token_id",
                     "forced_bos_token_id", "forced_eos_token_id"):
            v = getattr(self, name)
            if v is None and name not in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.vocab_size:
                bad(name, v, f"a token id in [0, {self.vocab_size}) (vocab_size {self.vocab_size})")
        if not isinstance(self.extra, Mapping):
            bad("extra", self.extra, "an object")

    # ------------------------------------------------------------ derived
    @property
    def softmax_scale(self) -> float:
        """The one place the attention scale is decided (TensorRT-LLM's convention)."""
        # rounded to 12 digits so T5's q_scaling = 1/sqrt(head_dim) gives exactly 1.0
        return round(1.0 / (self.q_scaling * math.sqrt(self.head_dim)), 12)

    @property
    def encoder_vocab_size(self) -> int:
        return self.src_vocab_size or self.vocab_size

    def heads(self, side: str) -> int:
        return self.encoder_heads if side == "encoder" else self.decoder_heads

    def ffn_dim(self, side: str) -> int:
        return self.encoder_ffn_dim if side == "encoder" else self.decoder_ffn_dim

    def num_layers(self, side: str) -> int:
        return self.encoder_layers if side == "encoder" else self.decoder_layers

    def pre_norm(self, side: str) -> bool:
        return self.encoder_pre_norm if side == "encoder" else self.decoder_pre_norm

    def final_norm(self, side: str) -> bool:
        return self.encoder_final_norm if side == "encoder" else self.decoder_final_norm

    def replace(self, **kw) -> "EncDecConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------ io
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "EncDecConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: the encdec config is {type(d).__name__}, expected an object of fields")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown} in the encdec config")
        missing = [f.name for f in fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in d]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {missing}")
        try:
            return cls(**d)
        except (ConfigError, TypeError) as exc:  # name the file, not only the field
            raise ConfigError(f"{source}: {exc}") from None


_REQUIRED = object()


@dataclass(frozen=True)
class ConfigMap:
    """Source config (a dict) -> EncDecConfig, as data.

    ``fields`` maps a target field to either a source key, a tuple of source keys (first present
    wins), or a callable ``f(src: dict) -> value``. ``constants`` are fixed values for the family.
    ``defaults`` apply when no source key is present. Missing required values are reported all
    together, naming the file.
    """

    fields: Mapping[str, Any]
    constants: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def apply(self, src: Mapping[str, Any], source: str = "config.json") -> EncDecConfig:
        out: dict[str, Any] = dict(self.constants)
        missing = []
        for target, rule in self.fields.items():
            seen = _Reads(src)
            try:
                value = _resolve(rule, seen)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
            except (KeyError, TypeError, ValueError, ArithmeticError, AttributeError, IndexError) as exc:
                raise ConfigError(f"{source}: cannot derive '{target}': {type(exc).__name__}: {exc}"
                                  f"{seen.describe()}") from None
            if value is _REQUIRED:
                if target in self.defaults:
                    value = self.defaults[target]
                else:
                    missing.append(f"{target} (from {rule!r})" if not callable(rule) else target)
                    continue
            out[target] = value
        if missing:
            raise ConfigError(f"{source}: missing field(s): {', '.join(missing)}")
        for k, v in self.defaults.items():
            out.setdefault(k, v)
        try:
            return EncDecConfig(**out)
        except (ConfigError, TypeError) as exc:  # name the source file, not only the field
            raise ConfigError(f"{source}: {exc}") from None


class _Reads(dict):
    """The source config, noting which keys a field's rule reads (for the error message)."""

    def __init__(self, src):
        super().__init__(src)
        self.keys_read: list = []

    def _note(self, key):
        if key not in self.keys_read:
            self.keys_read.append(key)

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)

    def __contains__(self, key):
        self._note(key)
        return super().__contains__(key)

    def describe(self) -> str:
        """" (from field 'a' = 1, field 'b' missing)" for the keys read, or ""."""
        parts = []
        for k in self.keys_read[:6]:
            if dict.__contains__(self, k):
                v = repr(dict.__getitem__(self, k))
                parts.append(f"field {k!r} = {v if len(v) <= 60 else v[:57] + '...'}")
            else:
                parts.append(f"field {k!r} missing")
        return f" (from {', '.join(parts)})" if parts else ""


def _resolve(rule, src):
    if callable(rule):
        v = rule(src)
        return _REQUIRED if v is None else v
    keys = rule if isinstance(rule, tuple) else (rule,)
    for k in keys:
        if k in src and src[k] is not None:
            return src[k]
    return _REQUIRED


def read_json(path: Path, what: str = "config") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data
