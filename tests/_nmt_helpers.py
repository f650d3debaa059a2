"""Test helpers for the fairseq NMT family: tiny FSMT models, a fairseq checkpoint writer of our own
(both styles, old-style key layout), random pre-LN fairseq states, dictionaries and BPE codes."""
from __future__ import annotations

import argparse
import re
from collections import OrderedDict
from pathlib import Path

import torch

PAD, EOS = 1, 2

CORPUS = [
    "The house is wonderful.",
    "The cat sat on the mat, and the dog slept.",
    "A small house stands near the old river.",
    "We love translating sentences with small models!",
    "The weather is nice today; let's walk to the river.",
    "Houses, cats and dogs are wonderful.",
    "Is the river cold in the winter?",
    "My friend's house has a red door.",
]


def tiny_fsmt(seed: int = 0, src_vocab: int = 40, tgt_vocab: int = 48, d: int = 32, heads: int = 4,
              enc_layers: int = 2, dec_layers: int = 3, enc_ffn: int = 64, dec_ffn: int = 48, tie: bool = False,
              activation: str = "relu", max_pos: int = 64, scale_embedding: bool = True):
    from transformers import FSMTConfig, FSMTForConditionalGeneration

    cfg = FSMTConfig(langs=["en", "de"], src_vocab_size=src_vocab, tgt_vocab_size=tgt_vocab, d_model=d,
                     encoder_layers=enc_layers, decoder_layers=dec_layers, encoder_attention_heads=heads,
                     decoder_attention_heads=heads, encoder_ffn_dim=enc_ffn, decoder_ffn_dim=dec_ffn,
                     activation_function=activation, max_position_embeddings=max_pos, tie_word_embeddings=tie,
                     scale_embedding=scale_embedding, init_std=0.1)
    torch.manual_seed(seed)
    model = FSMTForConditionalGeneration(cfg).eval()
    # biases and layer norms away from their init values, so a mix-up cannot go unnoticed
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name:
                continue
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
    return model


