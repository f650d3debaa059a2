"""Source (HF dir, fairseq checkpoint, ...) -> our checkpoint, through the family's maps."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from .adapters import apply_adapters, check_loaded
from .checkpoint import check_float_tensors, parse_dtype, validate_parallel, write_checkpoint
from .errors import ConfigError, WeightError, non_floating
from .family import Family, Source
from .fsutil import as_path, check_output_dir
from .model import EncDecModel, build_model
from .registry import registry as default_registry


def resolve_family(source: Path, family: str | None = None, reg=None) -> Family:
    reg = reg or default_registry
    return reg.get(family) if family else reg.detect(source)


def map_source(fam: Family, src: Source, adapter_changes: dict[str, str] | None = None,
               dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Rename the source tensors into our names; every problem reported at once. ``adapter_changes``
    (from ``apply_adapters``): source keys an adapter changed, which the map must not drop. With
    ``dtype`` (the dtype the checkpoint stores) every weight is checked to be finite and to fit it."""
    model = build_model(src.config, meta=True)
    wm = fam.make_weight_map(src.config)
    tensors, report = wm.apply(src.tensors, model.expected_shapes(), src.config, source=str(src.path), strict=False)
    if adapter_changes:  # first: an adapter on a dropped tensor also makes that copy differ from its original
        check_loaded(adapter_changes, report.dropped, fam)
    if not report.ok:
        raise WeightError(report.message(str(src.path)))
    check_float_tensors(tensors, str(src.path))
    if dtype is not None:
        check_weight_values(tensors, dtype, str(src.path), report.origin, src.tensors, adapter_changes)
    return tensors


