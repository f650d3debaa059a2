"""WeightMap: every op, placeholders, conditions, and one report of every problem at once."""
from __future__ import annotations

import pytest
import torch

from encdec_core.errors import WeightError
from encdec_core.weights import OPS, Rule, WeightMap, rules


def t(*shape, start=0.0):
    n = 1
    for s in shape:
        n *= s
    return torch.arange(n, dtype=torch.float32).add(start).reshape(shape)


# ------------------------------------------------------------------------------ ops
def test_identity_and_transpose():
    wm = rules(("a.{i}.w", "x.{i}.w"), ("b.w", "y.w", "transpose"))
    out, rep = wm.apply({"a.0.w": t(2, 3), "a.12.w": t(1), "b.w": t(2, 3)})
    assert rep.ok
    assert torch.equal(out["x.0.w"], t(2, 3)) and torch.equal(out["x.12.w"], t(1))
    assert torch.equal(out["y.w"], t(2, 3).T) and out["y.w"].is_contiguous()


def test_fuse_concatenates_in_rule_order():
    wm = WeightMap([Rule(("l.{i}.q", "l.{i}.k", "l.{i}.v"), "l.{i}.qkv", "fuse")])
    q, k, v = t(2, 4), t(2, 4, start=100), t(2, 4, start=200)
    # source dict order must not matter: v first
    out, rep = wm.apply({"l.3.v": v, "l.3.q": q, "l.3.k": k})
    assert rep.ok and list(out) == ["l.3.qkv"]
    assert torch.equal(out["l.3.qkv"], torch.cat([q, k, v], 0))
    wm1 = WeightMap([Rule(("a", "b"), "ab", "fuse", dim=1)])
    out, _ = wm1.apply({"a": t(2, 1), "b": t(2, 3)})
    assert out["ab"].shape == (2, 4)


def test_split_into_equal_chunks():
    wm = WeightMap([Rule("in_proj.{i}", ("q.{i}", "k.{i}", "v.{i}"), "split")])
    src = t(6, 2)
    out, rep = wm.apply({"in_proj.0": src})
    assert rep.ok
    assert torch.equal(out["q.0"], src[:2]) and torch.equal(out["k.0"], src[2:4]) and torch.equal(out["v.0"], src[4:])
    wm1 = WeightMap([Rule("w", ("a", "b"), "split", dim=1)])
    out, _ = wm1.apply({"w": t(3, 4)})
    assert torch.equal(out["b"], t(3, 4)[:, 2:])


def test_scale_alias_drop():
    wm = rules(("s", "s2", "scale", {"factor": 0.5}),
               ("emb", ("enc.emb", "dec.emb", "head"), "alias"),
               ("buf.{name}", None, "drop"))
    out, rep = wm.apply({"s": t(3), "emb": t(2, 2), "buf._float_tensor": t(1), "buf.version": t(1)})
    assert rep.ok, rep.message()
    assert torch.equal(out["s2"], t(3) * 0.5)
    assert set(out) == {"s2", "enc.emb", "dec.emb", "head"}
    assert out["enc.emb"] is out["dec.emb"] is out["head"]


