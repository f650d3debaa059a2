"""fairseq NMT family: safe loading, detection, option mapping and clear refusals."""
from __future__ import annotations

import argparse
import math

import pytest
import torch

from _nmt_helpers import fairseq_state_from_fsmt, fsmt_options, random_fairseq_state, tiny_fsmt, write_fairseq_checkpoint
from conftest import make_registry
from encdec_core.errors import ConfigError, EncDecError, WeightError


@pytest.fixture(scope="module")
def reg():
    return make_registry("encdec_nmt.plugin")


@pytest.fixture(scope="module")
def fam(reg):
    return reg.get("nmt")


@pytest.fixture(scope="module")
def small():
    """A tiny fairseq option set + state (no transformers needed)."""
    o = dict(arch="transformer", encoder_embed_dim=16, encoder_ffn_embed_dim=24, encoder_layers=1, decoder_layers=1,
             encoder_attention_heads=2, max_source_positions=16, max_target_positions=16, source_lang="en",
             target_lang="de")
    from encdec_nmt.fairseq_io import fill_defaults

    full = fill_defaults(o)
    return o, random_fairseq_state(full, 24, 32, seed=0)


class Evil:
    """Unpickling this runs code that writes a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_pickle_never_executes(tmp_path, fam, reg, small):
    o, st = small
    marker = tmp_path / "pwned.txt"
    ckpt = tmp_path / "evil" / "model.pt"
    ckpt.parent.mkdir()
    (ckpt.parent / "dict.en.txt").write_text("hello 1\n")
    torch.save({"args": Evil(marker), "model": st}, ckpt)
    with pytest.raises(WeightError, match=r"refused to load.*'(builtins\.)?exec'.*allow-list"):
        fam.read(ckpt)
    from encdec_core.convert import convert

    with pytest.raises(EncDecError):
        convert(ckpt.parent, tmp_path / "out", reg=reg)  # detected as fairseq, refused the same way
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    # the payload is live: an unrestricted unpickler runs it (this is what encdec never does)
    torch.load(ckpt, weights_only=False)
    assert marker.read_text() == "pwned"


def test_both_styles_and_namespace_allowed(tmp_path, fam, small):
    o, st = small
    for style in ("args", "cfg"):
        src = fam.read(write_fairseq_checkpoint(tmp_path / style / "model.pt", st, o, style))
        assert src.config.d_model == 16 and src.config.extra["checkpoint_style"] == style
        assert src.config.extra["source_lang"] == "en" and src.config.extra["target_lang"] == "de"
        # fairseq-interactive defaults: beam 5; max_target_positions 16 allows 15 tokens, then </s>
        assert src.generation_config["num_beams"] == 5 and src.generation_config["max_new_tokens"] == 16
    # Namespace stays off torch's process-wide allow-list: encdec scopes it to its own loads
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


def test_new_style_nested_cfg_model(tmp_path, fam, small):
    """cfg['model'] as a dict with nested encoder/decoder options (fairseq's TransformerConfig)."""
    o, st = small
    model = {"_name": "transformer", "encoder": {"embed_dim": 16, "ffn_embed_dim": 24, "layers": 1,
                                                 "attention_heads": 2, "normalize_before": False},
             "decoder": {"embed_dim": 16, "ffn_embed_dim": 24, "layers": 1, "attention_heads": 2},
             "max_source_positions": 16, "max_target_positions": 16, "share_all_embeddings": False}
    ckpt = tmp_path / "model.pt"
    torch.save({"args": None, "cfg": {"model": model, "task": {"source_lang": "en", "target_lang": "de"}},
                "model": st}, ckpt)
    src = fam.read(ckpt)
    assert (src.config.d_model, src.config.encoder_ffn_dim, src.config.encoder_heads) == (16, 24, 2)


def test_detect(tmp_path, reg, small):
    from encdec_nmt.plugin import detect

    o, st = small
    d = tmp_path / "fs"
    write_fairseq_checkpoint(d / "checkpoint_best.pt", st, o)
    assert not detect(d)  # no dictionary yet
    (d / "dict.en.txt").write_text("a 1\n")
    assert detect(d) and detect(d / "checkpoint_best.pt")
    assert reg.detect(d).name == "nmt"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "t5"}')
    (tmp_path / "hf" / "model.pt").write_text("x")
    assert not detect(tmp_path / "hf")
    write_fairseq_checkpoint(d / "checkpoint_last.pt", st, o)
    write_fairseq_checkpoint(d / "checkpoint3.pt", st, o)
    from encdec_nmt.plugin import locate_checkpoint

    assert locate_checkpoint(d).name == "checkpoint_best.pt"
    (d / "checkpoint_best.pt").unlink()
    (d / "checkpoint_last.pt").unlink()
    write_fairseq_checkpoint(d / "checkpoint4.pt", st, o)
    with pytest.raises(ConfigError, match="several checkpoints"):
        locate_checkpoint(d)


