"""fairseq NMT family: fp32 logits parity.

* post-LN: against transformers' FSMT built with the same weights (teacher forced, use_cache=False),
  from fairseq checkpoints we write ourselves in both styles (legacy ``args``, ``cfg``), in the old
  2018 key layout, and from an FSMT model folder.
* pre-LN (normalize_before, final layer norms, learned positions, layernorm_embedding, gelu, ...):
  against tests/_nmt_reference.py, a small independent re-implementation written from fairseq's
  documented semantics, which runs LEFT-padded sources as fairseq does. The reference is itself
  checked against FSMT on a post-LN model.
"""
from __future__ import annotations

import pytest
import torch

from _nmt_helpers import (fairseq_state_from_fsmt, fsmt_options, random_fairseq_state, tiny_fsmt, to_old_layout,
                          write_fairseq_checkpoint)
from _nmt_reference import left_pad, ref_forward, right_pad
from conftest import make_registry

TOL = 1e-4
SRC = [[5, 6, 7, 8, 9, 10, 2], [11, 12, 2], [13, 14, 15, 16, 2]]
TGT = [[2, 5, 6, 7, 8], [2, 9, 10, 11, 12], [2, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def reg():
    return make_registry("encdec_nmt.plugin")


@pytest.fixture(scope="module")
def fsmt():
    return tiny_fsmt(seed=0)


def fsmt_logits(fs, src, tgt):
    ids, mask = right_pad(src)
    with torch.no_grad():
        return fs(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.tensor(tgt), use_cache=False).logits


def our_logits(model, src, tgt):
    ids, mask = right_pad(src)
    with torch.no_grad():
        return model(ids, mask, torch.tensor(tgt))


def load(path, reg):
    from encdec_core.convert import load_source_model

    model, src, fam = load_source_model(path, reg=reg)
    assert fam.name == "nmt"
    return model, src


@pytest.mark.parametrize("style", ["args", "cfg", "old"])
def test_fairseq_checkpoint_matches_fsmt(tmp_path, reg, fsmt, style):
    state = fairseq_state_from_fsmt(fsmt)
    if style == "old":
        state = to_old_layout(state)
    ckpt = write_fairseq_checkpoint(tmp_path / "model.pt", state, fsmt_options(fsmt),
                                    "cfg" if style == "cfg" else "args")
    model, src = load(ckpt, reg)
    cfg = src.config
    assert (cfg.encoder_pre_norm, cfg.encoder_final_norm, cfg.decoder_final_norm) == (False, False, False)
    assert cfg.position_type == "sinusoidal" and cfg.position_padding_aware and cfg.pad_token_id == 1
    assert cfg.decoder_start_token_id == 2 and not cfg.shared_embeddings and not cfg.tie_lm_head
    assert (cfg.encoder_vocab_size, cfg.vocab_size) == (40, 48)
    assert cfg.encoder_ffn_dim == 64 and cfg.decoder_ffn_dim == 48
    assert cfg.extra["checkpoint_style"] == ("cfg" if style == "cfg" else "args")
    ref = fsmt_logits(fsmt, SRC, TGT)
    ours = our_logits(model, SRC, TGT)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TOL
    # batched == one at a time
    for i in range(len(SRC)):
        one = our_logits(model, [SRC[i]], [TGT[i]])
        assert (one[0] - ours[i]).abs().max().item() <= TOL


def test_fsmt_folder_and_converted_checkpoint(tmp_path, builtin_registry, fsmt):
    """An FSMT model folder goes through the same family; convert -> load_model keeps parity."""
    from encdec_core.checkpoint import load_model
    from encdec_core.convert import convert

    fsmt.save_pretrained(tmp_path / "fsmt")
    assert builtin_registry.detect(tmp_path / "fsmt").name == "nmt"
    out = convert(tmp_path / "fsmt", tmp_path / "ckpt", reg=builtin_registry)
    model = load_model(out)
    ref = fsmt_logits(fsmt, SRC, TGT)
    assert (our_logits(model, SRC, TGT) - ref).abs().max().item() <= TOL
    assert model.cfg.extra["source_lang"] == "en" and model.cfg.extra["target_lang"] == "de"


def test_shared_embeddings_match_fsmt(tmp_path, reg):
    fs = tiny_fsmt(seed=3, src_vocab=40, tgt_vocab=40, tie=True, activation="gelu", dec_layers=2)
    ckpt = write_fairseq_checkpoint(tmp_path / "m" / "checkpoint_best.pt", fairseq_state_from_fsmt(fs),
                                    fsmt_options(fs), "cfg")
    model, src = load(tmp_path / "m" / "checkpoint_best.pt", reg)
    assert src.config.shared_embeddings and src.config.tie_lm_head and src.config.activation == "gelu"
    assert "shared.weight" in model.state_dict() and "lm_head.weight" not in model.state_dict()
    assert (our_logits(model, SRC, TGT) - fsmt_logits(fs, SRC, TGT)).abs().max().item() <= TOL
    assert ckpt.is_file()


def test_reference_matches_fsmt(fsmt):
    """The independent reference agrees with FSMT on post-LN, with LEFT-padded sources."""
    st = fairseq_state_from_fsmt(fsmt, duplicates=False)
    ref = ref_forward(st, fsmt_options(fsmt), left_pad(SRC), torch.tensor(TGT))
    assert (ref - fsmt_logits(fsmt, SRC, TGT)).abs().max().item() <= TOL


PRE_LN = dict(
    arch="transformer", encoder_embed_dim=32, encoder_ffn_embed_dim=72, decoder_ffn_embed_dim=40,
    encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_normalize_before=True, decoder_normalize_before=True, encoder_learned_pos=True,
    decoder_learned_pos=True, layernorm_embedding=True, activation_fn="gelu", share_all_embeddings=False,
    share_decoder_input_output_embed=True, max_source_positions=32, max_target_positions=32,
    source_lang="de", target_lang="en")

VARIANTS = {
    "preln-learned-lnemb-gelu": (PRE_LN, 40, 48),
    "preln-sinusoid-noscale-shared-nodecnorm": (
        {**PRE_LN, "encoder_learned_pos": False, "decoder_learned_pos": False, "layernorm_embedding": False,
         "no_scale_embedding": True, "share_all_embeddings": True, "no_decoder_final_norm": True,
         "activation_fn": "relu", "max_target_positions": 48}, 40, 40),
    "mixed-preln-encoder-only-gelu-accurate": (
        {**PRE_LN, "decoder_normalize_before": False, "activation_fn": "gelu_accurate",
         "share_decoder_input_output_embed": False}, 40, 48),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_pre_ln_against_reference(tmp_path, reg, name):
    o, sv, tv = VARIANTS[name]
    st = random_fairseq_state(o, sv, tv, seed=7)
    ckpt = write_fairseq_checkpoint(tmp_path / "model.pt", st, o, "args")
    model, src = load(ckpt, reg)
    cfg = src.config
    assert cfg.encoder_pre_norm == o["encoder_normalize_before"]
    assert cfg.encoder_final_norm == o["encoder_normalize_before"]
    assert cfg.decoder_final_norm == (o["decoder_normalize_before"] and not o.get("no_decoder_final_norm", False))
    assert cfg.layernorm_embedding == o["layernorm_embedding"]
    assert cfg.position_type == ("learned" if o["encoder_learned_pos"] else "sinusoidal")
    assert cfg.embedding_scale == (1.0 if o.get("no_scale_embedding") else 32 ** 0.5)
    ref = ref_forward(st, o, left_pad(SRC), torch.tensor(TGT))
    ours = our_logits(model, SRC, TGT)  # right-padded, padding-aware positions
    assert (ours - ref).abs().max().item() <= TOL
    for i in range(len(SRC)):
        assert (our_logits(model, [SRC[i]], [TGT[i]])[0] - ours[i]).abs().max().item() <= TOL


def test_missing_version_means_no_final_norm(tmp_path, reg):
    """fairseq: a stack without a version key (old checkpoints) has no final LayerNorm."""
    o = VARIANTS["preln-learned-lnemb-gelu"][0]
    st = random_fairseq_state(o, 40, 48, seed=1)
    for k in [k for k in st if k.endswith(".version") or k.startswith(("encoder.layer_norm.", "decoder.layer_norm."))]:
        del st[k]
    ckpt = write_fairseq_checkpoint(tmp_path / "model.pt", st, o, "args")
    model, src = load(ckpt, reg)
    assert not src.config.encoder_final_norm and not src.config.decoder_final_norm
    ref = ref_forward(st, o, left_pad(SRC), torch.tensor(TGT))
    assert (our_logits(model, SRC, TGT) - ref).abs().max().item() <= TOL


def test_hf_loader_rebuilds_fsmt_from_fairseq(tmp_path, reg, fsmt):
    fam = reg.get("nmt")
    ckpt = write_fairseq_checkpoint(tmp_path / "model.pt", fairseq_state_from_fsmt(fsmt), fsmt_options(fsmt))
    rebuilt = fam.hf_loader(ckpt)
    assert (fsmt_logits(rebuilt, SRC, TGT) - fsmt_logits(fsmt, SRC, TGT)).abs().max().item() <= 1e-6
    o = VARIANTS["preln-learned-lnemb-gelu"][0]
    pre = write_fairseq_checkpoint(tmp_path / "pre" / "model.pt", random_fairseq_state(o, 40, 48), o)
    from encdec_core.errors import EncDecError

    with pytest.raises(EncDecError, match="FSMT cannot express pre-LN"):
        fam.hf_loader(pre)
