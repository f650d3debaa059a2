"""The fairseq NMT family as data: fairseq transformer checkpoints (model.pt + dict.*.txt + bpecodes)
and transformers' FSMT folders (facebook/wmt19-*), served without fairseq.

Reading a source normalises every flavour to fairseq 0.12 tensor names first (key upgrades for old
checkpoints, FSMT's ``model.`` prefix removed); one WeightMap, built from the EncDecConfig, then
renames them to ours. Architecture options map onto EncDecConfig fields; what the core cannot
express (a decoder of another width, different head sizes per side, adaptive softmax, ...) is
refused with a message naming the option.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from encdec_core.config import ConfigMap, EncDecConfig, read_json, source_activation
from encdec_core.errors import ConfigError, EncDecError, WeightError
from encdec_core.family import HF_TOKENIZER_FILES, Family, Source, load_tensors, read_generation_config
from encdec_core.plugins import hookimpl
from encdec_core.weights import Rule, WeightMap

from .fairseq_io import checkpoint_options, fill_defaults, safe_load, upgrade_state_dict
from .text import BPE_CODE_FILES, find_bpe_codes, load_tokenizer

FSMT_ARCH = "FSMTForConditionalGeneration"
PAD, EOS, BOS = 1, 2, 0

# fairseq activation_fn -> ours (gelu_fast / gelu_accurate are the tanh approximation)
FAIRSEQ_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_fast": "gelu_new", "gelu_accurate": "gelu_new",
                       "tanh": "tanh", "swish": "silu"}


# ----------------------------------------------------------------------------- config: fairseq
def _refuse(option: str, value, why: str):
    raise ConfigError(f"fairseq option '{option}' = {value!r}: {why}")


def check_fairseq_options(s: dict) -> None:
    """Refuse, by name, every option the core cannot express."""
    d = s["encoder_embed_dim"]
    for opt in ("decoder_embed_dim", "decoder_input_dim", "decoder_output_dim"):
        if s.get(opt) not in (None, d):
            _refuse(opt, s[opt], f"expected the encoder width {d} (encdec has one d_model; a decoder of another "
                                 f"width needs project_in/out_dim, which is not supported)")
    for opt in ("encoder_attention_heads", "decoder_attention_heads"):
        h = s[opt]
        if not isinstance(h, int) or h <= 0 or d % h:
            _refuse(opt, h, f"expected a positive divisor of the width {d}")
    if s["encoder_attention_heads"] != s["decoder_attention_heads"]:
        _refuse("decoder_attention_heads", s["decoder_attention_heads"],
                f"expected {s['encoder_attention_heads']} like the encoder: other head counts give another head "
                f"size ({d // s['encoder_attention_heads']} vs {d // s['decoder_attention_heads']}) and encdec has "
                f"one head_dim")
    for opt in ("adaptive_input", "tie_adaptive_weights", "cross_self_attention", "no_cross_attention",
                "char_inputs", "scale_attn", "scale_fc", "scale_heads", "scale_resids"):
        if s.get(opt):
            _refuse(opt, s[opt], "expected off: not supported by encdec")
    if s.get("adaptive_softmax_cutoff"):
        _refuse("adaptive_softmax_cutoff", s["adaptive_softmax_cutoff"], "expected none: adaptive softmax is not "
                                                                          "supported")
    for opt in ("encoder_layers_to_keep", "decoder_layers_to_keep"):
        if s.get(opt):
            _refuse(opt, s[opt], "expected none: prune the LayerDrop checkpoint with fairseq first")
    if not s.get("no_token_positional_embeddings"):
        if bool(s["encoder_learned_pos"]) != bool(s["decoder_learned_pos"]):
            _refuse("decoder_learned_pos", s["decoder_learned_pos"],
                    f"expected {s['encoder_learned_pos']!r} like encoder_learned_pos (encdec has one position kind)")
        if s["encoder_learned_pos"] and s["max_source_positions"] != s["max_target_positions"]:
            _refuse("max_target_positions", s["max_target_positions"],
                    f"expected {s['max_source_positions']} like max_source_positions for learned positions "
                    f"(encdec has one position table size)")
    if s["activation_fn"] not in FAIRSEQ_ACTIVATIONS:
        _refuse("activation_fn", s["activation_fn"], f"expected one of {sorted(FAIRSEQ_ACTIVATIONS)}")
    if s.get("share_all_embeddings") and s.get("src_vocab_size") not in (None, s.get("tgt_vocab_size")):
        _refuse("share_all_embeddings", True, f"but the source vocabulary has {s['src_vocab_size']} rows and the "
                                              f"target {s['tgt_vocab_size']}")


def _position_type(s: dict) -> str:
    if s.get("no_token_positional_embeddings"):
        return "none"
    return "learned" if s["encoder_learned_pos"] else "sinusoidal"


def _max_positions(s: dict) -> int:
    if _position_type(s) == "learned":
        return int(s["max_source_positions"])
    return int(max(s["max_source_positions"], s["max_target_positions"]))  # a computed table: any size works


def _str_or_none(v):
    return None if v is None else str(v)


def _fairseq_extra(s: dict) -> dict:
    return {
        "format": "fairseq",
        "arch": _str_or_none(s.get("arch")),
        "checkpoint_style": _str_or_none(s.get("checkpoint_style")),
        "source_lang": _str_or_none(s.get("source_lang")),
        "target_lang": _str_or_none(s.get("target_lang")),
        "tokenizer": _str_or_none(s.get("tokenizer")) or "moses",
        "bpe": _str_or_none(s.get("bpe")) or ("subword_nmt" if s.get("has_bpe_codes") else None),
        # moses languages: fairseq < 0.10 had --moses-{source,target}-lang; 0.12 uses the task languages
        "moses_source_lang": _str_or_none(s.get("moses_source_lang") or s.get("source_lang")),
        "moses_target_lang": _str_or_none(s.get("moses_target_lang") or s.get("target_lang")),
        "moses_no_dash_splits": bool(s.get("moses_no_dash_splits", False)),
        "moses_no_escape": bool(s.get("moses_no_escape", False)),
    }


_COMMON_CONSTANTS = {
    "family": "nmt",
    "norm_type": "layer",
    "norm_eps": 1e-5,
    "norm_bias": True,
    "linear_bias": True,
    "position_padding_aware": True,
    "q_scaling": 1.0,
    "pad_token_id": PAD,
    "eos_token_id": EOS,
    "bos_token_id": BOS,
    "decoder_start_token_id": EOS,  # fairseq decodes from </s>
}

FAIRSEQ_CONFIG = ConfigMap(
    fields={
        "vocab_size": "tgt_vocab_size",
        "src_vocab_size": lambda s: None if s.get("share_all_embeddings") else s["src_vocab_size"],
        "d_model": "encoder_embed_dim",
        "encoder_layers": "encoder_layers",
        "decoder_layers": "decoder_layers",
        "encoder_heads": "encoder_attention_heads",
        "decoder_heads": "decoder_attention_heads",
        "head_dim": lambda s: s["encoder_embed_dim"] // s["encoder_attention_heads"],
        "encoder_ffn_dim": "encoder_ffn_embed_dim",
        "decoder_ffn_dim": "decoder_ffn_embed_dim",
        "activation": lambda s: FAIRSEQ_ACTIVATIONS[s["activation_fn"]],
        "encoder_pre_norm": lambda s: bool(s["encoder_normalize_before"]),
        "decoder_pre_norm": lambda s: bool(s["decoder_normalize_before"]),
        # fairseq: a stack's final LayerNorm exists iff normalize_before (decoder: and not
        # no_decoder_final_norm), and only from stack version 2 (encoder) / 3 (decoder) on.
        "encoder_final_norm": lambda s: bool(s["encoder_normalize_before"]) and s.get("encoder_version", 3) >= 2,
        "decoder_final_norm": lambda s: (bool(s["decoder_normalize_before"]) and not s.get("no_decoder_final_norm")
                                         and s.get("decoder_version", 3) > 2),
        "layernorm_embedding": lambda s: bool(s.get("layernorm_embedding")),
        "position_type": _position_type,
        "max_position_embeddings": _max_positions,
        "embedding_scale": lambda s: 1.0 if s["no_scale_embedding"] else math.sqrt(s["encoder_embed_dim"]),
        "shared_embeddings": lambda s: bool(s["share_all_embeddings"]),
        "tie_lm_head": lambda s: bool(s["share_all_embeddings"] or s["share_decoder_input_output_embed"]),
        "forced_eos_token_id": lambda s: EOS,  # fairseq's search forces </s> at the length limit
        "extra": _fairseq_extra,
    },
    constants=_COMMON_CONSTANTS,
    defaults={"src_vocab_size": None},
)


# ----------------------------------------------------------------------------- config: FSMT
def _fsmt_head_dim(s: dict) -> int:
    d, he, hd = s["d_model"], s["encoder_attention_heads"], s["decoder_attention_heads"]
    if d % he or d % hd or he != hd:
        raise ConfigError(f"field 'decoder_attention_heads' = {hd!r}: expected {he} like encoder_attention_heads, "
                          f"dividing d_model {d} (encdec has one head_dim)")
    return d // he


def _fsmt_activation(s: dict) -> str:
    return source_activation(s, "activation_function", "relu")


def _fsmt_tied(s: dict) -> bool:
    tied = bool(s.get("tie_word_embeddings", False))
    if tied and s["src_vocab_size"] != s["tgt_vocab_size"]:
        raise ConfigError(f"field 'tie_word_embeddings' = true but src_vocab_size {s['src_vocab_size']} != "
                          f"tgt_vocab_size {s['tgt_vocab_size']}")
    return tied


def _fsmt_extra(s: dict) -> dict:
    langs = list(s.get("langs") or [None, None]) + [None, None]
    return {"format": "fsmt", "source_lang": _str_or_none(langs[0]), "target_lang": _str_or_none(langs[1])}


FSMT_CONFIG = ConfigMap(
    fields={
        "vocab_size": "tgt_vocab_size",
        "src_vocab_size": lambda s: None if _fsmt_tied(s) else s["src_vocab_size"],
        "d_model": "d_model",
        "encoder_layers": "encoder_layers",
        "decoder_layers": "decoder_layers",
        "encoder_heads": "encoder_attention_heads",
        "decoder_heads": "decoder_attention_heads",
        "head_dim": _fsmt_head_dim,
        "encoder_ffn_dim": "encoder_ffn_dim",
        "decoder_ffn_dim": "decoder_ffn_dim",
        "activation": _fsmt_activation,
        "max_position_embeddings": "max_position_embeddings",
        "embedding_scale": lambda s: math.sqrt(s["d_model"]) if s.get("scale_embedding", True) else 1.0,
        "shared_embeddings": _fsmt_tied,
        "tie_lm_head": _fsmt_tied,
        "pad_token_id": "pad_token_id",
        "eos_token_id": lambda s: s["eos_token_id"][0] if isinstance(s.get("eos_token_id"), list) else s.get("eos_token_id"),
        "bos_token_id": "bos_token_id",
        "decoder_start_token_id": "decoder_start_token_id",
        "forced_eos_token_id": "forced_eos_token_id",
        "extra": _fsmt_extra,
    },
    constants={**{k: v for k, v in _COMMON_CONSTANTS.items() if k not in ("pad_token_id", "eos_token_id",
                                                                          "bos_token_id", "decoder_start_token_id")},
               "position_type": "sinusoidal", "encoder_pre_norm": False, "decoder_pre_norm": False,
               "encoder_final_norm": False, "decoder_final_norm": False, "layernorm_embedding": False},
    defaults={"src_vocab_size": None, "max_position_embeddings": 1024, "pad_token_id": PAD, "eos_token_id": EOS,
              "bos_token_id": BOS, "decoder_start_token_id": EOS, "forced_eos_token_id": None},
)


def is_fsmt_config(src: dict) -> bool:
    return src.get("model_type") == "fsmt" or FSMT_ARCH in (src.get("architectures") or [])


def nmt_config(src: dict) -> EncDecConfig:
    """Family.config_map: an FSMT config.json, or a fairseq checkpoint's flattened options."""
    if is_fsmt_config(src):
        return FSMT_CONFIG.apply(src, "config.json")
    s = fill_defaults(src)
    check_fairseq_options(s)
    return FAIRSEQ_CONFIG.apply(s, "fairseq options")


