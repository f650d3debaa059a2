"""BART / mBART family: registry, config and weight mapping, teacher-forced parity with HF,
tokenizer language codes, checkpoint conversion (incl. TP=2 with an odd vocabulary)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from _bart_helpers import load_hf, one_thread, pad_batch, rewrite_config, tiny, tokenizer_dir
from conftest import make_registry
from encdec_core.errors import ConfigError, EncDecError, WeightError

PLUGIN = "encdec_bart.plugin"
TEXTS = ["The house is wonderful.", "Le chat", "I like green apples and red cherries on the sofa."]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def reg():
    return make_registry(PLUGIN)


def _ours(path, reg, **kw):
    from encdec_core.convert import load_source_model

    return load_source_model(path, reg=reg, **kw)


def _tok(path):
    from encdec_bart.plugin import load_tokenizer

    return load_tokenizer(path)


def _batch(path, texts=TEXTS, src_lang=None):
    tok = _tok(path)
    return pad_batch(tok.encode(texts, src_lang=src_lang), tok.pad_token_id)


def _decoder_inputs(vocab: int, batch: int, t: int = 7, seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, t), generator=g)
    ids[:, 0] = 2  # decoder start </s>
    ids[:, -1] = vocab - 1  # the last (padding-only) row of the odd vocabulary is reachable too
    return ids


# ------------------------------------------------------------------------------------ registry
def test_registry_names_aliases_architectures(reg):
    assert reg.names() == ["bart", "mbart"]
    assert reg.get("bart-large-cnn").name == "bart"
    assert reg.get("BartForConditionalGeneration").name == "bart"
    assert reg.get("MBartForConditionalGeneration").name == "mbart"
    assert reg.get("mbart-large-50").name == "mbart"
    assert reg.get("mbart").hf_class == "MBartForConditionalGeneration"


def test_builtin_registry_detects_folders(builtin_registry, tmp_path_factory):
    assert builtin_registry.detect(tiny("bart", tmp_path_factory)).name == "bart"
    assert builtin_registry.detect(tiny("mbart", tmp_path_factory)).name == "mbart"


def test_presets_have_real_shapes(reg):
    bart, mbart = reg.get("bart"), reg.get("mbart")
    base = bart.make_config(bart.presets["bart-base"])
    assert (base.d_model, base.encoder_layers, base.decoder_heads, base.head_dim, base.vocab_size) == (
        768, 6, 12, 64, 50265)
    assert base.position_offset == 2 and base.layernorm_embedding and not base.encoder_pre_norm
    assert base.embedding_scale == 1.0 and base.final_logits_bias and base.tie_lm_head
    cnn = bart.make_config(bart.presets["bart-large-cnn"])
    assert (cnn.d_model, cnn.encoder_layers, cnn.encoder_ffn_dim, cnn.vocab_size) == (1024, 12, 4096, 50264)
    assert cnn.forced_bos_token_id == 0 and cnn.forced_eos_token_id == 2
    m50 = mbart.make_config(mbart.presets["mbart-large-50"])
    assert m50.vocab_size == 250054 and m50.embedding_scale == math.sqrt(1024)
    assert m50.encoder_pre_norm and m50.decoder_pre_norm and m50.encoder_final_norm and m50.decoder_final_norm
    assert m50.decoder_start_token_id == 2
    cc25 = mbart.make_config(mbart.presets["mbart-large-cc25"])
    assert cc25.vocab_size == 250027 and cc25.decoder_start_token_id == 0  # HF falls back to bos


@pytest.mark.parametrize("fam,preset", [("bart", "bart-base"), ("bart", "bart-large-cnn"), ("mbart", "mbart-large-50")])
def test_presets_build_hf_sized_models(fam, preset, reg):
    """Our model from a preset holds exactly as many numbers as HF's (parameters + final_logits_bias),
    both built on the meta device."""
    import transformers

    from encdec_core.model import build_model

    family = reg.get(fam)
    src = family.presets[preset]
    ours = sum(v.numel() for v in build_model(family.make_config(src), meta=True).state_dict().values())
    prefix = "MBart" if fam == "mbart" else "Bart"
    hf_cfg = getattr(transformers, f"{prefix}Config")(
        **{k: v for k, v in src.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        hf = getattr(transformers, family.hf_class)(hf_cfg)
    theirs = sum(p.numel() for p in hf.parameters()) + sum(b.numel() for b in hf.buffers())
    assert ours == theirs


def test_config_errors_name_the_field(reg):
    bart = reg.get("bart")
    src = dict(bart.presets["bart-base"], decoder_attention_heads=8)  # head size 96 vs 64
    with pytest.raises(ConfigError, match="decoder_attention_heads.*head size"):
        bart.make_config(src, "x/config.json")
    with pytest.raises(ConfigError, match=r"x/config.json.*'activation_function' = 'bogus'"):
        bart.make_config(dict(bart.presets["bart-base"], activation_function="bogus"), "x/config.json")
    with pytest.raises(ConfigError, match="encoder_attention_heads.*divisor"):
        bart.make_config(dict(bart.presets["bart-base"], encoder_attention_heads=7), "x/config.json")
    with pytest.raises(ConfigError, match="vocab_size"):
        bart.make_config({k: v for k, v in bart.presets["bart-base"].items() if k != "vocab_size"})


# ------------------------------------------------------------------------------------ weights
def test_weight_map_drops_tied_copies_and_reports_problems(reg, tmp_path_factory):
    from encdec_core.model import build_model

    fam = reg.get("bart")
    src = fam.read(tiny("bart", tmp_path_factory))
    expected = build_model(src.config, meta=True).expected_shapes()
    wm = fam.make_weight_map(src.config)
    state = dict(src.tensors)
    shared = state["model.shared.weight"]
    # old checkpoints carry copies of the shared table; all three are dropped when tied
    state.update({"model.encoder.embed_tokens.weight": shared, "model.decoder.embed_tokens.weight": shared,
                  "lm_head.weight": shared})
    out, report = wm.apply(state, expected, src.config, strict=False)
    assert report.ok, report.message()
    assert set(out) == set(expected)
    # BartModel-style names (no "model." prefix) map the same way
    bare = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    out2, report2 = wm.apply(bare, expected, src.config, strict=False)
    assert report2.ok and all(torch.equal(out[k], out2[k]) for k in out)
    # missing and unknown tensors are reported together, by full name
    broken = dict(state)
    del broken["model.decoder.layers.1.encoder_attn.v_proj.bias"]
    broken["model.decoder.layers.0.bogus.weight"] = shared
    with pytest.raises(WeightError) as err:
        wm.apply(broken, expected, src.config, source="ckpt")
    msg = str(err.value)
    assert "model.decoder.layers.1.encoder_attn.k_proj.bias" in msg  # its fuse group is incomplete
    assert "model.decoder.layers.0.bogus.weight" in msg
    assert "decoder.layers.1.cross_attn.kv.bias" in msg


def test_untied_embeddings_map_per_stack(reg, tmp_path_factory):
    """tie_word_embeddings=False (transformers v5): lm_head and each stack's embed_tokens are their own
    tensors; a file holding only `shared` + lm_head (saved while the stacks were tied to it) fills
    both stacks from `shared`."""
    from encdec_core.model import build_model

    fam = reg.get("bart")
    src = fam.read(tiny("bart_untied", tmp_path_factory))
    assert not src.config.shared_embeddings and not src.config.tie_lm_head
    expected = build_model(src.config, meta=True).expected_shapes()
    wm = fam.make_weight_map(src.config)
    state = dict(src.tensors)
    out, _ = wm.apply(state, expected, src.config)
    assert torch.equal(out["encoder.embed_tokens.weight"], state["model.encoder.embed_tokens.weight"])
    assert torch.equal(out["decoder.embed_tokens.weight"], state["model.decoder.embed_tokens.weight"])
    assert not torch.equal(out["encoder.embed_tokens.weight"], state["model.shared.weight"])
    del state["model.encoder.embed_tokens.weight"], state["model.decoder.embed_tokens.weight"]
    out, _ = wm.apply(state, expected, src.config)
    assert torch.equal(out["encoder.embed_tokens.weight"], state["model.shared.weight"])
    assert torch.equal(out["decoder.embed_tokens.weight"], state["model.shared.weight"])
    assert torch.equal(out["lm_head.weight"], state["lm_head.weight"])


def test_final_logits_bias_shape_error(reg, tmp_path_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(tiny("bart", tmp_path_factory), d)
    t = load_file(str(d / "model.safetensors"))
    t["final_logits_bias"] = torch.zeros(1, 7)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(WeightError, match=r"final_logits_bias.*\(1, 7\).*expected \(1, 321\)"):
        reg.get("bart").read(d)


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", ["bart", "bart_scaled", "bart_untied", "mbart"])
def test_teacher_forced_logits_match_hf(name, reg, tmp_path_factory):
    path = tiny(name, tmp_path_factory)
    model, src, fam = _ours(path, reg)
    hf = load_hf(path)
    cfg = src.config
    if name == "bart_scaled":
        assert cfg.embedding_scale == math.sqrt(36) and (cfg.encoder_layers, cfg.decoder_layers) == (3, 1)
        assert (cfg.encoder_ffn_dim, cfg.decoder_ffn_dim) == (44, 28)
    assert cfg.tie_lm_head == (name != "bart_untied")
    assert cfg.final_logits_bias and cfg.vocab_size % 2 == 1
    ids, mask = _batch(path, src_lang="de_DE" if name == "mbart" else None)
    assert bool((mask == 0).any())  # a padded batch
    dec = _decoder_inputs(cfg.vocab_size, ids.shape[0])
    with torch.no_grad():
        ours = model(ids, mask, dec)
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert ours.shape == ref.shape
    assert ref.abs().max() > 1.0  # not a degenerate model
    assert (ours - ref).abs().max().item() <= 1e-4
    # batched == one at a time (each request unpadded)
    with torch.no_grad():
        for i in range(ids.shape[0]):
            n = int(mask[i].sum())
            one = model(ids[i:i + 1, :n], mask[i:i + 1, :n], dec[i:i + 1])
            assert (one - ours[i:i + 1]).abs().max().item() <= 1e-4


def test_incremental_decoding_matches_teacher_forced(reg, tmp_path_factory):
    """Positions continue from the cache length (offset 2 applied once)."""
    model, src, _ = _ours(tiny("mbart", tmp_path_factory), reg)
    ids, mask = _batch(tiny("mbart", tmp_path_factory))
    dec = _decoder_inputs(src.config.vocab_size, ids.shape[0], t=6)
    with torch.no_grad():
        full = model(ids, mask, dec)
        state = model.init_state(model.encode(ids, mask), mask, dec.shape[1])
        steps = torch.cat([model.decode(dec[:, j:j + 1], state) for j in range(dec.shape[1])], dim=1)
    assert (steps - full).abs().max().item() <= 1e-4


def test_zero_final_logits_bias_is_left_out(reg, tmp_path_factory, tmp_path):
    from _bart_helpers import BART_TINY, make_model

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("bart", tmp_path_factory)))
    make_model(tmp_path, "bart", BART_TINY, len(tok) + 1, seed=9, tokenizer=tok, zero_final_logits_bias=True)
    model, src, _ = _ours(tmp_path, reg)
    assert not src.config.final_logits_bias and "final_logits_bias" not in model.state_dict()
    hf = load_hf(tmp_path)
    ids, mask = _batch(tmp_path)
    dec = _decoder_inputs(src.config.vocab_size, ids.shape[0])
    with torch.no_grad():
        diff = (model(ids, mask, dec) - hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)
    assert diff.abs().max().item() <= 1e-4


def test_generation_defaults_from_config_json(reg, tmp_path_factory, tmp_path):
    """A folder without generation_config.json: HF takes the generation keys of config.json."""
    d = tmp_path / "cnn"
    shutil.copytree(tiny("bart", tmp_path_factory), d)
    (d / "generation_config.json").unlink()
    rewrite_config(d, num_beams=4, length_penalty=2.0, min_length=5, max_length=12, no_repeat_ngram_size=3,
                   forced_bos_token_id=0, early_stopping=True)
    src = reg.get("bart").read(d)
    g = src.generation_config
    assert (g["num_beams"], g["length_penalty"], g["min_length"], g["max_length"]) == (4, 2.0, 5, 12)
    assert g["no_repeat_ngram_size"] == 3 and g["forced_bos_token_id"] == 0 and g["forced_eos_token_id"] == 2
    assert src.config.forced_bos_token_id == 0
    # with a generation_config.json, that file is used as is
    src2 = reg.get("bart").read(tiny("bart", tmp_path_factory))
    assert "num_beams" not in src2.generation_config


# ------------------------------------------------------------------------------------ tokenizer
def test_mbart_tokenizer_language_codes(reg, tmp_path_factory):
    from encdec_bart.plugin import lang_code_to_id

    path = tiny("mbart", tmp_path_factory)
    tok = reg.get("mbart").tokenizer(path, None)
    de = tok.lang_id("de_DE")
    assert tok.tok.convert_ids_to_tokens(de) == "de_DE"
    assert lang_code_to_id(path, "fr_XX") == tok.tok.convert_tokens_to_ids("fr_XX") != de
    assert len(tok.lang_codes) == 52
    with pytest.raises(EncDecError, match=r"'xx_YY'.*expected one of 52 codes such as .*de_DE"):
        tok.lang_id("xx_YY")
    # the source language code leads the source (mBART-50): default en_XX, per call de_DE
    en = tok.encode(["Das Haus"])[0]
    de_src = tok.encode(["Das Haus"], src_lang="de_DE")[0]
    assert en[0] == tok.lang_id("en_XX") and de_src[0] == de and en[1:] == de_src[1:] and en[-1] == 2
    assert tok.encode(["Das Haus"])[0] == en  # src_lang restored
    assert tok.decode(de_src) == "Das Haus"
    with pytest.raises(EncDecError, match="xx_YY"):
        tok.encode(["x"], src_lang="xx_YY")


def test_bart_tokenizer_has_no_language_codes(reg, tmp_path_factory):
    tok = reg.get("bart").tokenizer(tiny("bart", tmp_path_factory), None)
    ids = tok.encode(["The house is wonderful."])[0]
    assert ids[0] == 0 and ids[-1] == 2 and tok.pad_token_id == 1
    assert tok.decode(ids) == "The house is wonderful."
    with pytest.raises(EncDecError, match="no language codes"):
        tok.lang_id("de_DE")
    with pytest.raises(ConfigError, match="tokenizer directory not found"):
        reg.get("bart").tokenizer(tiny("bart", tmp_path_factory) / "nope", None)


# ------------------------------------------------------------------------------------ checkpoints
def test_convert_and_load_checkpoint_matches_hf(reg, tmp_path_factory, tmp_path):
    from encdec_core.checkpoint import load_model
    from encdec_core.convert import convert

    path = tiny("mbart", tmp_path_factory)
    out = convert(path, tmp_path / "ckpt", reg=reg)
    meta = json.loads((out / "config.json").read_text())
    assert meta["family"] == "mbart" and meta["model"]["position_offset"] == 2
    assert (out / "tokenizer.json").is_file()
    model = load_model(out)
    hf = load_hf(path)
    ids, mask = _batch(path)
    dec = _decoder_inputs(model.cfg.vocab_size, ids.shape[0])
    with torch.no_grad():
        diff = model(ids, mask, dec) - hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert diff.abs().max().item() <= 1e-4


def test_convert_tp2_pads_the_odd_vocabulary(reg, tmp_path_factory, tmp_path):
    from safetensors.torch import load_file

    from encdec_core.convert import convert

    path = tiny("bart", tmp_path_factory)
    model, src, _ = _ours(path, reg)
    full = model.state_dict()
    v = src.config.vocab_size
    assert v % 2 == 1
    out = convert(path, tmp_path / "tp2", tp=2, reg=reg)
    r0, r1 = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
    half = (v + 1) // 2
    assert r0["shared.weight"].shape == r1["shared.weight"].shape == (half, src.config.d_model)
    joined = torch.cat([r0["shared.weight"], r1["shared.weight"]])
    assert torch.equal(joined[:v], full["shared.weight"]) and bool((joined[v:] == 0).all())
    assert torch.equal(r0["final_logits_bias"], full["final_logits_bias"])  # replicated, added after gather
    # heads split: q|k|v blocks are split one by one, the row layer's bias stays whole
    qkv = full["encoder.layers.0.self_attn.qkv.weight"]
    q, k, _ = qkv.chunk(3)
    assert torch.equal(r1["encoder.layers.0.self_attn.qkv.weight"][: q.shape[0] // 2], q[q.shape[0] // 2:])
    assert torch.equal(r1["encoder.layers.0.self_attn.qkv.weight"][q.shape[0] // 2: q.shape[0]], k[k.shape[0] // 2:])
    assert torch.equal(r0["decoder.layers.0.ffn.wo.bias"], full["decoder.layers.0.ffn.wo.bias"])
    assert r0["decoder.layers.0.ffn.wo.weight"].shape[1] * 2 == full["decoder.layers.0.ffn.wo.weight"].shape[1]


def test_an_lm_head_that_differs_from_shared_is_read_untied_and_version_buffers_dropped(tmp_path_factory,
                                                                                          tmp_path, reg):
    """A tied-config BART folder holding an lm_head.weight of other values: transformers 5 loads it
    untied, and so do we (it was dropped: another model, exit 0). fairseq-era ``version`` buffers, which
    HF ignores, are dropped rather than refused."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "bart"
    shutil.copytree(tiny("bart", tmp_path_factory), d)
    t = load_file(str(d / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    t["lm_head.weight"] = t["model.shared.weight"] + 0.05 * torch.randn(t["model.shared.weight"].shape, generator=g)
    t["model.encoder.version"] = torch.tensor([2.0])
    t["model.decoder.version"] = torch.tensor([2.0])
    save_file(t, str(d / "model.safetensors"))
    assert json.loads((d / "config.json").read_text()).get("tie_word_embeddings", True) is not False
    model, _, _ = _ours(d, reg)
    assert model.cfg.tie_lm_head is False and model.cfg.shared_embeddings is True
    ref = load_hf(d)
    assert ref.lm_head.weight.data_ptr() != ref.model.shared.weight.data_ptr()
    ids, mask = _batch(d)
    dec = _decoder_inputs(model.cfg.vocab_size, ids.shape[0])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = model(ids, mask, dec).float()
    assert (got - want).abs().max().item() <= 1e-4
