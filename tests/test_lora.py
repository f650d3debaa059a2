"""LoRA adapters (plugins/encdec_lora): peft adapters merged at conversion, against peft itself.

Tiny T5 / BART models from config classes (fixed seeds), adapters made by peft with
``init_lora_weights=False`` (B != 0, so the update is not zero), saved with ``save_pretrained``. The
references are peft's merged model (``merge_and_unload``: HF's numerics of the merged weights) and
the unmerged peft model (base + scale * B A x at run time): fp32 logits within 1e-4 of both, greedy
and beam tokens equal to peft's ``generate``.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from _mpi import need_mpi

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from encdec_core import checkpoint  # noqa: E402
from encdec_core.convert import convert, load_source_model  # noqa: E402
from encdec_core.errors import ConfigError, EncDecError, WeightError  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def reg():
    from conftest import make_registry

    return make_registry("encdec_t5.plugin", "encdec_bart.plugin", "encdec_lora.plugin")


def _t5_base(out: Path, seed: int = 0):
    cfg = transformers.T5Config(vocab_size=96, d_model=24, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    m = transformers.T5ForConditionalGeneration(cfg).eval()
    # transformers 5.24's T5Config ties whatever it is told: an own lm_head (tests/test_t5_parity.py's recipe)
    m.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model) * cfg.d_model ** -0.5)
    tied = dict(m.all_tied_weights_keys)
    tied.pop("lm_head.weight", None)
    m.all_tied_weights_keys = tied
    m.save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    data["tie_word_embeddings"] = False
    data.pop("scale_decoder_outputs", None)
    (out / "config.json").write_text(json.dumps(data, indent=2))
    m = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()  # as HF reads the folder
    assert m.lm_head.weight.data_ptr() != m.shared.weight.data_ptr()
    return m


def _bart_base(out: Path, seed: int = 0):
    from _bart_helpers import make_model

    return make_model(out, "bart", dict(d_model=24, encoder_layers=2, decoder_layers=2, encoder_attention_heads=3,
                                        decoder_attention_heads=3, encoder_ffn_dim=40, decoder_ffn_dim=36,
                                        max_position_embeddings=48, scale_embedding=False), vocab_size=90, seed=seed)


def _adapter(base, out: Path, seed: int, **lora):
    """Save a peft LoRA adapter of ``base`` (random A and B) to ``out``; return the unmerged peft model."""
    torch.manual_seed(seed)
    lc = peft.LoraConfig(task_type="SEQ_2_SEQ_LM", init_lora_weights=False, lora_dropout=0.0, **lora)
    pm = peft.get_peft_model(base, lc).eval()
    pm.save_pretrained(out)
    return pm


def _inputs(vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 1 if vocab == 90 else 0
    dec = torch.randint(3, vocab, (2, 9), generator=g)
    dec[:, 0] = 2 if vocab == 90 else 0
    return ids, mask, dec


def _logits(m, ids, mask, dec):
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits.float()


T5_CASES = {
    # attention q / v of every attention, plain scale alpha / r
    "qv": dict(r=4, lora_alpha=8, target_modules=["q", "v"]),
    # every linear, rsLoRA scale, per-module rank and alpha
    "all-rslora-patterns": dict(r=4, lora_alpha=6, target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
                                use_rslora=True, rank_pattern={"wo": 2}, alpha_pattern={"EncDecAttention.q": 3}),
    # patterns with an alternation: peft matches (.*\.)?(k|wo)$, the "|" inside the group (ours split
    # the whole pattern at it: a wrong scale for v, and the rank 3 of wo refused)
    "pattern-alternation": dict(r=4, lora_alpha=8, target_modules=["q", "k", "v", "wo"], rank_pattern={"k|wo": 3},
                                alpha_pattern={"q|v": 13}),
}


@pytest.mark.parametrize("case", sorted(T5_CASES))
def test_t5_adapter_merged_at_convert_matches_peft(tmp_path, reg, case):
    base = _t5_base(tmp_path / "hf")
    pm = _adapter(base, tmp_path / "lora", seed=5, **T5_CASES[case])
    out = convert(tmp_path / "hf", tmp_path / "ckpt", reg=reg, adapters=[tmp_path / "lora"])
    meta = json.loads((out / "config.json").read_text())
    assert [a["kind"] for a in meta["adapters"]] == ["lora"] and meta["adapters"][0]["modules"] > 0
    ours = checkpoint.load_model(out)
    ids, mask, dec = _inputs(96)
    unmerged = _logits(pm, ids, mask, dec)
    merged = _logits(copy.deepcopy(pm).merge_and_unload(), ids, mask, dec)  # HF numerics of the merged model
    with torch.no_grad():
        got = ours(ids, mask, dec)
        plain = load_source_model(tmp_path / "hf", reg=reg)[0](ids, mask, dec)
    assert (got - merged).abs().max().item() <= TOL
    assert (got - unmerged).abs().max().item() <= TOL
    # the adapter changes the model: the merged logits are far from the base model's
    assert (plain - merged).abs().max().item() > 1.0


def test_bart_adapter_with_trained_biases_matches_peft_generate(tmp_path, reg):
    from encdec_core.runtime.generation import GenerationConfig, generate

    base = _bart_base(tmp_path / "hf")
    pm = _adapter(base, tmp_path / "lora", seed=7, r=3, lora_alpha=5,
                  target_modules=["q_proj", "v_proj", "out_proj", "fc1", "fc2"], bias="lora_only")
    with torch.no_grad():  # trained biases differ from the base's
        for n, p in pm.named_parameters():
            if n.endswith("bias") and p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "lora")
    ours, _, _ = load_source_model(tmp_path / "hf", reg=reg, adapters=[tmp_path / "lora"])
    ids, mask, dec = _inputs(90)
    with torch.no_grad():
        got = ours(ids, mask, dec)
    want = _logits(pm, ids, mask, dec)
    assert (got - want).abs().max().item() <= TOL
    for beams in (1, 3):
        gc = GenerationConfig(max_new_tokens=8, num_beams=beams, decoder_start_token_id=2, eos_token_id=2,
                              pad_token_id=1, forced_eos_token_id=None)
        res = generate(ours, ids, mask, gc)
        with torch.no_grad():
            hf = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=beams, do_sample=False,
                             decoder_start_token_id=2, eos_token_id=2, pad_token_id=1, forced_eos_token_id=None,
                             forced_bos_token_id=None, early_stopping=True if beams > 1 else False)
        for i in range(ids.shape[0]):
            h = hf[i].tolist()[1:]
            h = h[:h.index(2)] if 2 in h else [t for t in h if t != 1]
            assert res.tokens(i) == h, (beams, i)


def test_two_adapters_merge_in_order_and_shard(tmp_path, reg):
    base = _t5_base(tmp_path / "hf")
    a1 = _adapter(base, tmp_path / "a1", seed=1, r=2, lora_alpha=2, target_modules=["q", "wo"])
    merged = a1.merge_and_unload()  # peft: base + adapter 1 ...
    a2 = _adapter(merged, tmp_path / "a2", seed=2, r=4, lora_alpha=4, target_modules=["q", "v"])  # ... + adapter 2
    ids, mask, dec = _inputs(96)
    want = _logits(a2, ids, mask, dec)
    one = convert(tmp_path / "hf", tmp_path / "tp1", reg=reg, adapters=[tmp_path / "a1", tmp_path / "a2"])
    with torch.no_grad():
        got = checkpoint.load_model(one)(ids, mask, dec)
    assert (got - want).abs().max().item() <= TOL
    # the merge happens before sharding: TP = 3 shards hold the merged model
    two = convert(tmp_path / "hf", tmp_path / "tp2", tp=3, reg=reg, adapters=[tmp_path / "a1", tmp_path / "a2"])
    from safetensors.torch import load_file

    full = load_file(str(one / "rank0.safetensors"))
    parts = [load_file(str(two / f"rank{r}.safetensors")) for r in range(3)]
    name = next(k for k in full if "self_attn" in k and k.endswith("weight") and "decoder" in k and "qkv" in k)
    assert sum(p[name].numel() for p in parts) == full[name].numel()


def _write_adapter(d: Path, cfg: dict, tensors: dict):
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **cfg}))
    save_file(tensors, str(d / "adapter_model.safetensors"))


Q0 = "base_model.model.encoder.block.0.layer.0.SelfAttention.q"


@pytest.mark.parametrize("cfg,tensors,exc,words", [
    ({"use_dora": True}, None, ConfigError, ["use_dora", "DoRA"]),
    ({"modules_to_save": ["lm_head"]}, None, ConfigError, ["modules_to_save", "merge_and_unload"]),
    ({"peft_type": "IA3"}, None, ConfigError, ["peft_type", "'IA3'", "LORA"]),
    ({"r": 0}, None, ConfigError, ["'r' = 0", "positive integer"]),
    ({}, {"base_model.model.encoder.block.0.layer.0.SelfAttention.zz.lora_A.weight": torch.ones(2, 24),
          "base_model.model.encoder.block.0.layer.0.SelfAttention.zz.lora_B.weight": torch.ones(24, 2)},
     WeightError, ["does not fit", "SelfAttention.zz.weight", "not in"]),
    ({}, {f"{Q0}.lora_A.weight": torch.ones(2, 20), f"{Q0}.lora_B.weight": torch.ones(24, 2)},
     WeightError, ["wrong shape", "24 x 20", "(24, 24)"]),
    ({}, {f"{Q0}.lora_A.weight": torch.ones(2, 24)}, WeightError, ["lora_B.weight missing"]),
    ({}, {f"{Q0}.lora_A.weight": torch.ones(3, 24), f"{Q0}.lora_B.weight": torch.ones(24, 3)},
     WeightError, ["rank 3 in the weights, 2 in the config"]),
    ({}, {"base_model.model.shared.lora_embedding_A": torch.ones(2, 96)}, ConfigError, ["embedding LoRA"]),
])
def test_bad_adapters_name_file_field_and_value(tmp_path, reg, cfg, tensors, exc, words):
    _t5_base(tmp_path / "hf")
    if tensors is None:
        tensors = {f"{Q0}.lora_A.weight": torch.ones(2, 24), f"{Q0}.lora_B.weight": torch.ones(24, 2)}
    _write_adapter(tmp_path / "lora", cfg, tensors)
    with pytest.raises(exc) as ei:
        convert(tmp_path / "hf", tmp_path / "ckpt", reg=reg, adapters=[tmp_path / "lora"])
    msg = str(ei.value)
    assert str(tmp_path / "lora") in msg
    for w in words:
        assert w in msg, (w, msg)
    assert not (tmp_path / "ckpt").exists()


def test_adapter_on_a_tied_tensor_is_refused(tmp_path, reg):
    """BART ties lm_head to the shared embedding: the family drops lm_head.weight, so an adapter that
    changes it would silently do nothing; it is refused instead."""
    base = _bart_base(tmp_path / "hf")
    sd = base.state_dict()
    assert "lm_head.weight" in sd
    from safetensors.torch import load_file, save_file

    f = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(f))
    if "lm_head.weight" not in tensors:  # transformers may not save the tied copy: put it back
        tensors["lm_head.weight"] = sd["lm_head.weight"].clone()
        save_file(tensors, str(f), metadata={"format": "pt"})
    _write_adapter(tmp_path / "lora", {}, {"base_model.model.lm_head.lora_A.weight": torch.ones(2, 24),
                                           "base_model.model.lm_head.lora_B.weight": torch.ones(90, 2)})
    with pytest.raises(EncDecError) as ei:
        convert(tmp_path / "hf", tmp_path / "ckpt", reg=reg, adapters=[tmp_path / "lora"])
    assert "lm_head.weight" in str(ei.value) and "does not load" in str(ei.value)


def test_not_an_adapter_directory(tmp_path, reg):
    _t5_base(tmp_path / "hf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncDecError) as ei:
        convert(tmp_path / "hf", tmp_path / "ckpt", reg=reg, adapters=[tmp_path / "empty"])
    assert str(tmp_path / "empty") in str(ei.value) and "lora" in str(ei.value)


def test_adapter_on_an_untied_lm_head_with_its_saved_base_weight(tmp_path, reg):
    """peft saves lm_head.base_layer.weight beside the factors when a target is lm_head
    (save_embedding_layers "auto"): refused as an unknown tensor before. A merge starts from it, as
    peft's load does; run-time LoRA cannot serve the output embedding and says so at convert (the
    engine failed at its first load)."""
    from test_t5_parity import inputs as t5_inputs
    from test_t5_parity import make_hf_dir

    make_hf_dir("flan-t5", tmp_path / "hf")  # an lm_head of its own (transformers 5.24's T5Config ties)
    base = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    assert base.lm_head.weight.data_ptr() != base.shared.weight.data_ptr()
    pm = _adapter(base, tmp_path / "lora", seed=3, r=3, lora_alpha=5, target_modules=["q", "lm_head"])
    from safetensors.torch import load_file

    assert any(k.endswith("lm_head.base_layer.weight") for k in load_file(str(tmp_path / "lora" /
                                                                              "adapter_model.safetensors")))
    ids, mask, dec = t5_inputs(base.config.vocab_size, seed=9)
    merged = _logits(copy.deepcopy(pm).merge_and_unload(), ids, mask, dec)
    out = convert(tmp_path / "hf", tmp_path / "ckpt", reg=reg, adapters=[tmp_path / "lora"])
    with torch.no_grad():
        assert (checkpoint.load_model(out)(ids, mask, dec) - merged).abs().max().item() <= TOL
    with pytest.raises(ConfigError, match=r"carries base weights of its own \(lm_head\.base_layer\.weight"):
        convert(tmp_path / "hf", tmp_path / "rt", reg=reg, adapters=[tmp_path / "lora"], adapter_mode="runtime")
    pm.save_pretrained(tmp_path / "lora2", save_embedding_layers=False)
    with pytest.raises(ConfigError, match=r"adapts lm_head\.weight, which is not a linear layer of ours"):
        convert(tmp_path / "hf", tmp_path / "rt", reg=reg, adapters=[tmp_path / "lora2"], adapter_mode="runtime")
    assert not (tmp_path / "rt").exists()


def test_scale_is_alpha_over_r_or_sqrt_r(tmp_path):
    from encdec_lora.plugin import load

    _write_adapter(tmp_path / "a", {"r": 4, "lora_alpha": 8}, {f"{Q0}.lora_A.weight": torch.ones(4, 24),
                                                               f"{Q0}.lora_B.weight": torch.ones(24, 4)})
    assert load(tmp_path / "a").updates[Q0.removeprefix("base_model.model.")][2] == 2.0
    _write_adapter(tmp_path / "b", {"r": 4, "lora_alpha": 8, "use_rslora": True},
                   {f"{Q0}.lora_A.weight": torch.ones(4, 24), f"{Q0}.lora_B.weight": torch.ones(24, 4)})
    assert math.isclose(load(tmp_path / "b").updates[Q0.removeprefix("base_model.model.")][2], 4.0)


def test_cli_convert_with_lora_dir_then_run_compare_hf(builtin_registry, tmp_path, tmp_path_factory, capsys):
    """`encdec convert --lora-dir` -> build -> run --compare-hf: the HF side gets the same adapter
    (peft's merge), and our greedy and beam outputs match it; `encdec plugins` lists the kind."""
    import shutil

    from _bart_helpers import load_hf, tiny
    from encdec_core.cli import main

    src = tmp_path / "hf"
    shutil.copytree(tiny("bart", tmp_path_factory), src)
    base = load_hf(src)
    _adapter(base, tmp_path / "lora", seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc2"])
    ck, eng = tmp_path / "ckpt", tmp_path / "engine"
    assert main(["convert", "--model-dir", str(src), "--output-dir", str(ck), "--lora-dir", str(tmp_path / "lora"),
                 "--quiet"]) == 0
    assert "1 adapter(s) merged" in capsys.readouterr().out
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(eng), "--max-batch-size", "4",
                 "--max-input-len", "32", "--max-output-len", "12", "--max-beam-width", "2"]) == 0
    assert json.loads((eng / "config.json").read_text())["adapters"][0]["kind"] == "lora"  # what --compare-hf reads
    texts = ["The house is wonderful.", "I like green apples and red cherries."]
    for beams in ("1", "2"):
        out_json = tmp_path / f"out{beams}.json"
        rc = main(["run", "--engine-dir", str(eng), "--input-text", *texts, "--compare-hf", "--device", "cpu",
                   "--num-beams", beams, "--max-new-tokens", "10", "--output-json", str(out_json)])
        printed = capsys.readouterr().out
        assert rc == 0, printed
        res = json.loads(out_json.read_text())["results"]
        assert [r["match"] for r in res] == [True, True], res
    # the adapter changed the outputs: the base model's (plain convert) differ
    ck0 = tmp_path / "ckpt0"
    assert main(["convert", "--model-dir", str(src), "--output-dir", str(ck0), "--quiet"]) == 0
    from encdec_core import checkpoint as ckpt

    m0, m1 = ckpt.load_model(ck0), ckpt.load_model(ck)
    ids = torch.tensor([[0, 50, 60, 70, 2]])
    with torch.no_grad():
        d = (m0(ids, torch.ones_like(ids), ids[:, :3]) - m1(ids, torch.ones_like(ids), ids[:, :3])).abs().max()
    assert d > 1e-2
    capsys.readouterr()
    assert main(["plugins", "--json"]) == 0
    assert "lora" in [a["name"] for a in json.loads(capsys.readouterr().out)["adapters"]]