def test_arch_defaults_and_presets(fam):
    big = fam.make_config(dict(fam.presets["wmt14-en-fr-big"]))
    assert (big.d_model, big.encoder_heads, big.encoder_ffn_dim, big.encoder_layers) == (1024, 16, 4096, 6)
    assert not big.encoder_pre_norm and big.position_type == "sinusoidal" and big.shared_embeddings
    assert big.embedding_scale == math.sqrt(1024) and big.head_dim == 64
    t2t = fam.make_config(dict(arch="transformer_wmt_en_de_big_t2t", src_vocab_size=64, tgt_vocab_size=72))
    assert t2t.encoder_pre_norm and t2t.decoder_pre_norm and t2t.encoder_final_norm and t2t.decoder_final_norm
    assert t2t.src_vocab_size == 64 and not t2t.shared_embeddings and not t2t.tie_lm_head
    iw = fam.make_config(dict(arch="transformer_iwslt_de_en", src_vocab_size=64, tgt_vocab_size=64,
                              share_decoder_input_output_embed=True))
    assert (iw.encoder_heads, iw.decoder_ffn_dim, iw.d_model) == (4, 1024, 512) and iw.tie_lm_head
    fsmt = fam.make_config(dict(fam.presets["wmt19-en-de"]))
    assert fsmt.encoder_ffn_dim == 8192 and fsmt.decoder_start_token_id == 2 and fsmt.pad_token_id == 1
    from encdec_core.model import build_model

    build_model(big, meta=True)  # the preset builds


@pytest.mark.parametrize("change,match", [
    (dict(arch="lstm_wiseman_iwslt_de_en"), "field 'arch'"),
    (dict(arch="transformer_lm"), "field 'arch'"),
    (dict(decoder_embed_dim=32), "decoder_embed_dim"),
    (dict(decoder_attention_heads=4), "decoder_attention_heads"),
    (dict(adaptive_softmax_cutoff="10,20"), "adaptive_softmax_cutoff"),
    (dict(activation_fn="linear"), "activation_fn"),
    (dict(encoder_learned_pos=True), "decoder_learned_pos"),
    (dict(cross_self_attention=True), "cross_self_attention"),
    (dict(encoder_layers_to_keep="0"), "encoder_layers_to_keep"),
])
def test_unsupported_options_refused(tmp_path, fam, small, change, match):
    o, st = small
    ckpt = write_fairseq_checkpoint(tmp_path / "model.pt", st, {**o, **change})
    with pytest.raises(ConfigError, match=match) as ei:
        fam.read(ckpt)
    assert str(ckpt) in str(ei.value) or "fairseq option" in str(ei.value)


def test_bad_files(tmp_path, fam, small):
    o, st = small
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(WeightError, match="not a readable PyTorch checkpoint"):
        fam.read(junk)
    lst = tmp_path / "list.pt"
    torch.save([1, 2], lst)
    with pytest.raises(WeightError, match="expected a fairseq checkpoint"):
        fam.read(lst)
    noargs = tmp_path / "noargs.pt"
    torch.save({"model": st}, noargs)
    with pytest.raises(ConfigError, match="no 'args' and no 'cfg'"):
        fam.read(noargs)
    nomodel = tmp_path / "nomodel.pt"
    torch.save({"args": argparse.Namespace(**o)}, nomodel)
    with pytest.raises(WeightError, match="field 'model'"):
        fam.read(nomodel)
    with pytest.raises(ConfigError, match="not found|no such file"):
        fam.read(tmp_path / "missing.pt")


