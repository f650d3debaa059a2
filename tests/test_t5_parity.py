"""T5 family parity against HF transformers, one tiny random model per variant.

Every variant has odd shapes: head_dim (d_kv) != d_model / num_heads, more decoder layers than
encoder layers, few relative-position buckets and a short max distance so that sequences reach the
logarithmic buckets. The gated variants (T5 v1.1 / Flan-T5, mT5, ByT5, UMT5) are saved in the real
checkpoint layout: their own lm_head.weight and ``"tie_word_embeddings": false`` in config.json
(environment-findings' recipe; transformers v5 would otherwise always tie and scale).

Checked per variant:
  * fp32 teacher-forced logits, max|ours - HF| <= 1e-4, through load_source_model and through
    convert() -> checkpoint.load_model();
  * incremental decoding (one token at a time, KV cache) equals teacher forcing;
  * a padded batch equals each input run alone;
  * float16 / bfloat16 close to fp32 (tolerances stated at FP16_TOL / BF16_TOL);
  * greedy, beam 4 with length_penalty != 1 and num_return_sequences 2: token ids equal to HF generate.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from encdec_core import checkpoint  # noqa: E402
from encdec_core.convert import convert, load_source_model  # noqa: E402

PARITY_TOL = 1e-4
# half precision: max|logits_half - logits_fp32| <= TOL * max|logits_fp32| (+ a small absolute floor).
# fp16 keeps 11 significant bits, bf16 8; through a few layers the error stays well inside these.
FP16_TOL = 1e-2
BF16_TOL = 6e-2

# common odd shapes: d_model 20 with 3 heads of d_kv 8 (3 * 8 = 24 != 20), 2 encoder / 3 decoder layers
_COMMON = dict(d_model=20, d_kv=8, d_ff=36, num_layers=2, num_decoder_layers=3, num_heads=3,
               relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

VARIANTS = {
    # original T5: relu, tied lm_head, decoder output scaled by d_model ** -0.5
    "t5": dict(cls="T5", vocab_size=101, feed_forward_proj="relu", untied=False),
    # T5 v1.1 / Flan-T5: gated-gelu, untied lm_head, no output scale
    "flan-t5": dict(cls="T5", vocab_size=103, feed_forward_proj="gated-gelu", untied=True),
    # mT5: T5 v1.1 layout under the MT5 classes
    "mt5": dict(cls="MT5", vocab_size=107, feed_forward_proj="gated-gelu", untied=True),
    # ByT5: byte vocabulary (384 = 256 bytes + 3 specials + 125 extra ids)
    "byt5": dict(cls="T5", vocab_size=384, feed_forward_proj="gated-gelu", untied=True, num_layers=3,
                 num_decoder_layers=2),
    # UMT5: a relative-bias table in every layer
    "umt5": dict(cls="UMT5", vocab_size=109, feed_forward_proj="gated-gelu", untied=True),
}


EOS_BOOST = {"t5": 3.0, "flan-t5": 3.0, "mt5": 3.0, "byt5": 1.6, "umt5": 2.2}


def make_hf_dir(variant: str, out: Path, seed: int = 0) -> Path:
    """Save a tiny random HF model of ``variant`` to ``out`` in the real checkpoint layout."""
    spec = dict(VARIANTS[variant])
    cls = spec.pop("cls")
    untied = spec.pop("untied")
    cfg_cls = getattr(transformers, f"{cls}Config")
    model_cls = getattr(transformers, f"{cls}ForConditionalGeneration")
    cfg = cfg_cls(**{**_COMMON, **spec})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # lift the norm weights off 1.0 so a wrong norm mapping shows
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    if untied:
        # the recipe: an own lm_head.weight, dropped from the tie table, and tie_word_embeddings false
        model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model) * 0.3)
        tied = dict(model.all_tied_weights_keys)
        tied.pop("lm_head.weight", None)
        model.all_tied_weights_keys = tied
    with torch.no_grad():  # make EOS likely at some steps, so generation's EOS paths run
        out_emb = model.lm_head.weight if untied else model.shared.weight
        out_emb[cfg.eos_token_id] *= EOS_BOOST[variant]
    model.save_pretrained(out)
    cfg_path = out / "config.json"
    data = json.loads(cfg_path.read_text())
    if untied:
        data["tie_word_embeddings"] = False
        data.pop("scale_decoder_outputs", None)  # real (v4-era) checkpoints do not have it
    cfg_path.write_text(json.dumps(data, indent=2))
    if variant == "byt5":
        transformers.ByT5Tokenizer().save_pretrained(out)
    return out


def hf_model(path: Path):
    m = transformers.AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()
    return m


@pytest.fixture(scope="module")
def built(tmp_path_factory, builtin_registry_module):
    """variant -> (hf dir, HF reference model, our fp32 model)."""
    cache = {}

    def get(variant):
        if variant not in cache:
            d = make_hf_dir(variant, tmp_path_factory.mktemp(variant))
            ours, _, _ = load_source_model(d, reg=builtin_registry_module)
            cache[variant] = (d, hf_model(d), ours)
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def builtin_registry_module():
    from conftest import make_registry

    return make_registry("encdec_t5.plugin")


def inputs(vocab: int, seed: int = 1):
    """A padded batch: row 0 full (15 tokens, beyond max_distance 12), row 1 padded to 9 real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 15), generator=g)
    mask = torch.ones_like(ids)
    ids[0, -1] = 1
    ids[1, 8] = 1
    ids[1, 9:] = 0
    mask[1, 9:] = 0
    dec = torch.randint(3, vocab, (2, 14), generator=g)
    dec[:, 0] = 0
    return ids, mask, dec