def test_fairseq_nmt_adapter_on_fsmt_folder_and_fairseq_checkpoint(tmp_path):
    """The NMT family: an adapter trained on transformers' FSMT merges into the FSMT folder and into the
    fairseq checkpoint of the same weights (fairseq names lack FSMT's leading ``model.``)."""
    from _nmt_helpers import fairseq_state_from_fsmt, fsmt_options, tiny_fsmt, write_fairseq_checkpoint
    from conftest import make_registry
    from test_nmt_parity import SRC, TGT, fsmt_logits, our_logits

    reg = make_registry("encdec_nmt.plugin", "encdec_lora.plugin")
    base = tiny_fsmt(seed=0)
    base.save_pretrained(tmp_path / "fsmt")
    state = fairseq_state_from_fsmt(base)
    ckpt = write_fairseq_checkpoint(tmp_path / "fairseq" / "model.pt", state, fsmt_options(base), "args")
    pm = _adapter(base, tmp_path / "lora", seed=4, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"])
    want = fsmt_logits(copy.deepcopy(pm).merge_and_unload(), SRC, TGT)
    assert (fsmt_logits(pm, SRC, TGT) - want).abs().max().item() <= TOL
    for src in (tmp_path / "fsmt", ckpt):
        ours, _, fam = load_source_model(src, reg=reg, adapters=[tmp_path / "lora"])
        assert fam.name == "nmt"
        assert (our_logits(ours, SRC, TGT) - want).abs().max().item() <= TOL, src
        plain, _, _ = load_source_model(src, reg=reg)
        assert (our_logits(plain, SRC, TGT) - want).abs().max().item() > 1e-2


# ------------------------------------------------------------------------------- run-time adapters
def _adapters(tmp_path, base, specs, seed: int) -> list:
    """One peft adapter per spec on copies of ``base``, saved to tmp_path/a0, a1, ...; their folders."""
    dirs = []
    for i, spec in enumerate(specs):
        _adapter(copy.deepcopy(base), tmp_path / f"a{i}", seed=seed + i, **spec)
        dirs.append(tmp_path / f"a{i}")
    return dirs


def _engine(tmp_path, name, reg, src, adapters=(), mode="merge"):
    from encdec_core.engine import Engine, build

    ck = convert(src, tmp_path / f"ck-{name}", reg=reg, adapters=adapters, adapter_mode=mode)
    eng = build(ck, tmp_path / f"en-{name}", max_batch_size=8, max_input_len=32, max_output_len=12, max_beam_width=3)
    return Engine.load(eng)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_runtime_adapters_per_request_equal_merged_models(tmp_path, reg, family):
    """convert --lora-mode runtime keeps two adapters apart; a batch mixing uid 0, the base model (-1)
    and uid 1 gives each row the logits and tokens of the model with that adapter merged."""
    if family == "t5":
        base = _t5_base(tmp_path / "hf")
        specs = [dict(r=2, lora_alpha=4, target_modules=["q", "v", "wo"]),
                 dict(r=4, lora_alpha=3, target_modules=["k", "o", "wi_0", "EncDecAttention.q"], use_rslora=True)]
        vocab, start = 96, 0
    else:
        base = _bart_base(tmp_path / "hf")
        specs = [dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc2"]),
                 dict(r=3, lora_alpha=6, target_modules=["k_proj", "out_proj", "fc1"])]
        vocab, start = 90, 2
    dirs = _adapters(tmp_path, base, specs, 10)
    rt = _engine(tmp_path, "rt", reg, tmp_path / "hf", dirs, "runtime")
    assert len(rt.meta["lora_runtime"]) == 2 and (rt.engine_dir / "lora" / "adapter1.safetensors").is_file()
    merged = [_engine(tmp_path, f"m{i}", reg, tmp_path / "hf", [d]) for i, d in enumerate(dirs)]
    plain = _engine(tmp_path, "plain", reg, tmp_path / "hf")
    by_uid = {0: merged[0], 1: merged[1], -1: plain}
    uids = [0, -1, 1, 1]
    ids, mask, dec = _inputs(vocab)
    ids, mask, dec = ids.repeat(2, 1), mask.repeat(2, 1), dec.repeat(2, 1)
    with torch.no_grad(), rt.model.lora_bank.rows(uids):
        got = rt.model(ids, mask, dec)
    for i, u in enumerate(uids):
        with torch.no_grad():
            want = by_uid[u].model(ids[i:i + 1], mask[i:i + 1], dec[i:i + 1])
        assert (got[i:i + 1] - want).abs().max().item() <= TOL, (i, u)
    with torch.no_grad():  # outside the block: the base model
        assert (rt.model(ids[:1], mask[:1], dec[:1]) - plain.model(ids[:1], mask[:1], dec[:1])).abs().max() <= TOL
    seqs = [[int(t) for t in row[: int(m.sum())]] for row, m in zip(ids, mask)]
    want = {}
    for beams in (1, 3):
        out = rt.generate_ids(seqs, lora_uids=uids, num_beams=beams, max_new_tokens=10)
        for i, u in enumerate(uids):
            want[beams, i] = by_uid[u].generate_ids([seqs[i]], num_beams=beams, max_new_tokens=10).tokens(0)
            assert out.tokens(i) == want[beams, i], (beams, i, u)
    # the static-buffer runner (the CUDA-graph runner's code; on a CPU without graphs, its step
    # uncompiled here, compiled by inductor in test_runtime_adapters_in_the_compiled_runner): each
    # row's first-step logits and tokens are its merged model's, beams and sampling rows included
    from encdec_core.runtime.cuda import CudaGraphRunner

    r = CudaGraphRunner.for_engine(rt, compile=False)
    with torch.no_grad(), rt.model.lora_bank.rows(uids):
        r.prefill(ids, mask, 1, 12)
        first = r.step(dec[:, 0]).clone()
    for i, u in enumerate(uids):
        with torch.no_grad():
            ref = by_uid[u].model(ids[i:i + 1], mask[i:i + 1], dec[i:i + 1, :1])[:, -1].float()
        assert (first[i:i + 1] - ref).abs().max().item() <= TOL, (i, u)
    for beams in (1, 3):
        out = rt.generate_ids(seqs, lora_uids=uids, num_beams=beams, max_new_tokens=10, runner=r)
        for i, u in enumerate(uids):
            assert out.tokens(i) == want[beams, i], ("runner", beams, i, u)
    assert any(k[-1] == "lora" for k in r._graphs)  # the batches above ran the adapter variant
    base_want = [plain.generate_ids([s], max_new_tokens=10).tokens(0) for s in seqs[:2]]
    n_graphs = len(r._graphs)
    from encdec_core.runtime.lora import LoraDelta

    calls = []
    real = LoraDelta.delta
    LoraDelta.delta = lambda self, x, uids: calls.append(1) or real(self, x, uids)
    try:
        for lora_uids in (None, [-1, -1]):  # no request names an adapter: the graphs without adapter kernels
            out = rt.generate_ids(seqs[:2], lora_uids=lora_uids, max_new_tokens=10, runner=r)
            assert [out.tokens(i) for i in range(2)] == base_want, lora_uids
        assert not calls  # (the runner's step is not compiled here: every call runs this Python)
        assert len(r._graphs) == n_graphs + 1 and ("greedy", 2, 16, 1) in r._graphs  # one base variant, shared
        rt.generate_ids(seqs[:2], lora_uids=[0, -1], max_new_tokens=2, runner=r)
        assert calls
    finally:
        LoraDelta.delta = real

    # teacher-forced scores: each pair with its adapter equals the merged model's score
    targets = [o for o in (want[1, i] for i in range(len(uids)))]
    got = rt.score_ids(seqs, targets, lora_uids=uids)
    for i, u in enumerate(uids):
        ref = by_uid[u].score_ids([seqs[i]], [targets[i]])[0]
        assert got[i].tokens == ref.tokens
        assert max(abs(a - b) for a, b in zip(got[i].token_logprobs, ref.token_logprobs)) <= TOL, (i, u)
    assert abs(rt.score_ids(seqs[:1], targets[:1])[0].sum - plain.score_ids(seqs[:1], targets[:1])[0].sum) <= 1e-4

    # the adapters change the tokens somewhere (the comparison is not between equal models)
    assert any(merged[0].generate_ids([s], max_new_tokens=10).tokens(0)
               != plain.generate_ids([s], max_new_tokens=10).tokens(0) for s in seqs)
    assert start is not None


def test_code_compiled_for_a_model_without_adapters_is_not_reused(tmp_path, reg):
    """torch.compile keys its cache on the code, guarded by what the code read: an adapted layer's
    ``lora`` attribute is read (and guarded), a forward hook would not be (dynamo skips hook guards),
    so code compiled for the plain model must not serve the adapted one. Seen on an H200 with hooks:
    the graph runner's step for the adapted engine ran without the adapters."""
    base = _t5_base(tmp_path / "hf")
    _adapter(base, tmp_path / "a", seed=3, r=2, lora_alpha=4, target_modules=["q", "v", "wo"])
    plain = _engine(tmp_path, "p", reg, tmp_path / "hf")
    rt = _engine(tmp_path, "rt", reg, tmp_path / "hf", [tmp_path / "a"], "runtime")
    merged = _engine(tmp_path, "m", reg, tmp_path / "hf", [tmp_path / "a"])

    def layer0(model, x):
        att = model.decoder.layers["0"].self_attn
        return att.out(att.qkv(x)[..., : att.h * att.dh]), model.decoder.layers["0"].ffn(x)

    f = torch.compile(layer0, backend="eager", fullgraph=True)
    x = torch.randn(3, 1, plain.model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for want, got in zip(layer0(plain.model, x), f(plain.model, x)):
            assert torch.equal(want, got)
        with rt.model.lora_bank.static_rows(torch.tensor([0, -1, 0])):
            got = f(rt.model, x)
        for g, m, p in zip(got, layer0(merged.model, x), layer0(plain.model, x)):
            assert (g[0::2] - m[0::2]).abs().max().item() <= TOL  # uid 0: the merged model
            assert (g[1] - p[1]).abs().max().item() <= TOL  # uid -1: the base model
            assert (m[0::2] - p[0::2]).abs().max().item() > 1e-2


def test_runtime_adapters_in_the_compiled_runner(tmp_path, reg):
    """The compiled static step (inductor on a CPU; on CUDA the same step inside CUDA graphs) traces
    the adapted layers' updates: a batch mixing uids gives each row its merged model's greedy tokens,
    and a second batch with other uids reuses the compiled step (the uids are a buffer, not a guard).
    With inductor's freezing (the CPU default) that buffer was folded into a constant: the second
    batch ran with the first batch's uids. Seen once _t5_base's lm_head was untied for real."""
    import torch._dynamo.utils as dyn_utils

    from encdec_core.runtime.cuda import CudaGraphRunner

    base = _t5_base(tmp_path / "hf")
    specs = [dict(r=2, lora_alpha=4, target_modules=["q", "v", "wo"]),
             dict(r=3, lora_alpha=3, target_modules=["k", "wi_0", "EncDecAttention.o"])]
    dirs = _adapters(tmp_path, base, specs, 20)
    rt = _engine(tmp_path, "rt", reg, tmp_path / "hf", dirs, "runtime")
    by_uid = {0: _engine(tmp_path, "m0", reg, tmp_path / "hf", [dirs[0]]),
              1: _engine(tmp_path, "m1", reg, tmp_path / "hf", [dirs[1]]), -1: _engine(tmp_path, "p", reg, tmp_path / "hf")}
    ids, mask, _ = _inputs(96)
    seqs = [[int(t) for t in row[: int(m.sum())]] for row, m in zip(ids, mask)]
    r = CudaGraphRunner.for_engine(rt)  # compile=True: inductor on a CPU
    assert r._fused is None
    for n, (uids, beams) in enumerate([([1, 0], 1), ([-1, 1], 1), ([-1, -1], 1)]):  # beams: the per-request test
        if n == 1:
            graphs = dyn_utils.counters["stats"]["unique_graphs"]
        out = rt.generate_ids(seqs, lora_uids=uids, num_beams=beams, max_new_tokens=8, runner=r)
        for i, u in enumerate(uids):
            assert out.tokens(i) == by_uid[u].generate_ids([seqs[i]], num_beams=beams, max_new_tokens=8).tokens(0), \
                (uids, beams, i)
        if n == 1:  # same shapes, other uids: nothing compiled anew
            assert dyn_utils.counters["stats"]["unique_graphs"] == graphs


def test_runtime_adapter_refusals(tmp_path, reg):
    base = _t5_base(tmp_path / "hf")
    _adapter(base, tmp_path / "a", seed=1, r=2, lora_alpha=2, target_modules=["q"])
    rt = _engine(tmp_path, "rt", reg, tmp_path / "hf", [tmp_path / "a"], "runtime")
    with pytest.raises(EncDecError, match=r"uid\(s\) \[1\]: expected -1 .* \[0, 1\)"):
        rt.generate_ids([[5, 6, 1]], lora_uids=[1], max_new_tokens=4)
    with pytest.raises(EncDecError, match="2 for 1 inputs"):
        rt.generate_ids([[5, 6, 1]], lora_uids=[0, 0], max_new_tokens=4)
    with pytest.raises(EncDecError, match="not built for this engine's adapters"):
        rt.generate_ids([[5, 6, 1]], lora_uids=[0], runner=object(), max_new_tokens=4)
    plain = _engine(tmp_path, "plain", reg, tmp_path / "hf")
    with pytest.raises(EncDecError, match="no run-time adapters"):
        plain.generate_ids([[5, 6, 1]], lora_uids=[0], max_new_tokens=4)
    with pytest.raises(ConfigError, match="--tp-size 2 does not divide the encoder's 3 attention heads"):
        convert(tmp_path / "hf", tmp_path / "tp", tp=2, reg=reg, adapters=[tmp_path / "a"], adapter_mode="runtime")
    assert not (tmp_path / "tp").exists()
    b = _bart_base(tmp_path / "hfb")
    _adapter(b, tmp_path / "ab", seed=2, r=2, lora_alpha=2, target_modules=["q_proj"], bias="lora_only")
    with pytest.raises(ConfigError, match="trains biases"):
        convert(tmp_path / "hfb", tmp_path / "x", reg=reg, adapters=[tmp_path / "ab"], adapter_mode="runtime")


def test_cli_runtime_adapters_with_task_uids_and_compare_hf(builtin_registry, tmp_path, tmp_path_factory, capsys):
    import shutil

    from _bart_helpers import load_hf, tiny
    from encdec_core.cli import main

    src = tmp_path / "hf"
    shutil.copytree(tiny("bart", tmp_path_factory), src)
    _adapter(load_hf(src), tmp_path / "a0", seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc2"])
    _adapter(load_hf(src), tmp_path / "a1", seed=4, r=2, lora_alpha=8, target_modules=["k_proj", "fc1"])
    ck, eng = tmp_path / "ckpt", tmp_path / "engine"
    assert main(["convert", "--model-dir", str(src), "--output-dir", str(ck), "--lora-dir", str(tmp_path / "a0"),
                 "--lora-dir", str(tmp_path / "a1"), "--lora-mode", "runtime", "--quiet"]) == 0
    assert "2 adapter(s) kept for run time" in capsys.readouterr().out
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(eng), "--max-batch-size", "4",
                 "--max-input-len", "32", "--max-output-len", "12", "--max-beam-width", "2"]) == 0
    texts = ["The house is wonderful.", "I like green apples and red cherries.", "The cat sleeps on the sofa."]
    out_json = tmp_path / "out.json"
    rc = main(["run", "--engine-dir", str(eng), "--input-text", *texts, "--lora-task-uids", "0", "-1", "1",
               "--compare-hf", "--device", "cpu", "--max-new-tokens", "10", "--output-json", str(out_json)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert [r["match"] for r in json.loads(out_json.read_text())["results"]] == [True, True, True]
    assert main(["run", "--engine-dir", str(eng), "--input-text", *texts, "--lora-task-uids", "0", "1",
                 "--device", "cpu", "--max-new-tokens", "4"]) == 2
    assert "2 for 3 inputs" in capsys.readouterr().err
    # encdec score with per-pair adapters: each pair scores as with its adapter alone
    from encdec_core.engine import Engine

    outs = ["Das Haus.", "Le chat.", "Die Katze."]
    scored = tmp_path / "score.json"
    assert main(["score", "--engine-dir", str(eng), "--source-text", *texts, "--target-text", *outs,
                 "--lora-task-uids", "0", "-1", "1", "--device", "cpu", "--output-json", str(scored)]) == 0
    rows = json.loads(scored.read_text())["results"]
    engine = Engine.load(eng)
    for i, u in enumerate((0, -1, 1)):
        alone = engine.score([texts[i]], [outs[i]], lora_uids=u)[0]
        assert rows[i]["sum"] == pytest.approx(alone.sum, abs=1e-4)
    assert rows[0]["sum"] != pytest.approx(engine.score([texts[0]], [outs[0]])[0].sum, abs=1e-3)


def test_serve_merged_batch_with_per_request_lora_uids(builtin_registry, tmp_path, reg, monkeypatch):
    """encdec serve with run-time adapters: generate requests with equal options and different
    ``parameters.lora_uid`` (1 for two inputs, -1, null, 0), submitted together, run as one batch
    (Scheduler._gather -> _run_generate: one engine.generate call with a uid per input), and each
    request gets exactly its output alone with its uid, and for uid u >= 0 the output of the model
    with adapter u merged at convert time; greedy and beam (2) decoding."""
    from _cli_helpers import make_t5_dir
    from encdec_core.runtime.generation import GenerationConfig
    from encdec_core.serve import Job, Scheduler, batch_key, parse_generate

    src = make_t5_dir(tmp_path / "hf")  # a tiny T5 with a ByT5 tokenizer: serve's requests are texts
    base = transformers.T5ForConditionalGeneration.from_pretrained(src).eval()
    specs = [dict(r=2, lora_alpha=4, target_modules=["q", "v", "wo"]),
             dict(r=4, lora_alpha=3, target_modules=["k", "o", "wi", "EncDecAttention.q"], use_rslora=True)]
    dirs = _adapters(tmp_path, base, specs, 40)
    rt = _engine(tmp_path, "rt", reg, src, dirs, "runtime")
    by_uid = {u: _engine(tmp_path, f"m{u}", reg, src, [d]) for u, d in enumerate(dirs)}
    gen_fields = set(GenerationConfig.field_names()) - {"decoder_start_token_id", "pad_token_id"}  # as Server's
    requests = [(["the cat sat on the mat", "hello world"], 1), (["a much longer input here"], -1),
                (["naïve café ✓"], None), (["x y the cat"], 0)]
    uid_per_input = [-1 if u is None else u for texts, u in requests for _ in texts]
    calls = []
    real = rt.generate

    def tokens(outs):
        return [[h.tokens for h in row] for row in outs]

    def spy(texts, **kw):
        calls.append((list(texts), kw.get("lora_uids")))
        return real(texts, **kw)

    for opts in (dict(max_new_tokens=10), dict(max_new_tokens=10, num_beams=2)):
        jobs = []
        for texts, u in requests:
            body = {"inputs": texts, "parameters": {**opts, "lora_uid": u, "return_scores": True}}
            texts, params, per, scores, _ = parse_generate(body, gen_fields)  # as the HTTP handler
            jobs.append(Job("generate", {"texts": texts, "params": params, "per": per, "scores": scores},
                            batch_key(params, scores)))
        assert len({j.key for j in jobs}) == 1  # lora_uid is per request, not part of the key
        s = Scheduler(rt, max_delay=5.0, max_inputs=len(uid_per_input))  # the batch fills: no wait
        calls.clear()
        monkeypatch.setattr(rt, "generate", spy)
        for j in jobs:  # all queued before the scheduler starts: it gathers them into one batch
            s.submit(j)
        try:
            s.start()
            for j in jobs:
                assert j.done.wait(60)
        finally:
            s.stop()
            monkeypatch.undo()
        assert s.batches == 1 and s.requests == len(requests) and len(calls) == 1, (s.batches, calls)  # merged
        for j, (texts, u) in zip(jobs, requests):
            what = (opts, texts, u)
            assert j.error is None, (what, j.error)
            alone = rt.generate(texts, return_scores=True, lora_uids=u, **opts)
            assert len(j.result) == len(texts)
            for got, want in zip(j.result, alone):
                assert [(h.text, h.tokens) for h in got] == [(h.text, h.tokens) for h in want], what
                for g, w in zip(got, want):
                    assert g.score == pytest.approx(w.score, abs=1e-4), what
                    assert g.token_logprobs == pytest.approx(w.token_logprobs, abs=1e-4), what
            if u is not None and u >= 0:
                merged = by_uid[u].generate(texts, return_scores=True, **opts)
                assert tokens(j.result) == tokens(merged), what
                for got, want in zip(j.result, merged):
                    assert got[0].score == pytest.approx(want[0].score, abs=1e-4), what
                # the adapter changes the outputs (tokens or scores): a batch run without the uids fails above
                base_out = rt.generate(texts, return_scores=True, **opts)
                assert tokens(j.result) != tokens(base_out) or any(
                    abs(g[0].score - b[0].score) > 0.1 for g, b in zip(j.result, base_out)), what
        assert calls[0] == ([t for texts, _ in requests for t in texts], uid_per_input)


@pytest.mark.gpu
def test_runtime_adapters_in_the_cuda_graph_runner(tmp_path, reg):
    """On a GPU (fp32): the CUDA-graph runner with run-time adapters: each row's first-step logits
    within 1e-4 of its merged model's, greedy and beam tokens equal."""
    from encdec_core.engine import Engine
    from encdec_core.runtime.cuda import CudaGraphRunner

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    base = _bart_base(tmp_path / "hf")
    specs = [dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc2"]),
             dict(r=3, lora_alpha=6, target_modules=["k_proj", "out_proj", "fc1"])]
    dirs = _adapters(tmp_path, base, specs, 30)

    def load(name, ad=(), mode="merge"):
        e = _engine(tmp_path, name, reg, tmp_path / "hf", ad, mode)
        return Engine.load(e.engine_dir, device="cuda", dtype=torch.float32)
    rt = load("rt", dirs, "runtime")
    by_uid = {0: load("m0", dirs[:1]), 1: load("m1", dirs[1:]), -1: load("p")}
    uids = [0, -1, 1, 1]
    ids, mask, dec = (t.repeat(2, 1).cuda() for t in _inputs(90))
    r = CudaGraphRunner.for_engine(rt)
    with torch.no_grad(), rt.model.lora_bank.rows(uids):
        r.prefill(ids, mask, 1, 12)
        first = r.step(dec[:, 0]).float().clone()
    for i, u in enumerate(uids):
        with torch.no_grad():
            ref = by_uid[u].model(ids[i:i + 1], mask[i:i + 1], dec[i:i + 1, :1])[:, -1].float()
        assert (first[i:i + 1] - ref).abs().max().item() <= TOL, (i, u)
    seqs = [[int(t) for t in row[: int(m.sum())]] for row, m in zip(ids, mask)]
    for beams in (1, 3):
        out = rt.generate_ids(seqs, lora_uids=uids, num_beams=beams, max_new_tokens=10, runner=r)
        for i, u in enumerate(uids):
            assert out.tokens(i) == by_uid[u].generate_ids([seqs[i]], num_beams=beams, max_new_tokens=10).tokens(0)


@need_mpi
@pytest.mark.mpi
def test_runtime_adapters_across_ranks_match_single_rank(tmp_path):
    """Run-time adapters under TP = 2 and PP = 2 (mpirun -n 2, gloo): each rank loads its shard and its
    slices of the whole factors (B's rows of column-parallel layers, A's columns of row-parallel ones,
    its stage's layers only); teacher-forced logits within 1e-5 of one rank's, greedy and beam ids
    equal for two uid mixes, and (TP) the static step's greedy, beam and fused greedy ids too."""
    from _mpi import mpirun

    sys.path.insert(0, str(Path(__file__).resolve().parent / "mpi_scripts"))
    import parallel_common as pc

    from encdec_core.checkpoint import load_model

    root = tmp_path / "models"
    names = pc.prepare_lora(root)
    assert names == ["flan-t5", "bart"]
    ref = {}
    for name in names:
        ck = root / f"lora-{pc.ckpt_name(name, 1, 1)}"
        model = load_model(ck)
        pc.load_lora_bank(model, ck)
        ref[name] = pc.lora_run_all(model)
        # the adapters change the tokens (the comparison is not between equal models)
        assert not torch.equal(ref[name]["greedy_ids_0"], ref[name]["static_greedy_ids_base"]), name
    r = mpirun(2, sys.executable, Path(__file__).resolve().parent / "mpi_scripts" / "lora_parity.py", root,
               tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in (0, 1):
        got_all = torch.load(tmp_path / "out" / f"rank{rank}.pt")["results"]
        for tp, pp in pc.MAPPINGS[2]:
            for name in names:
                got, want = got_all[f"{name}-tp{tp}pp{pp}"], ref[name]
                assert set(got) == {k for k in want if pp == 1 or not k.startswith("static_")}
                for k, v in got.items():
                    where = f"rank {rank} {name} tp{tp}pp{pp} {k}"
                    if v.is_floating_point():
                        assert (v - want[k]).abs().max().item() <= 1e-5, where
                    else:
                        assert torch.equal(v, want[k]), (where, v.tolist(), want[k].tolist())
