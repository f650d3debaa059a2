"""Reading fairseq translation checkpoints without fairseq.

* Safe loading: ``torch.load(weights_only=True)`` with an explicit allow-list of pickle globals
  (``argparse.Namespace`` and a few plain-data numpy scalar types); anything else is refused before
  it can run.
* Both checkpoint styles: legacy ``args`` (a Namespace) and ``cfg`` (a dict whose ``model`` /
  ``task`` entries are a Namespace or a dict, possibly nested ``encoder: {embed_dim, ...}``).
* Missing architecture options are filled from the named fairseq architecture (the values fairseq's
  ``register_model_architecture`` functions set), then the options are flattened into one dict.
* Key upgrades for old checkpoints, as fairseq's ``upgrade_state_dict_named`` does them.
"""
from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from encdec_core.errors import ConfigError, WeightError

# ----------------------------------------------------------------------------- safe loading


def _allow_list() -> list:
    out: list = [argparse.Namespace]
    try:  # fairseq's meters may hold numpy scalars; these globals only rebuild plain numbers
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        scalar = core.multiarray.scalar
        out += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
        for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
            cls = getattr(getattr(np, "dtypes", None), name, None)
            if cls is not None:
                out.append(cls)
    except Exception:  # pragma: no cover - numpy is a dependency, but never fatal here
        pass
    return out


