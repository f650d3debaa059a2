"""convert refuses weights it would store wrongly: integer / bool source tensors that a fuse or scale
rule (or a LoRA merge) would promote to float, NaN / inf weights, and values that overflow the
target dtype (1e6 in float16); each named by its source tensor, with no checkpoint written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from _cli_helpers import make_t5_dir
from encdec_core.convert import convert
from encdec_core.errors import WeightError
from encdec_core.weights import Rule, WeightMap

Q = "decoder.block.1.layer.0.SelfAttention.q.weight"  # fused into qkv with k and v
WI = "encoder.block.0.layer.1.DenseReluDense.wi.weight"  # a plain (identity) rule


@pytest.fixture(scope="module")
def reg():
    from conftest import make_registry

    return make_registry("encdec_t5.plugin", "encdec_lora.plugin")


@pytest.fixture(scope="module")
def t5_src(tmp_path_factory):
    return make_t5_dir(tmp_path_factory.mktemp("values") / "hf-t5")


def _edited(src: Path, out: Path, edit) -> Path:
    """A copy of the HF folder ``src`` with its safetensors edited by ``edit(tensors)``."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    t = load_file(str(src / "model.safetensors"))
    edit(t)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ------------------------------------------------------------------ the WeightMap names the source
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_weightmap_refuses_integer_sources_of_fuse_and_scale(dtype):
    wm = WeightMap([Rule(("l.q", "l.k"), "l.qk", "fuse"), Rule("emb", "shared", "scale", factor=2.0),
                    Rule("plain", "p"), Rule("buf", op="drop")])
    src = {"l.q": torch.ones(2, 3).to(dtype), "l.k": torch.ones(2, 3), "emb": torch.ones(4).to(dtype),
           "plain": torch.ones(1), "buf": torch.ones(1, dtype=torch.int64)}
    with pytest.raises(WeightError) as e:
        wm.apply(src, source="m/model.safetensors")
    name = str(dtype).replace("torch.", "")
    msg = str(e.value)
    assert msg.startswith("m/model.safetensors: ")
    assert f"l.q ({name})" in msg and f"emb ({name})" in msg and "2 source tensor(s) of a non-floating dtype" in msg
    assert "l.k" not in msg and "buf" not in msg  # a float partner and a dropped buffer are fine
    rep = wm.validate(src, None)
    assert not rep.ok and len(rep.dtype_errors) == 2
    assert rep.origin == {"l.qk": ("l.q", "l.k"), "shared": ("emb",), "p": ("plain",)}


def test_convert_refuses_integer_tensor_of_a_fused_qkv(tmp_path, t5_src, reg):
    src = _edited(t5_src, tmp_path / "src", lambda t: t.__setitem__(Q, t[Q].to(torch.int32)))
    with pytest.raises(WeightError, match=rf"{Q} \(int32\).*expected float32, float16 or bfloat16"):
        convert(src, tmp_path / "ck", reg=reg)
    assert not (tmp_path / "ck").exists() and not list(tmp_path.glob(".ck.tmp-*"))


# ------------------------------------------------------------------ NaN / inf / overflow
@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "inf")])
def test_convert_refuses_non_finite_weights(tmp_path, t5_src, reg, bad, word):
    def edit(t):
        t[Q][0, 1] = bad
        t[WI][2, 0] = bad

    src = _edited(t5_src, tmp_path / "src", edit)
    with pytest.raises(WeightError) as e:
        convert(src, tmp_path / "ck", reg=reg)
    msg = str(e.value)
    assert msg.startswith(f"{src}: ")
    assert f"{Q} (our decoder.layers.1.self_attn.qkv.weight) holds {word} values" in msg
    assert f"{WI} (our encoder.layers.0.ffn.wi.weight) holds {word} values" in msg
    assert "bfloat16" not in msg  # not a range problem
    assert not (tmp_path / "ck").exists()


def test_float16_overflow_refused_bfloat16_suggested(tmp_path, t5_src, reg):
    src = _edited(t5_src, tmp_path / "src", lambda t: t[Q].__setitem__((0, 0), -1e6))
    with pytest.raises(WeightError) as e:
        convert(src, tmp_path / "ck", dtype="float16", reg=reg)
    msg = str(e.value)
    assert f"{Q} (our decoder.layers.1.self_attn.qkv.weight): largest |value| 1e+06 exceeds float16's limit 65504" \
        in msg
    assert "k.weight" not in msg  # only the fused source at fault is named
    assert "--dtype bfloat16" in msg
    assert not (tmp_path / "ck").exists()
    # bfloat16 holds it; float32 too
    convert(src, tmp_path / "ck-bf16", dtype="bfloat16", reg=reg)
    convert(src, tmp_path / "ck-fp32", dtype="float32", reg=reg)