def _max_abs(t: torch.Tensor) -> float:
    """The largest |value| of ``t`` in one pass (no copy); nan when ``t`` holds a NaN."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t.detach())
    lo, hi = float(lo), float(hi)
    return float("nan") if lo != lo or hi != hi else max(-lo, hi)


def _fits(m: float, dtype: torch.dtype) -> bool:
    """A largest |value| ``m`` stays finite once cast to ``dtype`` (rounded as the cast rounds)."""
    return m == m and m != float("inf") and not bool(torch.tensor(m, dtype=torch.float64).to(dtype).isinf())


def check_weight_values(tensors: dict[str, torch.Tensor], dtype: torch.dtype, source: str,
                        origin: dict[str, tuple[str, ...]] | None = None,
                        source_tensors: dict[str, torch.Tensor] | None = None,
                        adapter_changes: dict[str, str] | None = None) -> None:
    """Every weight is finite and stays finite once cast to ``dtype``: refuse NaN / inf weights and
    values beyond the dtype's range (1e6 in float16 becomes inf), naming each tensor by its source
    name (``origin``: target -> source keys), its largest |value| and the dtype's limit. One reduction
    per tensor (a tied tensor is checked once)."""
    origin, source_tensors, adapter_changes = origin or {}, source_tensors or {}, adapter_changes or {}
    dname = str(dtype).replace("torch.", "")
    seen: dict[tuple, float] = {}
    bad: list[str] = []
    overflow = False
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue  # check_float_tensors reports it
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())
        m = seen[key] if key in seen else seen.setdefault(key, _max_abs(t))
        if _fits(m, dtype):
            continue
        srcs = origin.get(name, ())
        if len(srcs) > 1:  # a fused target: name the source tensor(s) at fault (error path only)
            srcs = tuple(k for k in srcs if k in source_tensors and source_tensors[k].is_floating_point()
                         and not _fits(_max_abs(source_tensors[k]), dtype)) or srcs
        where = f"{' + '.join(srcs)} (our {name})" if srcs and srcs != (name,) else name
        by = sorted({adapter_changes[k] for k in srcs if k in adapter_changes})
        if by:
            where += f" (changed by the adapter {'; '.join(by)})"
        if m != m or m == float("inf"):
            bad.append(f"{where} holds {'NaN' if m != m else 'inf'} values: expected finite weights")
        else:
            overflow = True
            bad.append(f"{where}: largest |value| {m:.6g} exceeds {dname}'s limit {torch.finfo(dtype).max:.6g} "
                       f"(the cast would make it inf)")
    if bad:
        shown = bad[:8] + ([f"... and {len(bad) - 8} more"] if len(bad) > 8 else [])
        msg = f"{source}: weight(s) that are not finite in {dname}: " + "; ".join(shown)
        if overflow:
            msg += ("; convert with --dtype bfloat16 (float32's range, limit 3.39e+38) or float32"
                    if dtype == torch.float16 else "; convert with --dtype float32")
        raise WeightError(msg)


def read_and_map(source: Path, family: str | None = None, reg=None, adapters: Sequence[Path] = (),
                 dtype: torch.dtype | None = None) -> tuple[Family, Source, dict[str, torch.Tensor], list[dict]]:
    """The family, the source, our tensors and the adapters' descriptions: ``source`` read by its
    family, with ``adapters`` (LoRA directories, ...) merged in order before the WeightMap. With
    ``dtype`` the merged weights are checked to be finite in it (``check_weight_values``)."""
    reg = reg or default_registry
    fam = resolve_family(Path(source), family, reg)
    src = fam.read(Path(source))
    changes, described = {}, []
    if adapters:
        base = src.tensors
        src, described, changes = apply_adapters(fam, src, adapters, reg)
        # a merge computes in float: an integer base tensor would be promoted before the map could see it
        bad = [f"{k} ({str(base[k].dtype).replace('torch.', '')})" for k in changes
               if k in base and not base[k].is_floating_point()]
        if bad:
            raise WeightError(f"{src.path}: {non_floating(bad, f'{len(bad)} source tensor(s)')}")
    return fam, src, map_source(fam, src, changes, dtype), described


def adapter_paths(adapters) -> list[Path]:
    """``adapters`` as a list of Paths: a list of paths, or one path (str or Path) for one adapter."""
    if adapters is None:
        return []
    if isinstance(adapters, (str, os.PathLike)):
        return [Path(adapters)]
    if isinstance(adapters, bytes) or not hasattr(adapters, "__iter__"):
        raise ConfigError(f"adapters = {adapters!r}: expected a list of adapter directories (str or Path)")
    return [as_path(a, "--lora-dir") for a in adapters]


def convert(source: Path, output_dir: Path, family: str | None = None, dtype: torch.dtype = torch.float32,
            tp: int = 1, pp: int = 1, reg=None, progress: bool = False, adapters: Sequence[Path] = (),
            adapter_mode: str = "merge") -> Path:
    """``source`` -> our checkpoint in ``output_dir``. ``adapters`` (LoRA directories, ...; one path
    for one adapter):
    ``adapter_mode`` "merge" adds them to the weights, in order; "runtime" keeps the base weights and
    writes each adapter's factors under ``lora/`` (uid = position in ``adapters``), chosen per
    request at run time (``runtime/lora.py``)."""
    if adapter_mode not in ("merge", "runtime"):
        raise ConfigError(f"--lora-mode {adapter_mode!r}: expected merge or runtime")
    dtype = parse_dtype(dtype)  # a name or a torch dtype
    source, output_dir = as_path(source, "--model-dir"), as_path(output_dir, "--output-dir")
    adapters = adapter_paths(adapters)
    check_output_dir(output_dir, "--output-dir")  # before reading anything
    if adapter_mode == "runtime" and adapters:
        return _convert_runtime_adapters(source, Path(output_dir), family, dtype, reg, progress, adapters, tp, pp)
    fam, src, tensors, described = read_and_map(source, family, reg, adapters, dtype)
    validate_parallel(src.config, tp, pp)
    extra = {"family": fam.name, "source": str(Path(source).resolve()), "generation_config": src.generation_config}
    if described:
        extra["adapters"] = described
    return write_checkpoint(Path(output_dir), src.config, tensors, dtype, tp, pp, extra, src.tokenizer_files,
                            progress=progress)


def _convert_runtime_adapters(source, output_dir: Path, family, dtype, reg, progress, adapters, tp: int = 1,
                              pp: int = 1) -> Path:
    """The base weights sharded for (tp, pp) like any checkpoint; every adapter's whole factors under
    ``lora/`` (each rank takes its layers' slices at load: ``runtime.lora.LoraBank``)."""
    import tempfile

    from .adapters import adapter_kind
    from .runtime.lora import LORA_DIR, map_factors, write_bank

    reg = reg or default_registry
    fam, src, tensors, _ = read_and_map(source, family, reg, dtype=dtype)
    validate_parallel(src.config, tp, pp)
    banks, described = [], []
    for p in adapters:
        p = Path(p)
        ad = adapter_kind(p, reg).load(p, fam, src.config)
        if not hasattr(ad, "factors"):
            raise ConfigError(f"{p}: this adapter kind can only be merged (--lora-mode merge)")
        factors = ad.factors()
        # the bank is stored in float32 and added at run time: its factors must be finite too
        check_weight_values({f"{m}.lora_{x}": t for m, (a, b, _) in factors.items() for x, t in (("A", a), ("B", b))},
                            torch.float32, str(p))
        banks.append(map_factors(fam, src, factors, str(p), str(src.path)))
        described.append({**ad.describe(), "uid": len(described)})
    extra = {"family": fam.name, "source": str(Path(source).resolve()), "generation_config": src.generation_config,
             "lora_runtime": described}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / LORA_DIR
        write_bank(folder, banks)
        return write_checkpoint(output_dir, src.config, tensors, dtype, tp, pp, extra,
                                [*src.tokenizer_files, folder], progress=progress)


def load_source_model(source: Path, family: str | None = None, dtype=torch.float32, device="cpu",
                      reg=None, adapters: Sequence[Path] = ()) -> tuple[EncDecModel, Source, Family]:
    """An in-memory model straight from a source dir (tests, --compare-hf helpers), with ``adapters``
    merged."""
    fam, src, tensors, _ = read_and_map(as_path(source, "--model-dir"), family, reg, adapter_paths(adapters))
    model = build_model(src.config, dtype=dtype, device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True)
    model.eval()
    return model, src, fam
