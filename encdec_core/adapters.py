"""Adapters (LoRA, ...) applied to a source model before the family's WeightMap.

The core knows no adapter kind by name: each path is offered to the installed adapter plugins
(``encdec_adapters`` hook, ``AdapterKind.detect``), and the one that recognises it reads it and merges it
into the source's tensors. Merging before the WeightMap keeps adapters independent of our layout
(fused QKV, tensor-parallel shards): the family's maps then treat the merged model like any other.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterable

from .errors import ConfigError, WeightError
from .family import AdapterKind, Family, Source


def source_key(tensors, module: str, leaf: str) -> str | None:
    """The source key of ``module``'s ``leaf`` tensor ("weight", "bias"). Adapters name modules as the
    HF model does; a source without the HF wrapper's leading ``model.`` (a fairseq checkpoint) is
    matched too. None where the source has no such tensor."""
    for name in (module, module.removeprefix("model."), "model." + module):
        key = f"{name}.{leaf}"
        if key in tensors:
            return key
    return None


def adapter_kind(path: Path, reg) -> AdapterKind:
    """The installed adapter kind that recognises ``path``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: adapter directory not found")
    kinds = [e.record for e in reg.adapters()]
    for kind in kinds:
        try:
            if kind.detect(path):
                return kind
        except Exception:  # noqa: BLE001 - a plugin's detect must not decide for the others
            continue
    names = ", ".join(k.name for k in kinds) or "(none installed)"
    raise ConfigError(f"{path}: no installed adapter plugin reads this directory (installed kinds: {names}; a peft "
                      f"LoRA adapter holds adapter_config.json with \"peft_type\": \"LORA\" and "
                      f"adapter_model.safetensors)")


def apply_adapters(fam: Family, src: Source, paths: Iterable[Path], reg
                   ) -> tuple[Source, list[dict], dict[str, str]]:
    """``src`` with every adapter in ``paths`` merged, in order. Returns the new source, one description
    per adapter (for the checkpoint's config.json) and the changed source keys, each with
    "<adapter path>: <module>" (to refuse an adapter whose tensor the family does not load)."""
    tensors = src.tensors
    described: list[dict] = []
    changed_all: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        kind = adapter_kind(p, reg)
        ad = kind.load(p, fam, src.config)
        tensors, changed = ad.merge(tensors, source=str(src.path))
        changed_all.update({k: f"{p}: {m}" for k, m in changed.items()})
        described.append(ad.describe())
    return replace(src, tensors=tensors), described, changed_all


def check_loaded(changed: dict[str, str], dropped: Iterable[str], fam: Family) -> None:
    """Refuse adapters that change a source tensor the family's WeightMap drops (e.g. an lm_head tied
    to the embedding): merged there, the change would silently vanish."""
    lost = [f"{changed[k]} changes {k}" for k in dropped if k in changed]
    if lost:
        raise WeightError("; ".join(lost) + f": the {fam.name} family does not load that tensor (the model ties it "
                          "to another one), so the adapter's change would be lost; merge the adapter with peft "
                          "(merge_and_unload) and convert the merged model with untied weights")


def hf_with_adapters(hf_model, adapters: Iterable[dict], reg):
    """An HF reference model with the adapters a checkpoint records (its config.json ``adapters``)
    applied by each kind's own ``hf_apply`` (LoRA: peft)."""
    for a in adapters or ():
        kind = reg.adapter(a.get("kind", ""))
        if kind.hf_apply is None:
            raise ConfigError(f"adapter kind '{kind.name}' cannot be applied to an HF model (for --compare-hf)")
        hf_model = kind.hf_apply(hf_model, Path(a["path"]))
    return hf_model