def test_tensor_problems_named(tmp_path, reg, small):
    from encdec_core.convert import load_source_model

    o, st = small
    extra = dict(st)
    extra["encoder.layers.0.self_attn.rel_bias"] = torch.zeros(3)
    del extra["decoder.layers.0.fc2.bias"]
    ckpt = write_fairseq_checkpoint(tmp_path / "a" / "model.pt", extra, o)
    with pytest.raises(WeightError) as ei:
        load_source_model(ckpt, reg=reg)
    msg = str(ei.value)
    assert "encoder.layers.0.self_attn.rel_bias" in msg and "decoder.layers.0.ffn.wo.bias" in msg
    # share_all_embeddings on, but the tensors differ
    shared = {**o, "share_all_embeddings": True}
    st2 = random_fairseq_state(shared, 24, 24, seed=2)
    st2["decoder.embed_tokens.weight"] = st2["decoder.embed_tokens.weight"] + 1.0
    ckpt2 = write_fairseq_checkpoint(tmp_path / "b" / "model.pt", st2, shared)
    with pytest.raises(WeightError, match="share_all_embeddings"):
        load_source_model(ckpt2, reg=reg)


def test_dictionary_too_large_refused(tmp_path, fam, small):
    o, st = small
    d = tmp_path / "m"
    write_fairseq_checkpoint(d / "model.pt", st, o)
    (d / "dict.en.txt").write_text("".join(f"w{i} 1\n" for i in range(21)))  # 25 > 24 rows
    (d / "dict.de.txt").write_text("".join(f"w{i} 1\n" for i in range(28)))
    with pytest.raises(ConfigError, match=r"dict\.en\.txt: 25 entries .* 24 rows"):
        fam.read(d)
    (d / "dict.en.txt").write_text("".join(f"w{i} 1\n" for i in range(20)))
    src = fam.read(d)
    assert sorted(p.name for p in src.tokenizer_files) == ["dict.de.txt", "dict.en.txt"]


def test_version_and_duplicates(tmp_path, reg):
    """0.12.2's encoder-layer duplicates and _float_tensor buffers are ignored; versions are read."""
    from encdec_core.convert import load_source_model

    fs = tiny_fsmt(seed=5, enc_layers=1, dec_layers=1)
    st = fairseq_state_from_fsmt(fs, duplicates=True)
    assert "encoder.layers.0.in_proj_weight" in st and "encoder.embed_positions._float_tensor" in st
    model, src, _ = load_source_model(write_fairseq_checkpoint(tmp_path / "model.pt", st, fsmt_options(fs)), reg=reg)
    assert "encoder.layers.0.self_attn.qkv.weight" in model.state_dict()
    qkv = torch.cat([st[f"encoder.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(model.state_dict()["encoder.layers.0.self_attn.qkv.weight"], qkv)


def test_numpy_scalars_in_training_state_load(tmp_path, fam, small):
    """fairseq's meters leave numpy scalars in extra_state: plain numbers, allowed."""
    import numpy as np

    o, st = small
    ckpt = tmp_path / "model.pt"
    torch.save({"args": argparse.Namespace(**o), "model": st,
                "extra_state": {"metrics": [("loss", 0, "AverageMeter", {"val": np.float64(2.5), "n": np.int64(3)})]}},
               ckpt)
    assert fam.read(ckpt).config.d_model == 16


def test_moses_languages(tmp_path, fam, small):
    """Old fairseq's --moses-{source,target}-lang win; otherwise the task languages (fairseq 0.12)."""
    o, st = small
    a = fam.read(write_fairseq_checkpoint(tmp_path / "a" / "model.pt", st, o))
    assert (a.config.extra["moses_source_lang"], a.config.extra["moses_target_lang"]) == ("en", "de")
    o2 = {**o, "source_lang": "src", "target_lang": "tgt", "moses_source_lang": "en", "moses_target_lang": "en"}
    d = tmp_path / "b"
    b = fam.read(write_fairseq_checkpoint(d / "model.pt", st, o2))
    assert (b.config.extra["moses_source_lang"], b.config.extra["moses_target_lang"]) == ("en", "en")
    (d / "dict.src.txt").write_text("hello 2\n")
    (d / "dict.tgt.txt").write_text("hallo 2\nwelt 1\n")
    tok = fam.tokenizer(d, b.config)
    assert (tok.source_lang, tok.target_lang) == ("en", "en")
    assert tok.encode(["hello"]) == [[4, 2]] and tok.decode([2, 5, 2]) == "welt"