def hf_logits(m, ids, mask, dec):
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits.float()


ALL = list(VARIANTS)


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("variant", ALL)
def test_config_mapping(built, variant):
    d, ref, ours = built(variant)
    cfg = ours.cfg
    spec = VARIANTS[variant]
    assert cfg.head_dim == 8 and cfg.d_model == 20 and cfg.encoder_heads == 3
    assert (cfg.encoder_layers, cfg.decoder_layers) == (spec.get("num_layers", 2), spec.get("num_decoder_layers", 3))
    assert cfg.softmax_scale == 1.0
    assert cfg.gated_ffn == spec["untied"]
    assert cfg.tie_lm_head == (not spec["untied"])
    assert cfg.output_scale == (20 ** -0.5 if not spec["untied"] else 1.0)
    assert cfg.relative_bias_per_layer == (variant == "umt5")
    assert cfg.relative_num_buckets == 8 and cfg.relative_max_distance == 12
    # the reference really is in the layout we meant to build
    ref_untied = ref.lm_head.weight.data_ptr() != ref.shared.weight.data_ptr()
    assert ref_untied == spec["untied"]
    if variant == "umt5":
        assert all(hasattr(ours.encoder.layers[k], "rel_bias") for k in ours.encoder.layers)
        assert not hasattr(ours.encoder, "rel_bias")


# ------------------------------------------------------------------------------------- fp32 parity
@pytest.mark.parametrize("variant", ALL)
def test_teacher_forced_logits_match_hf(built, variant):
    d, ref, ours = built(variant)
    ids, mask, dec = inputs(ours.cfg.vocab_size)
    want = hf_logits(ref, ids, mask, dec)
    with torch.no_grad():
        got = ours(ids, mask, dec)
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= PARITY_TOL, f"{variant}: max|diff| {diff:.3g} > {PARITY_TOL}"
    assert want.abs().max() > 0.1  # the comparison is not between near-zero tensors


@pytest.mark.parametrize("variant", ALL)
def test_convert_then_load_matches_hf(built, variant, tmp_path, builtin_registry_module):
    d, ref, ours = built(variant)
    out = convert(d, tmp_path / "ckpt", reg=builtin_registry_module)
    meta = json.loads((out / "config.json").read_text())
    assert meta["family"] == "t5" and meta["dtype"] == "float32"
    loaded = checkpoint.load_model(out)
    ids, mask, dec = inputs(ours.cfg.vocab_size, seed=3)
    with torch.no_grad():
        got = loaded(ids, mask, dec)
    diff = (got - hf_logits(ref, ids, mask, dec)).abs().max().item()
    assert diff <= PARITY_TOL, f"{variant}: max|diff| {diff:.3g}"
    assert loaded.cfg == ours.cfg


