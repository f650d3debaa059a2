"""EncDecConfig and ConfigMap: the softmax-scale rule, validation and error messages."""
from __future__ import annotations

import json
import math

import pytest

from encdec_core.config import ConfigMap, EncDecConfig, read_json
from encdec_core.errors import ConfigError, EncDecError
from encdec_t5.plugin import T5, get_offset_q_scaling

BASE = dict(family="x", vocab_size=11, d_model=8, encoder_layers=1, decoder_layers=1, encoder_heads=2,
            decoder_heads=2, head_dim=4, encoder_ffn_dim=16, decoder_ffn_dim=16)

HEAD_DIMS = [1, 2, 3, 5, 6, 7, 8, 10, 13, 24, 48, 63, 64, 80, 96, 100, 128, 256]


# ------------------------------------------------------------------------------ softmax scale
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_t5_net_softmax_scale_is_exactly_one(head_dim):
    """T5 applies no softmax scale: get_offset_q_scaling = 1/sqrt(head_dim) gives a net scale of 1.0
    exactly (==, not approx), for square and non-square head dims alike."""
    q = get_offset_q_scaling({"d_kv": head_dim})
    assert q == 1.0 / math.sqrt(head_dim)
    cfg = EncDecConfig(**{**BASE, "head_dim": head_dim, "q_scaling": q})
    assert cfg.softmax_scale == 1.0
    assert type(cfg.softmax_scale) is float


@pytest.mark.parametrize("d_model,heads,d_kv", [(20, 3, 8), (512, 8, 64), (512, 6, 64), (1472, 6, 64),
                                                 (32, 4, 7), (768, 12, 80)])
def test_t5_family_config_scale_one_with_head_dim_not_d_model_over_heads(d_model, heads, d_kv):
    src = dict(model_type="t5", vocab_size=50, d_model=d_model, d_kv=d_kv, d_ff=64, num_layers=2,
               num_decoder_layers=3, num_heads=heads)
    cfg = T5.make_config(src)
    assert cfg.head_dim == d_kv and cfg.d_model == d_model
    assert cfg.softmax_scale == 1.0
    assert (cfg.encoder_layers, cfg.decoder_layers) == (2, 3)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_bart_like_q_scaling_one_gives_inverse_sqrt_head_dim(head_dim):
    cfg = EncDecConfig(**{**BASE, "head_dim": head_dim})  # q_scaling defaults to 1
    assert cfg.q_scaling == 1.0
    assert cfg.softmax_scale == pytest.approx(head_dim ** -0.5, rel=1e-11, abs=0)
    assert cfg.softmax_scale != 1.0 or head_dim == 1


def test_general_q_scaling_rule():
    cfg = EncDecConfig(**{**BASE, "head_dim": 64, "q_scaling": 2.0})
    assert cfg.softmax_scale == pytest.approx(1 / (2.0 * 8.0), rel=1e-12)


def test_attention_layers_receive_the_config_scale():
    from encdec_core.model import build_model

    t5 = build_model(EncDecConfig(**{**BASE, "head_dim": 5, "q_scaling": get_offset_q_scaling({"d_kv": 5})}),
                     meta=True)
    bart = build_model(EncDecConfig(**{**BASE, "head_dim": 5}), meta=True)
    for m, want in ((t5, 1.0), (bart, round(5 ** -0.5, 12))):
        layer = m.decoder.layers["0"]
        assert layer.self_attn.scale == want and layer.cross_attn.scale == want
        assert m.encoder.layers["0"].self_attn.scale == want


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("field,value,words", [
    ("d_model", 0, "a positive integer"),
    ("head_dim", -3, "a positive integer"),
    ("vocab_size", True, "a positive integer"),
    ("encoder_heads", 2.5, "a positive integer"),
    ("encoder_layers", -1, "non-negative"),
    ("decoder_layers", 0, "at least 1"),
    ("activation", "gelu2", "one of"),
    ("norm_type", "batch", "one of"),
    ("position_type", "rotary", "one of"),
    ("q_scaling", 0.0, "positive"),
])
def test_bad_field_names_field_value_and_expectation(field, value, words):
    with pytest.raises(ConfigError) as ei:
        EncDecConfig(**{**BASE, field: value})
    msg = str(ei.value)
    assert f"'{field}'" in msg and repr(value) in msg and words in msg
    assert isinstance(ei.value, EncDecError)