def test_float16_limit_is_the_cast_not_the_max(tmp_path, t5_src, reg):
    """65519 rounds to 65504 (kept); 65520 rounds to inf (refused)."""
    ok = _edited(t5_src, tmp_path / "ok", lambda t: t[WI].__setitem__((0, 0), 65519.0))
    convert(ok, tmp_path / "ck-ok", dtype="float16", reg=reg)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "ck-ok" / "rank0.safetensors"))["encoder.layers.0.ffn.wi.weight"]
    assert stored[0, 0].item() == 65504.0 and torch.isfinite(stored).all()
    over = _edited(t5_src, tmp_path / "over", lambda t: t[WI].__setitem__((0, 0), 65520.0))
    with pytest.raises(WeightError, match=re.escape("largest |value| 65520 exceeds float16's limit 65504")):
        convert(over, tmp_path / "ck-over", dtype="float16", reg=reg)


# ------------------------------------------------------------------ a LoRA merge does not bypass them
def _lora(out: Path, base: Path, edit=None) -> Path:
    """A peft-format LoRA adapter of the T5 in ``base`` on every q (A and B random)."""
    import json

    from safetensors.torch import load_file, save_file

    cfg = json.loads((base / "config.json").read_text())
    d, inner = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"]
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"], "bias": "none",
         "task_type": "SEQ_2_SEQ_LM"}))
    g = torch.Generator().manual_seed(0)
    t = {}
    for key in load_file(str(base / "model.safetensors")):
        if key.endswith("SelfAttention.q.weight") or key.endswith("EncDecAttention.q.weight"):
            m = "base_model.model." + key[: -len(".weight")]
            t[f"{m}.lora_A.weight"] = torch.randn(2, d, generator=g)
            t[f"{m}.lora_B.weight"] = torch.randn(inner, 2, generator=g)
    if edit:
        edit(t)
    save_file(t, str(out / "adapter_model.safetensors"))
    return out


def test_lora_merge_cannot_hide_an_integer_base_tensor(tmp_path, t5_src, reg):
    src = _edited(t5_src, tmp_path / "src", lambda t: t.__setitem__(Q, t[Q].to(torch.int32)))
    lora = _lora(tmp_path / "lora", src)
    with pytest.raises(WeightError, match=rf"{Q} \(int32\)"):
        convert(src, tmp_path / "ck", reg=reg, adapters=[lora])
    assert not (tmp_path / "ck").exists()


def test_lora_merge_with_nan_or_overflow_refused_naming_the_adapter(tmp_path, t5_src, reg):
    module = "base_model.model." + Q[: -len(".weight")]
    lora = _lora(tmp_path / "lora", t5_src, lambda t: t[f"{module}.lora_B.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(WeightError) as e:
        convert(t5_src, tmp_path / "ck", reg=reg, adapters=[lora])
    msg = str(e.value)
    assert f"{Q} (our decoder.layers.1.self_attn.qkv.weight) (changed by the adapter {lora}:" in msg
    assert "holds NaN values" in msg
    big = _lora(tmp_path / "big", t5_src, lambda t: t[f"{module}.lora_B.weight"].__setitem__((0, 0), 1e9))
    with pytest.raises(WeightError, match="exceeds float16's limit 65504"):
        convert(t5_src, tmp_path / "ck", dtype="float16", reg=reg, adapters=[big])
    assert not (tmp_path / "ck").exists()
    convert(t5_src, tmp_path / "ck", reg=reg, adapters=[_lora(tmp_path / "fine", t5_src)])  # a sane adapter merges


def test_runtime_lora_factors_must_be_finite(tmp_path, t5_src, reg):
    module = "base_model.model." + Q[: -len(".weight")]
    lora = _lora(tmp_path / "lora", t5_src, lambda t: t[f"{module}.lora_A.weight"].__setitem__((1, 0), float("inf")))
    with pytest.raises(WeightError) as e:
        convert(t5_src, tmp_path / "ck", reg=reg, adapters=[lora], adapter_mode="runtime")
    assert str(e.value).startswith(f"{lora}: ") and f"{Q[: -len('.weight')]}.lora_A holds inf values" in str(e.value)
    assert not (tmp_path / "ck").exists()