# ------------------------------------------------------------------------------------- decoding
def _incremental(model, ids, mask, dec):
    with torch.no_grad():
        enc = model.encode(ids, mask)
        state = model.init_state(enc, mask, dec.shape[1])
        steps = [model.decode(dec[:, t:t + 1], state) for t in range(dec.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("variant", ALL)
def test_incremental_equals_teacher_forced(built, variant):
    _, _, ours = built(variant)
    ids, mask, dec = inputs(ours.cfg.vocab_size, seed=5)
    with torch.no_grad():
        full = ours(ids, mask, dec)
    step = _incremental(ours, ids, mask, dec)
    diff = (full - step).abs().max().item()
    assert diff <= 1e-5, f"{variant}: incremental vs teacher-forced max|diff| {diff:.3g}"


@pytest.mark.parametrize("variant", ALL)
def test_padded_batch_equals_each_alone(built, variant):
    _, _, ours = built(variant)
    ids, mask, dec = inputs(ours.cfg.vocab_size, seed=7)
    with torch.no_grad():
        batch = ours(ids, mask, dec)
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            alone = ours(ids[r:r + 1, :n], mask[r:r + 1, :n], dec[r:r + 1])
            diff = (alone[0] - batch[r]).abs().max().item()
            assert diff <= 1e-5, f"{variant} row {r}: max|diff| {diff:.3g}"


# ------------------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, FP16_TOL), (torch.bfloat16, BF16_TOL)],
                         ids=["float16", "bfloat16"])
def test_half_precision_close_to_fp32(built, variant, dtype, tol, builtin_registry_module):
    d, _, ours = built(variant)
    half, _, _ = load_source_model(d, dtype=dtype, reg=builtin_registry_module)
    ids, mask, dec = inputs(ours.cfg.vocab_size, seed=9)
    with torch.no_grad():
        ref = ours(ids, mask, dec)
        got = half(ids, mask, dec)
    assert got.dtype == torch.float32  # logits always come back in fp32
    assert torch.isfinite(got).all()
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= tol * scale + 1e-3, f"{variant} {dtype}: max|diff| {err:.3g} vs logits scale {scale:.3g}"
    # the top token agrees almost everywhere
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9


# ------------------------------------------------------------------------------------- ByT5 tokenizer
def test_byt5_tokenizer_round_trip(built, tmp_path, builtin_registry_module):
    d, ref, ours = built("byt5")
    tok = transformers.AutoTokenizer.from_pretrained(d)
    texts = ["Grüße, naïve café!", "ok"]
    enc = tok(texts, return_tensors="pt", padding=True)
    assert int(enc.input_ids.max()) < 384 and ours.cfg.vocab_size == 384
    assert tok.batch_decode(enc.input_ids, skip_special_tokens=True) == texts
    dec = torch.tensor([[0, 72, 105, 33, 1]] * 2)
    with torch.no_grad():
        got = ours(enc.input_ids, enc.attention_mask, dec)
    diff = (got - hf_logits(ref, enc.input_ids, enc.attention_mask, dec)).abs().max().item()
    assert diff <= PARITY_TOL
    # the converted checkpoint carries the tokenizer files: the same tokenizer loads from it
    out = convert(d, tmp_path / "ckpt", reg=builtin_registry_module)
    tok2 = transformers.AutoTokenizer.from_pretrained(out)
    assert tok2(texts).input_ids == tok(texts).input_ids


# ------------------------------------------------------------------------------------- generation
SPECIAL = dict(eos_token_id=1, pad_token_id=0, decoder_start_token_id=0)
GEN_CASES = {
    "greedy": dict(max_new_tokens=12),
    "beam4": dict(max_new_tokens=10, num_beams=4, length_penalty=0.6, num_return_sequences=2),
    "beam4-early": dict(max_new_tokens=10, num_beams=4, length_penalty=1.7, num_return_sequences=2,
                        early_stopping=True),
}


def hf_generate(ref, ids, mask, **kw):
    # HF v5's T5 cache is sized by the encoder's num_layers and breaks when the decoder has more
    # layers: the reference runs without a cache (every step recomputed from scratch).
    gc = transformers.GenerationConfig(**SPECIAL, **kw, use_cache=False, return_dict_in_generate=True,
                                       output_scores=True)
    with torch.no_grad():
        return ref.generate(ids, attention_mask=mask, generation_config=gc)


@pytest.mark.parametrize("case", list(GEN_CASES))
@pytest.mark.parametrize("variant", ALL)
def test_generate_matches_hf(built, variant, case):
    from encdec_core.runtime.generation import GenerationConfig, generate

    d, ref, ours = built(variant)
    kw = GEN_CASES[case]
    ids, mask, _ = inputs(ours.cfg.vocab_size, seed=11)
    want = hf_generate(ref, ids, mask, **kw)
    gc = GenerationConfig.from_model(ours.cfg, None, **kw)
    got = generate(ours, ids, mask, gc)
    assert torch.equal(got.sequences, want.sequences), f"{variant} {case}\nHF:\n{want.sequences}\nours:\n{got.sequences}"
    if kw.get("num_beams", 1) > 1:
        assert got.sequences.shape[0] == ids.shape[0] * kw["num_return_sequences"]
        torch.testing.assert_close(got.sequences_scores, want.sequences_scores, atol=1e-4, rtol=0)


def test_generation_exercises_eos_and_lengths(built):
    """The cases above are not all trivially full-length or immediately finished."""
    from encdec_core.runtime.generation import GenerationConfig, generate

    lengths = set()
    for variant in ALL:
        _, _, ours = built(variant)
        ids, mask, _ = inputs(ours.cfg.vocab_size, seed=11)
        out = generate(ours, ids, mask, GenerationConfig.from_model(ours.cfg, None, **GEN_CASES["beam4"]))
        lengths.update(len(t) for t in out.all_tokens())
    assert max(lengths) == 10 and min(lengths) < 10 and len(lengths) >= 3, lengths


# ------------------------------------------------------------------------------------- tensor-parallel checkpoints
def test_tp_checkpoint_splits_relative_bias_tables_by_heads(tmp_path, builtin_registry_module):
    """UMT5's per-layer tables and T5's per-stack tables are split by heads for tp=2; a head count
    tp does not divide is refused naming the heads and leaves no output directory."""
    from safetensors.torch import load_file

    from encdec_core.errors import ConfigError

    cfg = transformers.UMT5Config(vocab_size=61, d_model=16, d_kv=6, d_ff=24, num_layers=2, num_decoder_layers=3,
                                  num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0)
    torch.manual_seed(0)
    transformers.UMT5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "umt5")
    src = transformers.UMT5ForConditionalGeneration.from_pretrained(tmp_path / "umt5").state_dict()
    out = convert(tmp_path / "umt5", tmp_path / "tp2", tp=2, reg=builtin_registry_module)
    r0, r1 = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
    for side, n in (("encoder", 2), ("decoder", 3)):
        for i in range(n):
            name = f"{side}.layers.{i}.rel_bias.weight"
            full = src[f"{side}.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"]
            assert r0[name].shape == (8, 2) and r1[name].shape == (8, 2)
            assert torch.equal(torch.cat([r0[name], r1[name]], 1), full)
    # three heads do not split over two ranks
    three = make_hf_dir("t5", tmp_path / "t5")
    with pytest.raises(ConfigError, match=r"--tp-size 2 does not divide the encoder's 3 attention heads"):
        convert(three, tmp_path / "bad", tp=2, reg=builtin_registry_module)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("variant", ALL)