def test_to_dict_from_dict_round_trip_and_errors():
    cfg = EncDecConfig(**{**BASE, "extra": {"k": 1}, "forced_bos_token_id": 5})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert EncDecConfig.from_dict(d) == cfg
    with pytest.raises(ConfigError, match=r"ckpt/config.json: unknown field\(s\) \['bogus'\]"):
        EncDecConfig.from_dict({**d, "bogus": 1}, "ckpt/config.json")
    d.pop("d_model")
    with pytest.raises(ConfigError, match=r"ckpt/config.json: missing required field\(s\) \['d_model'\]"):
        EncDecConfig.from_dict(d, "ckpt/config.json")


# ------------------------------------------------------------------------------ ConfigMap
CM = ConfigMap(
    fields={"family": lambda s: "x", "vocab_size": "vocab", "d_model": ("hidden", "d_model"),
            "encoder_layers": "layers", "decoder_layers": "layers", "encoder_heads": "heads",
            "decoder_heads": "heads", "head_dim": lambda s: (s.get("hidden") or s["d_model"]) // s["heads"],
            "encoder_ffn_dim": "ffn", "decoder_ffn_dim": "ffn", "norm_eps": "eps"},
    constants={"norm_type": "rms"},
    defaults={"norm_eps": 1e-6},
)
SRC = dict(vocab=30, hidden=12, layers=2, heads=3, ffn=20)


def test_config_map_resolves_keys_tuples_callables_constants_defaults():
    cfg = CM.apply(SRC)
    assert (cfg.vocab_size, cfg.d_model, cfg.head_dim, cfg.norm_type, cfg.norm_eps) == (30, 12, 4, "rms", 1e-6)
    assert CM.apply({**SRC, "eps": 1e-5}).norm_eps == 1e-5
    # first present key of a tuple wins; None counts as absent
    assert CM.apply({**SRC, "hidden": None, "d_model": 12}).d_model == 12


def test_config_map_missing_fields_reported_together_with_the_file():
    src = dict(SRC)
    del src["vocab"], src["ffn"]
    with pytest.raises(ConfigError) as ei:
        CM.apply(src, "models/x/config.json")
    msg = str(ei.value)
    assert msg.startswith("models/x/config.json: missing field(s)")
    for name in ("vocab_size (from 'vocab')", "encoder_ffn_dim (from 'ffn')", "decoder_ffn_dim"):
        assert name in msg


def test_config_map_callable_failure_names_file_and_target():
    with pytest.raises(ConfigError) as ei:
        CM.apply({k: v for k, v in SRC.items() if k != "hidden"}, "m/config.json")
    msg = str(ei.value)
    assert msg.startswith("m/config.json: cannot derive 'head_dim': KeyError") and "d_model" in msg


def test_config_map_bad_value_names_file_and_field():
    with pytest.raises(ConfigError) as ei:
        CM.apply({**SRC, "heads": 0}, "m/config.json")
    msg = str(ei.value)
    # hidden // heads divides by zero before the heads field is checked: still a ConfigError
    assert msg.startswith("m/config.json: cannot derive 'head_dim': ZeroDivisionError")
    with pytest.raises(ConfigError, match=r"m/config.json: .*'encoder_heads' = -3"):
        CM.apply({**SRC, "heads": -3, "hidden": 12}, "m/config.json")


