"""LoRA adapters saved by peft (``adapter_config.json`` + ``adapter_model.safetensors``), merged into
the source model's weights when a checkpoint is converted.

``encdec convert --model-dir M --lora-dir A [--lora-dir B ...]`` (Python: ``convert(..., adapters=[A])``)
reads each adapter, checks it against the source model, and adds its low-rank update to the source
tensors *before* the family's WeightMap renames, fuses and shards them:

    W <- W + scale * B @ A        scale = lora_alpha / r   (use_rslora: lora_alpha / sqrt(r))

computed in fp32 from the fp32 source tensor, so the merged weight is rounded once, to the
checkpoint's dtype, and tensor / pipeline sharding of the merged model is the plain model's. The
result is the model that peft's ``merge_and_unload()`` gives (tests compare logits and generated
tokens with the unmerged peft model).

Supported: ``peft_type`` LORA on linear layers, ``target_modules`` of any form (the adapter's own
tensors say which modules it changes), per-module ``rank_pattern`` / ``alpha_pattern``,
``use_rslora``, ``bias`` = "all" / "lora_only" (the trained biases replace the source's),
``lora_bias`` (the B layer's bias, scaled, is added to the module's bias). Refused with a message
naming the adapter file and field: DoRA, embedding or convolution LoRA, ``modules_to_save`` (whole
modules replaced), ``fan_in_fan_out``, ``layer_replication``, ``trainable_token_indices``,
``target_parameters``, other peft types, and an adapter whose modules the model lacks or whose
shapes do not match it. Several adapters are merged one after the other, each with its own scale.

``--lora-mode runtime`` keeps the adapters unmerged instead (``factors()``), one chosen per request at
run time (``encdec_core/runtime/lora.py``; TensorRT-LLM's ``--lora_task_uids``).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from encdec_core.adapters import source_key
from encdec_core.errors import ConfigError, WeightError
from encdec_core.family import AdapterKind
from encdec_core.plugins import hookimpl

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."

# adapter_config.json fields that change what the adapter computes and that a plain merge of
# scale * B @ A cannot reproduce: field -> (value that is fine, what it means)
_UNSUPPORTED = {
    "use_dora": (False, "DoRA (weight-decomposed LoRA)"),
    "fan_in_fan_out": (False, "fan_in_fan_out (GPT-2 style Conv1D weights)"),
    "layer_replication": (None, "layer replication"),
    "trainable_token_indices": (None, "trainable token indices"),
    "target_parameters": (None, "LoRA on parameters (target_parameters)"),
    "use_qalora": (False, "QA-LoRA"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens)"),
    "use_bdlora": (None, "block-diagonal LoRA"),
}


def _empty(v) -> bool:
    return v is None or v is False or v == [] or v == {} or v == ()


def detect(path: Path) -> bool:
    """A peft adapter directory (``adapter_config.json``). Every peft directory is taken, so that one
    of another peft method (IA3, prefix tuning, ...) is refused by ``load`` with its ``peft_type``
    named, rather than reported as unreadable."""
    return (Path(path) / CONFIG_FILE).is_file()


@dataclass
class LoraAdapter:
    """One peft LoRA adapter, read and checked; ``merge`` applies it to a source's tensors."""

    path: Path
    r: int
    alpha: float
    # module (source naming, e.g. "model.encoder.layers.0.self_attn.q_proj") -> (A [r, in], B [out, r], scale)
    updates: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    # module -> bias that replaces the module's bias (peft bias="all" / "lora_only")
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    # module -> scale * lora_B.bias, added to the module's bias (peft lora_bias=True)
    bias_updates: dict[str, torch.Tensor] = field(default_factory=dict)
    # module -> the base weight peft saved with the adapter (save_embedding_layers: lm_head, embeddings
    # a target names); peft loads it into the model, so the merge starts from it
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """``{module: (A [r, in], B [out, r], scale)}`` for run-time (unmerged) use
        (``encdec convert --lora-mode runtime``); adapters with trained biases can only be merged."""
        if self.biases or self.bias_updates:
            raise ConfigError(f"{self.path}: this adapter trains biases (peft bias / lora_bias), which only a merge "
                              f"applies: convert with --lora-mode merge")
        if self.base_weights:
            raise ConfigError(f"{self.path}: this adapter carries base weights of its own "
                              f"({', '.join(f'{m}.base_layer.weight' for m in sorted(self.base_weights))}: peft's "
                              f"save_embedding_layers), which only a merge applies: convert with --lora-mode merge, "
                              f"or save the adapter with save_embedding_layers=False")
        return dict(self.updates)

    def describe(self) -> dict:
        return {"kind": "lora", "path": str(self.path.resolve()), "r": self.r, "lora_alpha": self.alpha,
                "modules": len(self.updates), "biases": len(self.biases) + len(self.bias_updates)}

    def merge(self, tensors: Mapping[str, torch.Tensor], source: str = "source"
              ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """``(merged, changed)``: a new dict, ``tensors`` with this adapter merged (the changed
        entries in fp32), and the changed source keys with the module each belongs to. Every module
        the source lacks and every shape that does not fit is reported at once."""
        out = dict(tensors)
        missing, bad = [], []
        changed = {}
        for module, (a, b, scale) in self.updates.items():
            key = source_key(tensors, module, "weight")
            if key is None:
                missing.append(f"{module}.weight")
                continue
            w = self.base_weights.get(module, tensors[key])
            if module in self.base_weights and tuple(w.shape) != tuple(tensors[key].shape):
                bad.append(f"{module}: base_layer.weight {tuple(w.shape)}, the model's weight {key} is "
                           f"{tuple(tensors[key].shape)}")
                continue
            if tuple(w.shape) != (b.shape[0], a.shape[1]):
                bad.append(f"{module}: lora_B @ lora_A is {b.shape[0]} x {a.shape[1]}, the model's weight "
                           f"{key} is {tuple(w.shape)}")
                continue
            out[key] = w.float() + scale * (b @ a)
            changed[key] = module
        # trained biases replace the model's; lora_bias adds the scaled B bias to it
        for replace, items, what, note in ((True, self.biases, "bias", ""),
                                           (False, self.bias_updates, "lora_B.bias",
                                            " (lora_bias needs a bias in the model)")):
            for module, t in items.items():
                key = source_key(tensors, module, "bias")
                if key is None:
                    missing.append(f"{module}.bias{note}")
                elif tuple(tensors[key].shape) != tuple(t.shape):
                    bad.append(f"{module}: {what} {tuple(t.shape)}, the model's {key} is {tuple(tensors[key].shape)}")
                else:
                    out[key] = t.float() if replace else out[key].float() + t
                    changed[key] = module
        if missing or bad:
            parts = []
            if missing:
                parts.append(f"{len(missing)} module tensor(s) not in {source}: {', '.join(missing)}")
            if bad:
                parts.append("wrong shape: " + "; ".join(bad))
            raise WeightError(f"{self.path}: this LoRA adapter does not fit the model: " + " | ".join(parts))
        return out, changed


def _read_weights(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    for name in WEIGHT_FILES:
        f = path / name
        if not f.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return f, load_file(str(f))
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file: name it
            raise WeightError(f"{f}: cannot read the adapter weights: {type(exc).__name__}: {exc}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise WeightError(f"{f}: expected a state dict of tensors")
        return f, sd
    raise ConfigError(f"{path}: no adapter weights (expected one of {', '.join(WEIGHT_FILES)})")


def _pattern_value(patterns: Mapping, module: str, default):
    """peft's per-module override: the first pattern p with re.match(rf"(.*\\.)?({p})$", module) (the
    group keeps an alternation such as "q|v" whole, as peft's get_pattern_key does)."""
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return value
    return default


def _positive(cfg_file: Path, name: str, value, integer: bool):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if ok and integer:
        ok = float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{cfg_file}: field '{name}' = {value!r}: expected {kind}")
    return int(value) if integer else float(value)


def load(path, family=None, config=None) -> LoraAdapter:
    """Read and check the peft LoRA adapter in directory ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory (expected a peft adapter directory with {CONFIG_FILE})")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ConfigError(f"{cfg_file}: adapter config not found (a peft adapter directory holds "
                          f"{CONFIG_FILE} and adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cfg_file}: not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{cfg_file}: expected a JSON object")
    ptype = cfg.get("peft_type")
    if str(ptype).upper() != "LORA":
        raise ConfigError(f"{cfg_file}: field 'peft_type' = {ptype!r}: expected 'LORA' (other peft methods are "
                          f"not supported)")
    for name, (fine, what) in _UNSUPPORTED.items():
        v = cfg.get(name, fine)
        if not (v == fine or _empty(v)):
            raise ConfigError(f"{cfg_file}: field '{name}' = {v!r}: {what} is not supported; merge the adapter "
                              f"with peft (merge_and_unload) and convert the merged model")
    mts = cfg.get("modules_to_save")
    if not _empty(mts):
        raise ConfigError(f"{cfg_file}: field 'modules_to_save' = {mts!r}: adapters that replace whole modules "
                          f"are not supported; merge the adapter with peft (merge_and_unload) and convert "
                          f"the merged model")
    r = _positive(cfg_file, "r", cfg.get("r"), integer=True)
    alpha = _positive(cfg_file, "lora_alpha", cfg.get("lora_alpha", r), integer=False)
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    for name, pats in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pats, dict):
            raise ConfigError(f"{cfg_file}: field '{name}' = {pats!r}: expected an object (pattern -> value)")
    bias_mode = cfg.get("bias", "none")
    if bias_mode not in ("none", "all", "lora_only"):
        raise ConfigError(f"{cfg_file}: field 'bias' = {bias_mode!r}: expected 'none', 'all' or 'lora_only'")

    wfile, sd = _read_weights(path)
    ad = LoraAdapter(path, r, alpha)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in sd.items():
        name = key.removeprefix(PREFIX)
        if "lora_embedding_" in name or "lora_magnitude_vector" in name:
            raise ConfigError(f"{wfile}: tensor {key}: embedding LoRA and DoRA are not supported")
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.(weight|bias)", name)
        if m:
            module, ab, leaf = m.groups()
            pairs.setdefault(module, {})[f"{ab}.{leaf}"] = t
            continue
        m = re.fullmatch(r"(.+?)(?:\.base_layer)?\.bias", name)
        if m and bias_mode != "none":
            ad.biases[m.group(1)] = t
            continue
        m = re.fullmatch(r"(.+)\.base_layer\.weight", name)
        if m:  # peft's save_embedding_layers ("auto": whenever a target is lm_head or an embedding)
            ad.base_weights[m.group(1)] = t
            continue
        unknown.append(key)
    if unknown:
        raise ConfigError(f"{wfile}: tensors that are neither LoRA A/B pairs nor trained biases: "
                          f"{', '.join(unknown)}")
    if not pairs:
        raise ConfigError(f"{wfile}: no lora_A / lora_B tensors")
    problems = []
    for module, parts in sorted(pairs.items()):
        a, b = parts.get("A.weight"), parts.get("B.weight")
        if a is None or b is None:
            problems.append(f"{module}: lora_{'B' if a is not None else 'A'}.weight missing")
            continue
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
                            f"[r, in] and [out, r] (convolution LoRA is not supported)")
            continue
        rank = _pattern_value(rank_pattern, module, r)
        if a.shape[0] != rank:
            problems.append(f"{module}: rank {a.shape[0]} in the weights, {rank} in the config")
            continue
        alpha_m = float(_pattern_value(alpha_pattern, module, alpha))
        scale = alpha_m / (math.sqrt(rank) if rslora else rank)
        ad.updates[module] = (a.float(), b.float(), scale)
        if "B.bias" in parts:
            ad.bias_updates[module] = scale * parts["B.bias"].float()
    if problems:
        raise WeightError(f"{wfile}: " + "; ".join(problems))
    return ad


def hf_apply(hf_model, path):
    """peft's own merge of the adapter in ``path`` into an HF model (the ``--compare-hf`` reference)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError(f"{path}: comparing a LoRA-merged checkpoint with HF needs peft (pip install peft)") from None
    return PeftModel.from_pretrained(hf_model, str(path)).merge_and_unload()


LORA = AdapterKind(
    name="lora",
    description="LoRA adapters in peft's format (adapter_config.json + adapter_model.safetensors), "
                "merged into the weights by `encdec convert --lora-dir`",
    detect=detect,
    load=load,
    hf_apply=hf_apply,
)


@hookimpl
def encdec_adapters():
    return [LORA]