def fairseq_state_from_fsmt(model, version: bool = True, duplicates: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """FSMT's weights under fairseq 0.12.2 names (plus its version keys, _float_tensor buffers and
    the encoder-layer duplicates 0.12.2 writes)."""
    out = OrderedDict()
    for k, v in model.state_dict().items():
        k = k[len("model."):]
        if "embed_positions" in k:
            continue
        out[k] = v.detach().clone()
    cfg = model.config
    if cfg.tie_word_embeddings:
        out["encoder.embed_tokens.weight"] = out["decoder.embed_tokens.weight"]
        out["decoder.output_projection.weight"] = out["decoder.embed_tokens.weight"]
    for side in ("encoder", "decoder"):
        out[f"{side}.embed_positions._float_tensor"] = torch.FloatTensor(1)
        if version:
            out[f"{side}.version"] = torch.Tensor([3])
    if duplicates:
        for i in range(cfg.encoder_layers):
            p = f"encoder.layers.{i}"
            out[f"{p}.in_proj_weight"] = torch.cat([out[f"{p}.self_attn.{x}_proj.weight"] for x in "qkv"])
            out[f"{p}.in_proj_bias"] = torch.cat([out[f"{p}.self_attn.{x}_proj.bias"] for x in "qkv"])
            out[f"{p}.out_proj_weight"] = out[f"{p}.self_attn.out_proj.weight"]
            out[f"{p}.out_proj_bias"] = out[f"{p}.self_attn.out_proj.bias"]
            for fc in ("fc1", "fc2"):
                out[f"{p}.{fc}_weight"] = out[f"{p}.{fc}.weight"]
                out[f"{p}.{fc}_bias"] = out[f"{p}.{fc}.bias"]
    return out


def to_old_layout(state: dict) -> "OrderedDict[str, torch.Tensor]":
    """A 2018-style layout: stacked in_proj_weight/bias, layer_norms.N, decoder.embed_out, no version."""
    out = OrderedDict()
    ln = {"encoder": {"self_attn_layer_norm": 0, "final_layer_norm": 1},
          "decoder": {"self_attn_layer_norm": 0, "encoder_attn_layer_norm": 1, "final_layer_norm": 2}}
    pat = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$")
    for k, v in state.items():
        if k.endswith(".version"):
            continue
        if re.match(r"^encoder\.layers\.\d+\.(in_proj|out_proj|fc1|fc2)_(weight|bias)$", k):
            continue  # 0.12.2 duplicates did not exist then
        if k == "decoder.output_projection.weight":
            out["decoder.embed_out"] = v
            continue
        m = pat.match(k)
        if m:
            side, i, rest = m.groups()
            parts = rest.split(".")
            if parts[0] in ("self_attn", "encoder_attn") and parts[1] in ("q_proj", "k_proj", "v_proj"):
                if parts[1] != "q_proj":
                    continue
                kind = parts[2]
                out[f"{side}.layers.{i}.{parts[0]}.in_proj_{kind}"] = torch.cat(
                    [state[f"{side}.layers.{i}.{parts[0]}.{x}_proj.{kind}"] for x in "qkv"])
                continue
            if parts[0] in ln[side]:
                out[f"{side}.layers.{i}.layer_norms.{ln[side][parts[0]]}.{parts[1]}"] = v
                continue
        out[k] = v
    return out


def fsmt_options(model, **kw) -> dict:
    c = model.config
    o = dict(arch="transformer", encoder_embed_dim=c.d_model, decoder_embed_dim=c.d_model,
             encoder_ffn_embed_dim=c.encoder_ffn_dim, decoder_ffn_embed_dim=c.decoder_ffn_dim,
             encoder_layers=c.encoder_layers, decoder_layers=c.decoder_layers,
             encoder_attention_heads=c.encoder_attention_heads, decoder_attention_heads=c.decoder_attention_heads,
             activation_fn=c.activation_function, encoder_normalize_before=False, decoder_normalize_before=False,
             encoder_learned_pos=False, decoder_learned_pos=False, share_all_embeddings=bool(c.tie_word_embeddings),
             share_decoder_input_output_embed=bool(c.tie_word_embeddings),
             no_scale_embedding=not c.scale_embedding, max_source_positions=c.max_position_embeddings,
             max_target_positions=c.max_position_embeddings, dropout=0.1, attention_dropout=0.0,
             source_lang="en", target_lang="de")
    o.update(kw)
    return o


def write_fairseq_checkpoint(path: Path, state: dict, options: dict, style: str = "args") -> Path:
    """A checkpoint as fairseq writes one: legacy ``args`` Namespace, or ``cfg`` dict with a Namespace model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opts = dict(options)
    common = {
        "model": state,
        "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": 3.25}, "num_updates": 12}],
        "extra_state": {"epoch": 2, "train_iterator": {"epoch": 2, "iterations_in_epoch": 0, "shuffle": True},
                        "val_loss": 3.25, "previous_training_time": 1.5},
        "last_optimizer_state": {"state": {0: {"step": 12, "exp_avg": torch.zeros(3)}},
                                 "param_groups": [{"lr": 0.0005, "betas": (0.9, 0.98), "params": [0]}]},
    }
    if style == "args":
        ckpt = {"args": argparse.Namespace(**opts), **common}
    elif style == "cfg":
        task = {"_name": "translation", "source_lang": opts.pop("source_lang", None),
                "target_lang": opts.pop("target_lang", None), "data": "data-bin/x"}
        opts["_name"] = opts["arch"]
        ckpt = {"args": None, "cfg": {"_name": None, "common": {"fp16": False, "seed": 1},
                                      "model": argparse.Namespace(**opts), "task": task,
                                      "criterion": {"_name": "label_smoothed_cross_entropy"}}, **common}
    else:
        raise ValueError(style)
    torch.save(ckpt, path)
    return path


# --------------------------------------------------------------------------- random pre-LN states
def random_fairseq_state(o: dict, src_vocab: int, tgt_vocab: int, seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """Random weights under fairseq names for the options ``o`` (pre-LN, learned positions, ...)."""
    from encdec_nmt.fairseq_io import fill_defaults

    o = fill_defaults(o)  # shapes only: the architecture's values for options not given
    g = torch.Generator().manual_seed(seed)
    d = o["encoder_embed_dim"]

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    def ln(prefix):
        st[f"{prefix}.weight"] = 1.0 + r(d, s=0.1)
        st[f"{prefix}.bias"] = r(d, s=0.1)

    st: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    emb_src = r(src_vocab, d, s=0.5)
    st["encoder.embed_tokens.weight"] = emb_src
    st["decoder.embed_tokens.weight"] = emb_src if o.get("share_all_embeddings") else r(tgt_vocab, d, s=0.5)
    for side in ("encoder", "decoder"):
        n_pos = o["max_source_positions" if side == "encoder" else "max_target_positions"] + PAD + 1
        if o.get("encoder_learned_pos"):
            st[f"{side}.embed_positions.weight"] = r(n_pos, d, s=0.5)
        else:
            st[f"{side}.embed_positions._float_tensor"] = torch.FloatTensor(1)
        if o.get("layernorm_embedding"):
            ln(f"{side}.layernorm_embedding")
        ffn = o[f"{side}_ffn_embed_dim"]
        for i in range(o[f"{side}_layers"]):
            p = f"{side}.layers.{i}"
            attns = ["self_attn"] + (["encoder_attn"] if side == "decoder" else [])
            for a in attns:
                for x in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    st[f"{p}.{a}.{x}.weight"] = r(d, d, s=d ** -0.5)
                    st[f"{p}.{a}.{x}.bias"] = r(d, s=0.1)
                ln(f"{p}.{a}_layer_norm")
            st[f"{p}.fc1.weight"] = r(ffn, d, s=d ** -0.5)
            st[f"{p}.fc1.bias"] = r(ffn, s=0.1)
            st[f"{p}.fc2.weight"] = r(d, ffn, s=ffn ** -0.5)
            st[f"{p}.fc2.bias"] = r(d, s=0.1)
            ln(f"{p}.final_layer_norm")
        if o.get(f"{side}_normalize_before") and not (side == "decoder" and o.get("no_decoder_final_norm")):
            ln(f"{side}.layer_norm")
        st[f"{side}.version"] = torch.Tensor([3])
    if o.get("share_all_embeddings") or o.get("share_decoder_input_output_embed"):
        st["decoder.output_projection.weight"] = st["decoder.embed_tokens.weight"]
    else:
        st["decoder.output_projection.weight"] = r(tgt_vocab, d, s=d ** -0.5)
    return st


# --------------------------------------------------------------------------- text assets
def learn_bpe_codes(folder: Path, lines: list[str], num_symbols: int = 60, lang: str = "en") -> Path:
    """subword-nmt codes learned from moses-tokenized ``lines`` (written to folder/bpecodes)."""
    import io

    from sacremoses import MosesTokenizer
    from subword_nmt.learn_bpe import learn_bpe

    tok = MosesTokenizer(lang=lang)
    text = "\n".join(tok.tokenize(line, aggressive_dash_splits=True, return_str=True, escape=True)
                     for line in lines) + "\n"
    out = io.StringIO()
    learn_bpe(io.StringIO(text), out, num_symbols, min_frequency=2)
    path = Path(folder) / "bpecodes"
    path.write_text(out.getvalue(), encoding="utf-8")
    return path


def build_dictionary(folder: Path, lines: list[str], codes: Path, lang: str = "en", name: str | None = None,
                     extra_tokens=()) -> tuple[Path, int]:
    """A fairseq dict.<lang>.txt from the BPE'd corpus: counts descending, padded to a multiple of 8
    with madeupword entries (what fairseq-preprocess writes). Returns (path, size with specials)."""
    from collections import Counter

    from sacremoses import MosesTokenizer
    from subword_nmt.apply_bpe import BPE

    tok = MosesTokenizer(lang=lang)
    with open(codes, encoding="utf-8") as f:
        bpe = BPE(f, separator="@@")
    counts = Counter()
    for line in lines:
        counts.update(bpe.process_line(tok.tokenize(line, aggressive_dash_splits=True, return_str=True,
                                                    escape=True)).split())
    for t in extra_tokens:
        counts[t] += 1
    words = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    n = 4 + len(words)
    i = 0
    while n % 8:
        words.append((f"madeupword{i:04d}", 0))
        n += 1
        i += 1
    path = Path(folder) / (name or f"dict.{lang}.txt")
    path.write_text("".join(f"{w} {c}\n" for w, c in words), encoding="utf-8")
    return path, n


def write_fairseq_folder(folder: Path, fsmt, assets: Path, source_lang: str = "en", target_lang: str = "de") -> Path:
    """A fairseq translation folder for an FSMT model: model.pt (its weights in fairseq's layout,
    cfg-style options) plus the dictionaries and BPE codes found in ``assets``."""
    folder = Path(folder)
    write_fairseq_checkpoint(folder / "model.pt", fairseq_state_from_fsmt(fsmt),
                             fsmt_options(fsmt, source_lang=source_lang, target_lang=target_lang), "cfg")
    for name in (f"dict.{source_lang}.txt", f"dict.{target_lang}.txt", "bpecodes"):
        (folder / name).write_bytes((Path(assets) / name).read_bytes())
    return folder
