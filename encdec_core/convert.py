"""Source (HF dir, fairseq checkpoint, ...) -> our checkpoint, through the family's maps."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import validate_parallel, write_checkpoint
from .family import Family, Source
from .model import EncDecModel, build_model
from .registry import registry as default_registry


def resolve_family(source: Path, family: str | None = None, reg=None) -> Family:
    reg = reg or default_registry
    return reg.get(family) if family else reg.detect(source)


def map_source(fam: Family, src: Source) -> dict[str, torch.Tensor]:
    """Rename the source tensors into our names; every problem reported at once."""
    model = build_model(src.config, meta=True)
    wm = fam.make_weight_map(src.config)
    tensors, _ = wm.apply(src.tensors, model.expected_shapes(), src.config, source=str(src.path))
    return tensors


def convert(source: Path, output_dir: Path, family: str | None = None, dtype: torch.dtype = torch.float32,
            tp: int = 1, pp: int = 1, reg=None, progress: bool = False) -> Path:
    fam = resolve_family(Path(source), family, reg)
    src = fam.read(Path(source))
    validate_parallel(src.config, tp, pp)
    tensors = map_source(fam, src)
    extra = {"family": fam.name, "source": str(Path(source).resolve()), "generation_config": src.generation_config}
    return write_checkpoint(Path(output_dir), src.config, tensors, dtype, tp, pp, extra, src.tokenizer_files,
                            progress=progress)


def load_source_model(source: Path, family: str | None = None, dtype=torch.float32, device="cpu",
                      reg=None) -> tuple[EncDecModel, Source, Family]:
    """An in-memory model straight from a source dir (tests, --compare-hf helpers)."""
    fam = resolve_family(Path(source), family, reg)
    src = fam.read(Path(source))
    tensors = map_source(fam, src)
    model = build_model(src.config, dtype=dtype, device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True)
    model.eval()
    return model, src, fam