# ----------------------------------------------------------------------------- weights
def nmt_weight_map(cfg: EncDecConfig) -> WeightMap:
    """fairseq 0.12 names (after upgrades) -> ours."""
    R: list[Rule] = []
    if cfg.shared_embeddings:
        R += [Rule("encoder.embed_tokens.weight", "shared.weight"), Rule("decoder.embed_tokens.weight", op="drop")]
    else:
        R += [Rule("{side}.embed_tokens.weight", "{side}.embed_tokens.weight")]
    if cfg.tie_lm_head:
        R.append(Rule("decoder.output_projection.weight", op="drop"))
    else:
        R.append(Rule("decoder.output_projection.weight", "lm_head.weight"))
    if cfg.position_type == "learned":
        R.append(Rule("{side}.embed_positions.weight", "{side}.embed_positions.weight"))
    else:
        R.append(Rule("{side}.embed_positions.weight", op="drop"))  # FSMT stores its sinusoid table
    R += [
        Rule("{side}.embed_positions._float_tensor", op="drop"),
        Rule("{side}.version", op="drop"),
        Rule("{side}.layernorm_embedding.{p}", "{side}.layernorm_embedding.{p}"),
        Rule("{side}.layer_norm.{p}", "{side}.final_norm.{p}"),
    ]
    L = "{side}.layers.{i}"
    R += [
        Rule((f"{L}.self_attn.q_proj.{{p}}", f"{L}.self_attn.k_proj.{{p}}", f"{L}.self_attn.v_proj.{{p}}"),
             f"{L}.self_attn.qkv.{{p}}", "fuse"),
        Rule(f"{L}.self_attn.out_proj.{{p}}", f"{L}.self_attn.out.{{p}}"),
        Rule(f"{L}.self_attn_layer_norm.{{p}}", f"{L}.self_attn_norm.{{p}}"),
        Rule(f"{L}.encoder_attn.q_proj.{{p}}", f"{L}.cross_attn.q.{{p}}"),
        Rule((f"{L}.encoder_attn.k_proj.{{p}}", f"{L}.encoder_attn.v_proj.{{p}}"), f"{L}.cross_attn.kv.{{p}}", "fuse"),
        Rule(f"{L}.encoder_attn.out_proj.{{p}}", f"{L}.cross_attn.out.{{p}}"),
        Rule(f"{L}.encoder_attn_layer_norm.{{p}}", f"{L}.cross_attn_norm.{{p}}"),
        Rule(f"{L}.fc1.{{p}}", f"{L}.ffn.wi.{{p}}"),
        Rule(f"{L}.fc2.{{p}}", f"{L}.ffn.wo.{{p}}"),
        Rule(f"{L}.final_layer_norm.{{p}}", f"{L}.ffn_norm.{{p}}"),
    ]
    # fairseq 0.12.2 saves copies of each encoder layer's weights for its fast path: ignore them
    for dup in ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias", "fc1_weight", "fc1_bias",
                "fc2_weight", "fc2_bias"):
        R.append(Rule(f"encoder.layers.{{i}}.{dup}", op="drop"))
    return WeightMap(R)