def test_attention_biases_are_key_contiguous(built, variant):
    """The additive biases reach SDPA with the key dimension at stride 1: on CUDA the fused kernels
    (cuDNN, memory-efficient) refuse any other layout and attention silently fell back to fp32 math
    (T5's relative bias comes out of its embedding heads-last). With and without padding."""
    _, _, ours = built(variant)
    enc = ours.encoder
    ids, mask, _ = inputs(ours.cfg.vocab_size)
    from encdec_core.model import padding_bias

    for base in (None, padding_bias(mask, ours.dtype)):
        for b in enc.layer_biases(base, ids.shape[1], ids.shape[1], 0):
            assert b is not None and b.stride(-1) == 1 and b.is_contiguous(), (variant, b.stride())


# ------------------------------------------------------------------------- checkpoints re-saved by v5
def test_flan_t5_resaved_by_transformers_5_keeps_its_own_lm_head(built, tmp_path, builtin_registry_module):
    """A real-layout Flan-T5 loaded and saved again by transformers 5 (every v5 fine-tune) says
    "tie_word_embeddings": true (and "scale_decoder_outputs": false) while its lm_head.weight differs
    from shared: HF loads it untied, and so do we (we read it tied: another model, exit 0)."""
    d, ref, _ = built("flan-t5")
    out = tmp_path / "resaved"
    ref.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["tie_word_embeddings"] is True and saved.get("scale_decoder_outputs") is False
    hf2 = hf_model(out)
    assert hf2.lm_head.weight.data_ptr() != hf2.shared.weight.data_ptr()
    ours, _, _ = load_source_model(out, reg=builtin_registry_module)
    assert ours.cfg.tie_lm_head is False and ours.cfg.output_scale == 1.0
    ids, mask, dec = inputs(ours.cfg.vocab_size)
    got = ours(ids, mask, dec).float()
    assert (got - hf_logits(hf2, ids, mask, dec)).abs().max().item() <= 1e-4