ALLOWED_GLOBALS_TEXT = "argparse.Namespace, collections.OrderedDict, torch tensors/storages, numpy scalars"
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def safe_load(path: Path) -> dict:
    """Load a fairseq checkpoint with the restricted unpickler; never runs pickled code."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals(_allow_list()):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip), EOFError, ...
        msg = str(exc)
        m = _GLOBAL_RE.search(msg)
        if m:
            what = m.group(1)
            raise WeightError(
                f"{path}: refused to load: the checkpoint's pickle needs '{what}', which is not on encdec's "
                f"allow-list ({ALLOWED_GLOBALS_TEXT}). encdec never unpickles arbitrary objects; if you trust "
                f"this file, re-save it with fairseq as plain tensors and options") from None
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        first = lines[0] if lines else ""
        for i, ln in enumerate(lines):  # the restricted unpickler's own reason
            if ln.startswith("WeightsUnpickler error"):
                rest = ln.split(":", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
                first = f"the restricted unpickler stopped: {rest}"
                break
        hint = ""
        if zipfile.is_zipfile(path) is False and path.stat().st_size < 64:
            hint = " (the file is tiny: a git-lfs pointer or a truncated download?)"
        raise WeightError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {first}){hint}") from None
    if not isinstance(state, dict):
        raise WeightError(f"{path}: expected a fairseq checkpoint (a dict with 'model' and 'args' or 'cfg'), "
                          f"got {type(state).__name__}")
    return state


# ----------------------------------------------------------------------------- options

# What fairseq's architecture functions set (only the fields that change the network).
_BASE = dict(
    encoder_embed_dim=512, encoder_ffn_embed_dim=2048, encoder_layers=6, encoder_attention_heads=8,
    encoder_normalize_before=False, encoder_learned_pos=False,
    decoder_learned_pos=False, decoder_normalize_before=False, no_decoder_final_norm=False,
    activation_fn="relu", share_decoder_input_output_embed=False, share_all_embeddings=False,
    no_token_positional_embeddings=False, adaptive_input=False, no_cross_attention=False,
    cross_self_attention=False, no_scale_embedding=False, layernorm_embedding=False,
    tie_adaptive_weights=False, adaptive_softmax_cutoff=None, max_source_positions=1024,
    max_target_positions=1024,
)
_BIG = dict(encoder_embed_dim=1024, encoder_ffn_embed_dim=4096, encoder_attention_heads=16,
            decoder_embed_dim=1024, decoder_ffn_embed_dim=4096, decoder_attention_heads=16)
ARCH_DEFAULTS: dict[str, dict] = {
    "transformer": {},
    "transformer_iwslt_de_en": dict(encoder_ffn_embed_dim=1024, encoder_attention_heads=4,
                                    decoder_ffn_embed_dim=1024, decoder_attention_heads=4),
    "transformer_wmt_en_de": {},
    "transformer_vaswani_wmt_en_de_big": _BIG,
    "transformer_vaswani_wmt_en_fr_big": _BIG,
    "transformer_wmt_en_de_big": _BIG,
    "transformer_wmt_en_de_big_t2t": {**_BIG, "encoder_normalize_before": True, "decoder_normalize_before": True},
    "transformer_align": {},
    "transformer_wmt_en_de_big_align": _BIG,
}
# decoder options default to the encoder's (fairseq's base_architecture does the same)
_DECODER_FROM_ENCODER = {
    "decoder_embed_dim": "encoder_embed_dim",
    "decoder_ffn_embed_dim": "encoder_ffn_embed_dim",
    "decoder_layers": "encoder_layers",
    "decoder_attention_heads": "encoder_attention_heads",
}
_NESTED = {  # new-style TransformerConfig: model.encoder.embed_dim -> encoder_embed_dim
    "embed_dim": "embed_dim", "ffn_embed_dim": "ffn_embed_dim", "layers": "layers",
    "attention_heads": "attention_heads", "normalize_before": "normalize_before", "learned_pos": "learned_pos",
    "layers_to_keep": "layers_to_keep", "output_dim": "output_dim", "input_dim": "input_dim",
}


def _as_dict(obj, where: str) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, argparse.Namespace):
        return dict(vars(obj))
    if isinstance(obj, Mapping):
        return dict(obj)
    raise ConfigError(f"{where}: expected a Namespace or a dict, got {type(obj).__name__}")


def _flatten_model_options(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if k in ("encoder", "decoder") and isinstance(v, (Mapping, argparse.Namespace)):
            for sk, sv in _as_dict(v, k).items():
                name = _NESTED.get(sk)
                if name is not None:
                    out.setdefault(f"{k}_{name}", sv)
            continue
        out[k] = v
    return out


def checkpoint_options(state: dict, path: Path) -> tuple[dict, str]:
    """The model + task options of a checkpoint, flattened, and which style it used ('args'/'cfg')."""
    if state.get("args") is not None:
        opts = _as_dict(state["args"], f"{path}: field 'args'")
        style = "args"
    elif state.get("cfg") is not None:
        cfg = _as_dict(state["cfg"], f"{path}: field 'cfg'")
        if cfg.get("model") is None:
            raise ConfigError(f"{path}: field 'cfg' has no 'model' entry (expected the model's options)")
        opts = _flatten_model_options(_as_dict(cfg["model"], f"{path}: field cfg['model']"))
        task = _as_dict(cfg.get("task"), f"{path}: field cfg['task']")
        for k in ("source_lang", "target_lang"):
            if opts.get(k) is None and task.get(k) is not None:
                opts[k] = task[k]
        if "arch" not in opts and opts.get("_name"):
            opts["arch"] = opts["_name"]
        style = "cfg"
    else:
        raise ConfigError(f"{path}: no 'args' and no 'cfg' entry: not a fairseq checkpoint "
                          f"(top-level keys: {sorted(state)[:10]})")
    arch = opts.get("arch")
    if not isinstance(arch, str) or not arch.startswith("transformer") or arch.startswith("transformer_lm"):
        raise ConfigError(
            f"{path}: field 'arch' = {arch!r}: expected a fairseq encoder-decoder transformer "
            f"(transformer, transformer_vaswani_wmt_en_fr_big, ...; known: {', '.join(sorted(ARCH_DEFAULTS))})")
    return fill_defaults(opts), style


def fill_defaults(opts: dict) -> dict:
    """Fill options missing (or None) from the architecture's values, then fairseq's base values."""
    out = dict(opts)
    arch = out.get("arch", "transformer")
    for src in (ARCH_DEFAULTS.get(arch, {}), _BASE):
        for k, v in src.items():
            if out.get(k) is None:
                out[k] = v
    for dk, ek in _DECODER_FROM_ENCODER.items():
        if out.get(dk) is None:
            out[dk] = out[ek]
    for k in ("decoder_output_dim", "decoder_input_dim"):
        if out.get(k) is None:
            out[k] = out["decoder_embed_dim"]
    return out


# ----------------------------------------------------------------------------- key upgrades

def _version(state: Mapping[str, torch.Tensor], side: str) -> float:
    v = state.get(f"{side}.version")
    if v is None:
        return 1.0  # fairseq's default for a missing version
    try:
        return float(v.reshape(-1)[0])
    except Exception:
        raise WeightError(f"key '{side}.version' = {v!r}: expected a one-element tensor") from None


def upgrade_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Old fairseq names -> fairseq 0.12 names. Returns (tensors, info) where info has the stack
    versions (a missing version means 1: no final layer norm) and what was upgraded."""
    out = dict(state)
    info: dict[str, Any] = {"encoder_version": _version(state, "encoder"),
                            "decoder_version": _version(state, "decoder"), "upgraded": []}
    ln_maps = {"encoder": {"0": "self_attn_layer_norm", "1": "final_layer_norm"},
               "decoder": {"0": "self_attn_layer_norm", "1": "encoder_attn_layer_norm", "2": "final_layer_norm"}}
    in_proj = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn)\.in_proj_(weight|bias)$")
    ln_old = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.layer_norms\.(\d+)\.(weight|bias)$")
    for key in list(out):
        m = in_proj.match(key)
        if m:
            side, i, attn, kind = m.groups()
            t = out.pop(key)
            if t.shape[0] % 3:
                raise WeightError(f"key '{key}' has {tuple(t.shape)}: expected q, k and v stacked on dim 0")
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, 0)):
                out[f"{side}.layers.{i}.{attn}.{name}.{kind}"] = chunk.contiguous()
            info["upgraded"].append(key)
            continue
        m = ln_old.match(key)
        if m:
            side, i, n, kind = m.groups()
            new = ln_maps[side].get(n)
            if new is None:
                raise WeightError(f"key '{key}': layer_norms.{n} has no meaning in a fairseq {side} layer")
            out[f"{side}.layers.{i}.{new}.{kind}"] = out.pop(key)
            info["upgraded"].append(key)
    if "decoder.embed_out" in out:
        out["decoder.output_projection.weight"] = out.pop("decoder.embed_out")
        info["upgraded"].append("decoder.embed_out")
    return out, info