def test_the_op_set_is_closed_and_rules_are_checked():
    assert OPS == ("identity", "fuse", "split", "transpose", "scale", "alias", "drop")
    bad = [
        dict(source="a", target="b", op="rename"),
        dict(source=("a",), target="b", op="fuse"),
        dict(source=("a", "b"), target=("x", "y"), op="fuse"),
        dict(source="a", target="b", op="split"),
        dict(source="a", target="b", op="alias"),
        dict(source=("a", "b"), target="c", op="identity"),
        dict(source="a", target="b", op="drop"),
        dict(source="a", target=("b", "c"), op="transpose"),
        dict(source=(), target="b"),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            Rule(**kw)


# ------------------------------------------------------------------------------ placeholders
def test_placeholders_are_positional_never_every_digit():
    """T5: in encoder.block.{i}.layer.1 the `1` is a sub-layer slot, not a layer index."""
    wm = WeightMap([
        Rule("encoder.block.{i}.layer.0.SelfAttention.o.weight", "enc.{i}.attn_out"),
        Rule("encoder.block.{i}.layer.1.DenseReluDense.wo.weight", "enc.{i}.ffn_out"),
    ])
    src = {
        "encoder.block.1.layer.0.SelfAttention.o.weight": t(1, start=10),
        "encoder.block.0.layer.1.DenseReluDense.wo.weight": t(1, start=1),
        "encoder.block.1.layer.1.DenseReluDense.wo.weight": t(1, start=11),
        "encoder.block.0.layer.2.DenseReluDense.wo.weight": t(1, start=99),  # slot 2 is not slot 1
    }
    out, rep = wm.apply(src, strict=False)
    assert out["enc.1.attn_out"].item() == 10
    assert out["enc.0.ffn_out"].item() == 1 and out["enc.1.ffn_out"].item() == 11
    assert rep.unmatched == ["encoder.block.0.layer.2.DenseReluDense.wo.weight"]


def test_placeholder_kinds_and_repeats():
    wm = WeightMap([
        Rule("{side}.layers.{i}.{proj}_proj.weight", "{side}.{i}.{proj}"),
        Rule("tie.{i}.to.{i}", "tied.{i}"),  # a repeated placeholder must repeat the same value
    ])
    out, rep = wm.apply({
        "decoder.layers.7.q_proj.weight": t(1),
        "decoder.layers.x.q_proj.weight": t(1),  # {i} is numeric only
        "a.b.layers.1.q_proj.weight": t(1),  # {side} is one dotted component
        "tie.3.to.3": t(1),
        "tie.3.to.4": t(1),
    }, strict=False)
    assert set(out) == {"decoder.7.q", "tied.3"}
    assert sorted(rep.unmatched) == ["a.b.layers.1.q_proj.weight", "decoder.layers.x.q_proj.weight", "tie.3.to.4"]


def test_rules_are_ordered_first_match_consumes():
    wm = rules(("x.special", "special"), ("x.{name}", "generic.{name}"))
    out, rep = wm.apply({"x.special": t(1), "x.other": t(1)})
    assert set(out) == {"special", "generic.other"} and rep.ok


def test_when_conditions_read_config_flags():
    class Cfg:
        tie = True

    wm = WeightMap([Rule("lm_head", "lm_head", when="!tie"), Rule("lm_head", op="drop", when="tie")])
    out, rep = wm.apply({"lm_head": t(2)}, config=Cfg())
    assert out == {} and rep.ok
    Cfg.tie = False
    out, rep = wm.apply({"lm_head": t(2)}, config=Cfg())
    assert set(out) == {"lm_head"}


# ------------------------------------------------------------------------------ reports
def test_report_lists_every_problem_at_once():
    wm = WeightMap([
        Rule(("l.{i}.q", "l.{i}.k", "l.{i}.v"), "l.{i}.qkv", "fuse"),
        Rule("l.{i}.o", "l.{i}.out"),
        Rule("w", ("a", "b", "c"), "split"),
        Rule("extra", "not_in_model"),
    ])
    src = {
        "l.0.q": t(2, 4), "l.0.k": t(2, 4), "l.0.v": t(2, 4), "l.0.o": t(4, 3),  # o has the wrong shape
        "l.1.q": t(2, 4), "l.1.k": t(2, 4),  # v missing: the group stays unmatched
        "w": t(4, 2),  # 4 rows do not split in 3
        "stray.tensor": t(1),
        "extra": t(1),
    }
    expected = {"l.0.qkv": (6, 4), "l.0.out": (4, 4), "l.1.qkv": (6, 4), "l.1.out": (4, 4),
                "a": (1, 2), "b": (1, 2), "c": (1, 2)}
    rep = wm.validate(src, expected)
    assert not rep.ok
    assert sorted(rep.unmatched) == sorted(["l.1.q", "l.1.k", "stray.tensor",
                                            "not_in_model (produced, but the model has no such parameter)"])
    assert rep.unfilled == ["l.1.qkv", "l.1.out", "a", "b", "c"]
    assert any("l.0.out has (4, 3), expected (4, 4) (from l.0.o (4, 3))" in e for e in rep.shape_errors)
    assert any("w (4, 2) cannot be split in 3" in e for e in rep.shape_errors)
    with pytest.raises(WeightError) as ei:
        wm.apply(src, expected, source="models/x/model.safetensors")
    msg = str(ei.value)
    assert msg.startswith("models/x/model.safetensors: ")
    for name in ("l.1.q", "l.1.k", "stray.tensor", "not_in_model", "l.1.qkv", "l.1.out", "l.0.out", "w (4, 2)"):
        assert name in msg, name
    assert "matched no rule" in msg and "missing from the source" in msg and "wrong shape" in msg


def test_shape_problems_in_ops_are_reported_not_raised_from_torch():
    wm = WeightMap([
        Rule(("q", "k"), "qk", "fuse"),  # trailing dims differ: torch.cat would raise
        Rule("vec", "vt", "transpose"),  # a 1-D tensor has no last two dims
        Rule("scalar", ("s1", "s2"), "split"),  # a 0-D tensor has no dim to split
        Rule("m", ("m1", "m2"), "split", dim=2),  # dim out of range
    ])
    src = {"q": t(2, 4), "k": t(2, 5), "vec": t(3), "scalar": torch.tensor(1.0), "m": t(2, 2)}
    rep = wm.validate(src, {"qk": (4, 4), "vt": (3,), "s1": (), "s2": (), "m1": (1, 2), "m2": (1, 2)})
    assert len(rep.shape_errors) == 4, rep.shape_errors
    assert "q (2, 4)" in rep.shape_errors[0] and "k (2, 5)" in rep.shape_errors[0]
    assert "vec (3,)" in rep.shape_errors[1]
    assert "scalar ()" in rep.shape_errors[2] and "m (2, 2)" in rep.shape_errors[3]
    with pytest.raises(WeightError):
        wm.apply({"q": t(2, 4), "k": t(2, 5), "vec": t(3)}, {"qk": (4, 4), "vt": (3,)})


def test_non_strict_returns_partial_output():
    wm = rules(("a", "A"))
    out, rep = wm.apply({"a": t(1), "b": t(1)}, {"A": (1,), "B": (1,)}, strict=False)
    assert set(out) == {"A"} and rep.unmatched == ["b"] and rep.unfilled == ["B"]


# ------------------------------------------------------------------------------ the T5 map on a real state dict
def test_t5_map_reports_missing_extra_and_wrong_shape_together(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    from conftest import make_registry
    from encdec_core.convert import convert

    cfg = transformers.T5Config(vocab_size=40, d_model=12, d_kv=5, d_ff=20, num_layers=2, num_decoder_layers=1,
                                num_heads=2, relative_attention_num_buckets=8)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "src")
    f = tmp_path / "src" / "model.safetensors"
    sd = load_file(str(f))
    del sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    sd["encoder.block.0.layer.0.SelfAttention.o.weight"] = torch.zeros(12, 9)
    sd["decoder.block.0.layer.1.EncDecAttention.extra_gate.weight"] = torch.zeros(3)
    save_file(sd, str(f))
    with pytest.raises(WeightError) as ei:
        convert(tmp_path / "src", tmp_path / "out", reg=make_registry("encdec_t5.plugin"))
    msg = str(ei.value)
    assert str(tmp_path / "src") in msg
    assert "decoder.block.0.layer.1.EncDecAttention.extra_gate.weight" in msg
    assert "encoder.layers.1.ffn.wo.weight" in msg
    assert "encoder.layers.0.self_attn.out.weight has (12, 9), expected (12, 10)" in msg
    assert not (tmp_path / "out").exists()