def test_a_duplicate_embedding_that_differs_is_refused_and_pre_v4_keys_are_dropped(built, tmp_path,
                                                                                     builtin_registry_module):
    """encoder.embed_tokens.weight is a copy of shared.weight that we drop: a file where it differs
    (transformers would use both) is refused by name instead of read as another model. The cross-attention
    bias table of checkpoints saved before transformers 4 (which HF ignores) is dropped, not refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    from encdec_core.errors import WeightError

    d, _, _ = built("t5")
    src = tmp_path / "dup"
    shutil.copytree(d, src)
    state = load_file(str(src / "model.safetensors"))
    state["encoder.embed_tokens.weight"] = state["shared.weight"] + 1.0
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(WeightError, match="encoder.embed_tokens.weight differs from shared.weight"):
        load_source_model(src, reg=builtin_registry_module)
    del state["encoder.embed_tokens.weight"]
    heads = state["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = heads.clone()
    save_file(state, str(src / "model.safetensors"))
    load_source_model(src, reg=builtin_registry_module)


def test_weight_files_sharded_pickles_and_their_refusals(built, tmp_path, builtin_registry_module):
    """pytorch_model-*.bin shards with their index read as transformers reads them (they were refused:
    "no model.safetensors ... found"); a key the index lists but its shard lacks, a non-tensor entry in a
    pickle and a truncated safetensors shard are each refused naming that file."""
    import shutil

    from safetensors.torch import load_file, save_file

    from encdec_core.errors import WeightError

    d, ref, _ = built("flan-t5")
    state = load_file(str(d / "model.safetensors"))
    keys = sorted(state)
    half = len(keys) // 2
    parts = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    src = tmp_path / "bin"
    shutil.copytree(d, src)
    (src / "model.safetensors").unlink()
    for name, ks in parts.items():
        torch.save({k: state[k] for k in ks}, src / name)
    index = {"metadata": {}, "weight_map": {k: name for name, ks in parts.items() for k in ks}}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    ours, _, _ = load_source_model(src, reg=builtin_registry_module)
    ids, mask, dec = inputs(ours.cfg.vocab_size)
    assert (ours(ids, mask, dec).float() - hf_logits(ref, ids, mask, dec)).abs().max().item() <= 1e-4

    index["weight_map"]["decoder.extra.weight"] = "pytorch_model-00002-of-00002.bin"
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightError, match=r"pytorch_model-00002-of-00002.bin: 1 tensor\(s\) that "
                                          r"pytorch_model.bin.index.json lists for this shard are not in it: "
                                          r"decoder.extra.weight"):
        load_source_model(src, reg=builtin_registry_module)
    for f in src.glob("pytorch_model*"):
        f.unlink()
    torch.save({**state, "config": [1, 2]}, src / "pytorch_model.bin")
    with pytest.raises(WeightError, match=r"pytorch_model.bin: entry 'config' is a list, expected a tensor"):
        load_source_model(src, reg=builtin_registry_module)

    sh = tmp_path / "st"
    shutil.copytree(d, sh)
    (sh / "model.safetensors").unlink()
    for i, (name, ks) in enumerate(parts.items()):
        save_file({k: state[k] for k in ks}, str(sh / name.replace("pytorch_model", "model").replace(".bin",
                                                                                                   ".safetensors")))
    wmap = {k: n.replace("pytorch_model", "model").replace(".bin", ".safetensors") for n, ks in parts.items()
            for k in ks}
    (sh / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    broken = sh / "model-00002-of-00002.safetensors"
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(WeightError, match=r"model-00002-of-00002.safetensors: not a valid safetensors file"):
        load_source_model(sh, reg=builtin_registry_module)