# ----------------------------------------------------------------------------- sources
# fairseq-interactive's defaults in HF terms: beam 5, a sentence is done when beam-size hypotheses are
# finished (early_stopping=True), </s> forced at the length limit (max_new_tokens: read_fairseq)
FAIRSEQ_GENERATION = {"num_beams": 5, "early_stopping": True, "length_penalty": 1.0, "forced_eos_token_id": EOS}
CHECKPOINT_NAMES = ("model.pt", "checkpoint_best.pt", "checkpoint_last.pt")


def _dict_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("dict.*.txt")) + ([folder / "dict.txt"] if (folder / "dict.txt").is_file() else [])


def locate_checkpoint(path: Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"{path}: no such file or directory")
    for name in CHECKPOINT_NAMES:
        if (path / name).is_file():
            return path / name
    pts = sorted(path.glob("checkpoint*.pt")) or sorted(path.glob("*.pt"))
    if len(pts) == 1:
        return pts[0]
    if not pts:
        raise ConfigError(f"{path}: no fairseq checkpoint (model.pt, checkpoint_best.pt, ...) found")
    raise ConfigError(f"{path}: several checkpoints {[p.name for p in pts]}; pass the .pt file to use")


def detect(path: Path) -> bool:
    """A fairseq .pt file, or a folder with model.pt / checkpoint*.pt and dict.*.txt."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".pt"
    if not path.is_dir() or (path / "config.json").is_file():
        return False
    has_ckpt = any((path / n).is_file() for n in CHECKPOINT_NAMES) or any(path.glob("checkpoint*.pt"))
    return has_ckpt and bool(_dict_files(path))


def _rows(t: torch.Tensor | None):
    return None if t is None else int(t.shape[0])


def _check_tied(tensors: dict, a: str, b: str, option: str, where: str) -> None:
    if a in tensors and b in tensors:
        ta, tb = tensors[a], tensors[b]
        if ta.shape != tb.shape or not torch.equal(ta, tb):
            raise WeightError(f"{where}: option '{option}' is on but '{a}' and '{b}' differ "
                              f"({tuple(ta.shape)} vs {tuple(tb.shape)}): the checkpoint contradicts its options")


def read_fairseq(path: Path, family: Family) -> Source:
    ckpt = locate_checkpoint(path)
    folder = ckpt.parent
    state = safe_load(ckpt)
    model_state = state.get("model")
    if not isinstance(model_state, dict) or not model_state:
        raise WeightError(f"{ckpt}: field 'model' = {type(model_state).__name__}: expected the state dict of tensors")
    bad = [k for k, v in model_state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightError(f"{ckpt}: field 'model' entries {bad[:5]} are not tensors")
    opts, style = checkpoint_options(state, ckpt)
    tensors, info = upgrade_state_dict(model_state)
    src_rows = _rows(tensors.get("encoder.embed_tokens.weight"))
    tgt_rows = _rows(tensors.get("decoder.embed_tokens.weight")) or _rows(tensors.get("decoder.output_projection.weight"))
    if src_rows is None or tgt_rows is None:
        raise WeightError(f"{ckpt}: no 'encoder.embed_tokens.weight' / 'decoder.embed_tokens.weight' in the model "
                          f"state: not a fairseq transformer checkpoint")
    codes = find_bpe_codes(folder)
    opts.update(src_vocab_size=src_rows, tgt_vocab_size=tgt_rows, encoder_version=info["encoder_version"],
                decoder_version=info["decoder_version"], checkpoint_style=style, has_bpe_codes=codes is not None)
    cfg = family.make_config(opts, str(ckpt))
    if cfg.shared_embeddings:
        _check_tied(tensors, "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "share_all_embeddings",
                    str(ckpt))
    if cfg.tie_lm_head:
        _check_tied(tensors, "decoder.embed_tokens.weight", "decoder.output_projection.weight",
                    "share_decoder_input_output_embed", str(ckpt))
    tok_files = _dict_files(folder) + [folder / n for n in BPE_CODE_FILES if (folder / n).is_file()]
    _check_dictionaries(folder, cfg)
    gen = dict(FAIRSEQ_GENERATION)
    # fairseq: at most min(max_len_b = 200, max_target_positions - 1) tokens, then </s>; HF counts the </s>
    gen["max_new_tokens"] = min(200, int(opts.get("max_target_positions") or 1024) - 1) + 1
    return Source(ckpt, cfg, tensors, gen, tok_files)


def _check_dictionaries(folder: Path, cfg: EncDecConfig) -> None:
    """The text files a fairseq folder carries are those fairseq needs: dict.<source_lang>.txt and
    dict.<target_lang>.txt (sized for the embeddings) and, for subword-nmt BPE, bpecodes. A checkpoint
    without any dictionary is converted as weights alone (its tokenizer given at run time)."""
    from .text import Dictionary, check_bpe_codes, find_dictionaries

    if not _dict_files(folder):
        return
    src, tgt = find_dictionaries(folder, cfg.extra.get("source_lang"), cfg.extra.get("target_lang"))
    check_bpe_codes(folder, cfg.extra.get("bpe"))
    for p, rows, side in ((src, cfg.encoder_vocab_size, "source"), (tgt, cfg.vocab_size, "target")):
        n = len(Dictionary.load(p))
        if n > rows:
            raise ConfigError(f"{p}: {n} entries (with the 4 specials) but the model's {side} embedding has {rows} "
                              f"rows: this dictionary does not belong to this checkpoint")


def read_fsmt(path: Path, family: Family) -> Source:
    cfg_path = path / "config.json"
    src = read_json(cfg_path)
    cfg = family.make_config(src, str(cfg_path))
    raw = load_tensors(path)
    tensors = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in raw.items()}
    if cfg.shared_embeddings and "encoder.embed_tokens.weight" not in tensors and "decoder.embed_tokens.weight" in tensors:
        tensors["encoder.embed_tokens.weight"] = tensors["decoder.embed_tokens.weight"]
    gen = read_generation_config(path)
    tok = [path / f for f in HF_TOKENIZER_FILES if (path / f).is_file()]
    return Source(path, cfg, tensors, gen, tok)


def read_source(path: Path, family: Family) -> Source:
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        src = read_json(path / "config.json")
        if not is_fsmt_config(src):
            raise ConfigError(f"{path / 'config.json'}: model_type={src.get('model_type')!r} "
                              f"architectures={src.get('architectures')}: expected an FSMT model "
                              f"({FSMT_ARCH}) or a fairseq checkpoint folder")
        return read_fsmt(path, family)
    return read_fairseq(path, family)


# ----------------------------------------------------------------------------- HF reference
def fsmt_config_from(cfg: EncDecConfig, source: str = "model"):
    """The transformers FSMTConfig of the same network, when FSMT can express it (post-LN, sinusoidal)."""
    from transformers import FSMTConfig

    why = []
    if cfg.encoder_pre_norm or cfg.decoder_pre_norm:
        why.append("pre-LN (normalize_before)")
    if cfg.encoder_final_norm or cfg.decoder_final_norm:
        why.append("final layer norms")
    if cfg.layernorm_embedding:
        why.append("layernorm_embedding")
    if cfg.position_type != "sinusoidal":
        why.append(f"{cfg.position_type} positions")
    if cfg.embedding_scale not in (1.0, math.sqrt(cfg.d_model)):
        why.append(f"embedding scale {cfg.embedding_scale}")
    if why:
        raise EncDecError(f"{source}: transformers' FSMT cannot express {', '.join(why)}; no HF reference")
    return FSMTConfig(
        langs=[cfg.extra.get("source_lang") or "src", cfg.extra.get("target_lang") or "tgt"],
        src_vocab_size=cfg.encoder_vocab_size, tgt_vocab_size=cfg.vocab_size, d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.encoder_heads, decoder_attention_heads=cfg.decoder_heads,
        encoder_ffn_dim=cfg.encoder_ffn_dim, decoder_ffn_dim=cfg.decoder_ffn_dim, activation_function=cfg.activation,
        max_position_embeddings=cfg.max_position_embeddings, scale_embedding=cfg.embedding_scale != 1.0,
        tie_word_embeddings=False, dropout=0.0, pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id,
        bos_token_id=cfg.bos_token_id, decoder_start_token_id=cfg.decoder_start_token_id,
        forced_eos_token_id=cfg.forced_eos_token_id)


def hf_reference(path: Path):
    """Family.hf_loader: an FSMT model folder as is, or a post-LN fairseq checkpoint rebuilt as FSMT."""
    from transformers import FSMTForConditionalGeneration

    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return FSMTForConditionalGeneration.from_pretrained(str(path)).eval()
    src = read_fairseq(path, NMT)
    cfg = src.config
    model = FSMTForConditionalGeneration(fsmt_config_from(cfg, str(src.path))).eval()
    t = dict(src.tensors)
    if cfg.shared_embeddings:
        t.setdefault("decoder.embed_tokens.weight", t["encoder.embed_tokens.weight"])
    if cfg.tie_lm_head:
        t["decoder.output_projection.weight"] = t["decoder.embed_tokens.weight"]
    own = model.state_dict()
    with torch.no_grad():
        for k, v in own.items():
            name = k[len("model."):]
            if "embed_positions" in name:
                continue
            if name not in t:
                raise WeightError(f"{src.path}: tensor '{name}' missing for the FSMT reference")
            v.copy_(t[name])
    return model


# ----------------------------------------------------------------------------- presets
_BIG = dict(arch="transformer_vaswani_wmt_en_fr_big", share_all_embeddings=True, source_lang="en",
            target_lang="fr", src_vocab_size=44512, tgt_vocab_size=44512)  # joined BPE dict, ~44.5k (approximate)
PRESETS = {
    "wmt14-en-fr-big": _BIG,
    "transformer-base": dict(arch="transformer", share_all_embeddings=True, src_vocab_size=32000,
                             tgt_vocab_size=32000),
    "wmt19-en-de": dict(model_type="fsmt", architectures=[FSMT_ARCH], langs=["en", "de"], src_vocab_size=42024,
                        tgt_vocab_size=42024, d_model=1024, encoder_layers=6, decoder_layers=6,
                        encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=8192,
                        decoder_ffn_dim=8192, activation_function="relu", max_position_embeddings=1024),
}

NMT = Family(
    name="nmt",
    description="fairseq transformer NMT (model.pt + dict.*.txt + bpecodes; moses + subword-nmt) and "
                "transformers' FSMT (facebook/wmt19-*)",
    config_map=nmt_config,
    weight_map=nmt_weight_map,
    aliases=("fairseq", "fsmt", "fairseq-nmt"),
    architectures=(FSMT_ARCH,),
    model_types=("fsmt",),
    detect=detect,
    read_source=read_source,
    tokenizer=load_tokenizer,
    hf_class=FSMT_ARCH,
    hf_loader=hf_reference,
    presets=PRESETS,
)


@hookimpl
def encdec_families():
    return [NMT]