def test_t5_family_bad_source_fields(tmp_path):
    src = dict(model_type="t5", vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    with pytest.raises(ConfigError, match=r"a/config.json: field 'feed_forward_proj' = 'gated-gelu-x'"):
        T5.make_config({**src, "feed_forward_proj": "gated-gelu-x"}, "a/config.json")
    with pytest.raises(ConfigError, match=r"a/config.json: .*d_kv"):
        T5.make_config({k: v for k, v in src.items() if k != "d_kv"}, "a/config.json")
    for bad in (0, -2, 3.5, None):
        with pytest.raises(ConfigError, match=r"a/config.json: .*'d_kv' = "):
            T5.make_config({**src, "d_kv": bad}, "a/config.json")
    with pytest.raises(ConfigError, match=r"a/config.json: .*num_heads"):
        T5.make_config({k: v for k, v in src.items() if k != "num_heads"}, "a/config.json")


def test_read_json_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_json(tmp_path / "nope.json")
    p = tmp_path / "config.json"
    p.write_text('{"a": 1,\n "b": }')
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON \(.* line 2 column"):
        read_json(p)
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object at the top level, got list"):
        read_json(p)
    p.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_json(p)


@pytest.mark.parametrize("field,value,words", [
    ("norm_eps", "x", "a positive number"),
    ("norm_eps", 0.0, "a positive number"),
    ("embedding_scale", float("nan"), "a finite number"),
    ("output_scale", "1", "a finite number"),
    ("tie_lm_head", 1, "true or false"),
    ("encoder_pre_norm", "yes", "true or false"),
    ("max_position_embeddings", 0, "a positive integer"),
    ("relative_num_buckets", 2.0, "a positive integer"),
    ("position_offset", -1, "a non-negative integer"),
    ("src_vocab_size", 0, "a positive integer or null"),
    ("pad_token_id", 11, "a token id in [0, 11)"),
    ("eos_token_id", None, "a token id"),
    ("forced_bos_token_id", -1, "a token id"),
    ("decoder_start_token_id", "0", "a token id"),
    ("family", "", "a family name"),
    ("extra", [1], "an object"),
])
def test_bad_field_types_are_refused_at_construction(field, value, words):
    """Values that used to pass and fail later inside torch (a string epsilon, a token id past the
    vocabulary) are refused with the field, value and expectation."""
    with pytest.raises(ConfigError) as ei:
        EncDecConfig(**{**BASE, field: value})
    msg = str(ei.value)
    assert f"'{field}'" in msg and repr(value) in msg and words in msg


def test_from_dict_names_the_file_for_a_bad_value_and_a_non_object():
    d = EncDecConfig(**BASE).to_dict()
    with pytest.raises(ConfigError, match=r"^ckpt/config.json: EncDecConfig field 'd_model' = -1"):
        EncDecConfig.from_dict({**d, "d_model": -1}, "ckpt/config.json")
    with pytest.raises(ConfigError, match=r"^ckpt/config.json: the encdec config is list"):
        EncDecConfig.from_dict([1], "ckpt/config.json")


def test_config_map_rule_failure_names_the_source_fields_it_read():
    """A rule that fails on a value of the wrong type (AttributeError included) names the fields it
    read and their values; a missing one is named missing."""
    cm = ConfigMap(fields={**CM.fields, "activation": lambda s: s.get("act", "relu").split("-")[-1]},
                   constants=CM.constants, defaults=CM.defaults)
    with pytest.raises(ConfigError) as ei:
        cm.apply({**SRC, "act": 5}, "m/config.json")
    msg = str(ei.value)
    assert msg.startswith("m/config.json: cannot derive 'activation': AttributeError")
    assert msg.endswith("(from field 'act' = 5)")
    with pytest.raises(ConfigError) as ei:
        CM.apply({k: v for k, v in SRC.items() if k != "hidden"}, "m/config.json")
    assert "(from field 'hidden' missing, field 'd_model' missing)" in str(ei.value)
