"""The records plugins return: Family (a model family as data) and AdapterKind."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .config import ConfigMap, EncDecConfig, read_json
from .errors import ConfigError, EncDecError, WeightError
from .weights import WeightMap, same_values


@dataclass
class Source:
    """What a family reads from a model directory or checkpoint file."""

    path: Path
    config: EncDecConfig
    tensors: Mapping[str, torch.Tensor]  # source names -> tensors (before the WeightMap)
    generation_config: dict = field(default_factory=dict)
    tokenizer_files: list = field(default_factory=list)  # paths copied next to the converted checkpoint


@dataclass(frozen=True)
class Family:
    """A model family: data plus a few choices. Hooks return these; the core reads nothing else.

    config_map:  ConfigMap, or a callable (source config dict) -> EncDecConfig
    weight_map:  WeightMap, or a callable (EncDecConfig) -> WeightMap
    detect:      for non-HF formats: (path) -> bool
    read_source: (path, family) -> Source; defaults to reading an HF directory
    tokenizer:   (dir, EncDecConfig) -> an object with encode(texts) / decode(ids); default HF AutoTokenizer
    hf_class:    name of the transformers class for --compare-hf (transformers.<name>)
    presets:     name -> source config dict (real shapes, for random-weight benchmarks)
    output_embedding: checkpoint names (output embedding, the input embedding it is tied to); where
                 a folder holds both with different values, the source config gets
                 OUTPUT_EMBEDDING_UNTIED (transformers 5 then loads them untied, whatever
                 tie_word_embeddings says: a Flan-T5 re-saved by it reads "tie_word_embeddings": true)
    """

    name: str
    description: str
    config_map: ConfigMap | Callable[[dict], EncDecConfig]
    weight_map: WeightMap | Callable[[EncDecConfig], WeightMap]
    aliases: tuple = ()
    architectures: tuple = ()
    model_types: tuple = ()
    detect: Callable[[Path], bool] | None = None
    read_source: Callable[[Path, "Family"], Source] | None = None
    tokenizer: Callable[[Path, EncDecConfig], Any] | None = None
    hf_class: str | None = None
    hf_loader: Callable[[Path], Any] | None = None  # (dir) -> HF reference model, overrides hf_class
    presets: Mapping[str, dict] = field(default_factory=dict)
    output_embedding: tuple[str, str] | None = None

    def make_config(self, src: dict, source: str = "config.json") -> EncDecConfig:
        if isinstance(self.config_map, ConfigMap):
            return self.config_map.apply(src, source)
        try:
            return self.config_map(src)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            raise ConfigError(f"{source}: cannot read the model config: {type(exc).__name__}: {exc}") from None

    def make_weight_map(self, cfg: EncDecConfig) -> WeightMap:
        return self.weight_map if isinstance(self.weight_map, WeightMap) else self.weight_map(cfg)

    def read(self, path: Path) -> Source:
        path = Path(path)
        if self.read_source is not None:
            return self.read_source(path, self)
        return read_hf_source(path, self)


@dataclass(frozen=True)
class AdapterKind:
    """An adapter plugin (LoRA, ...): how to read it and how to apply it to a model.

    detect(path) -> bool: whether ``path`` holds an adapter of this kind.
    load(path, family, EncDecConfig) -> adapter: read and check it. The adapter object has
      ``merge(tensors, source) -> (tensors, changed)``: the source's tensors (source names, before
      the family's WeightMap) with the adapter applied, and the changed keys, each with the adapter
      module it belongs to; and ``describe() -> dict`` (recorded in the checkpoint's config.json);
      optionally ``factors() -> {module: (A [r, in], B [out, r], scale)}`` for adapters that can
      also run unmerged, chosen per request (``encdec convert --lora-mode runtime``).
    hf_apply(hf_model, path) -> hf_model (optional): the same adapter applied to an HF transformers
      model, for ``--compare-hf`` against a checkpoint converted with adapters.
    """

    name: str
    description: str
    detect: Callable[[Path], bool]
    load: Callable[..., Any]  # (path, family, EncDecConfig) -> adapter object
    hf_apply: Callable[..., Any] | None = None


# ---------------------------------------------------------------------------- HF directories
HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
    "sentencepiece.bpe.model", "vocab.json", "merges.txt", "added_tokens.json", "source.spm",
    "target.spm", "vocab-src.json", "vocab-tgt.json",
)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or its sharded index; else pytorch_model.bin (weights_only), or its sharded
    index. As transformers, safetensors first. Every key an index lists must be in its shard."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    st, st_idx = path / "model.safetensors", path / "model.safetensors.index.json"
    binf, bin_idx = path / "pytorch_model.bin", path / "pytorch_model.bin.index.json"
    current = st  # the file being read, for the messages

    def read_bin(f: Path) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).split("\n")[0].strip()
            raise WeightError(f"{f}: cannot be read safely ({type(exc).__name__}: {first[:200]})") from None
        if not isinstance(state, dict):
            raise WeightError(f"{f}: holds a {type(state).__name__}, expected a state dict (tensor name -> tensor)")
        bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise WeightError(f"{f}: entry {bad!r} is a {type(state[bad]).__name__}, expected a tensor")
        return state

    def read_index(idx: Path, reader) -> dict[str, torch.Tensor]:
        nonlocal current
        index = read_json(idx, "weights index")
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
            raise WeightError(f"{idx}: field 'weight_map' = {str(wmap)[:80]!r}: expected a non-empty object "
                              f"of tensor name -> shard file name")
        out = {}
        for shard in sorted(set(wmap.values())):
            f = path / shard
            if not f.is_file():
                raise WeightError(f"{idx}: shard '{shard}' listed in weight_map is missing")
            current = f
            got = reader(f)
            lost = sorted(k for k, v in wmap.items() if v == shard and k not in got)
            if lost:
                raise WeightError(f"{f}: {len(lost)} tensor(s) that {idx.name} lists for this shard are not in it: "
                                  f"{', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}")
            out.update(got)
        return out

    try:
        if st.is_file():
            return load_file(str(st))
        if st_idx.is_file():
            return read_index(st_idx, lambda f: load_file(str(f)))
        if binf.is_file():
            return read_bin(binf)
        if bin_idx.is_file():
            return read_index(bin_idx, read_bin)
    except SafetensorError as exc:
        raise WeightError(f"{current}: not a valid safetensors file ({exc})") from None
    except (OSError, ValueError) as exc:
        raise WeightError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    present = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".h5",
                                                                                   ".msgpack", ".ckpt", ".pt", ".pth"))
    raise WeightError(f"{path}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
                      f"pytorch_model.bin.index.json" + (f" (weight files here: {', '.join(present[:6])}; "
                                                        f"transformers reads the same names)" if present else ""))


# set in a source config (by read_hf_source) when the checkpoint's output embedding differs from the
# input embedding it is declared tied to (Family.output_embedding): the family's config map then
# reads the output embedding untied, as transformers 5 loads such a folder
OUTPUT_EMBEDDING_UNTIED = "encdec_output_embedding_untied"


def output_embedding_tied(src: dict) -> bool:
    """A source config's output embedding is its input table: ``tie_word_embeddings`` (HF's default:
    true), unless the folder holds an output embedding of other values (OUTPUT_EMBEDDING_UNTIED:
    transformers 5 then loads it untied whatever the flag says; a Flan-T5 it re-saved reads true)."""
    return src.get("tie_word_embeddings", True) is not False and not src.get(OUTPUT_EMBEDDING_UNTIED)


def untied_by_weights(src: dict, tensors: Mapping[str, torch.Tensor], family: Family) -> dict:
    """``src`` with OUTPUT_EMBEDDING_UNTIED set where ``family.output_embedding``'s two tensors are both
    in ``tensors`` and differ (transformers 5's rule: tied weights that a checkpoint holds with
    different values are not tied)."""
    names = family.output_embedding
    if not names or not all(n in tensors for n in names):
        return src
    out, inp = (tensors[n] for n in names)
    return src if same_values(out, inp) else {**src, OUTPUT_EMBEDDING_UNTIED: True}


def read_hf_source(path: Path, family: Family) -> Source:
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory (expected an HF model directory with config.json)")
    src = read_json(path / "config.json")
    cfg = family.make_config(src, str(path / "config.json"))  # a bad config is named before the weights load
    tensors = load_tensors(path)
    untied = untied_by_weights(src, tensors, family)
    if untied is not src:
        cfg = family.make_config(untied, str(path / "config.json"))
    gen = read_generation_config(path)
    tok = [path / f for f in HF_TOKENIZER_FILES if (path / f).is_file()]
    return Source(path, cfg, tensors, gen, tok)


def read_generation_config(path: Path) -> dict:
    """What HF's ``generate`` starts from for an HF model folder: its generation_config.json, or, when
    the folder has none, the generation options in its config.json (HF then loads config.json as the
    generation config: beam count, lengths, penalties, the whole EOS list; older checkpoints keep
    them there)."""
    if (path / "generation_config.json").is_file():
        return read_json(path / "generation_config.json", "generation config")
    from .runtime.generation import hf_generation_keys

    keys = hf_generation_keys()
    raw = read_json(path / "config.json")
    return {k: v for k, v in raw.items() if k in keys and v is not None}


def detect_family(reg, source) -> Family:
    """HF config.json (architectures, or model_type where the two name different families) or a
    family's own detect()."""
    source = Path(source)
    cfg_path = source / "config.json" if source.is_dir() else None
    if cfg_path is not None and cfg_path.is_file():
        cfg = read_json(cfg_path)
        mt = cfg.get("model_type")
        by_type = reg.find(mt) if isinstance(mt, str) and mt else None
        for arch in cfg.get("architectures") or []:
            fam = reg.find(arch) if isinstance(arch, str) else None
            if fam is not None:
                # architectures and model_type disagree: transformers' Auto classes go by model_type
                return by_type if by_type is not None and by_type.name != fam.name else fam
        if by_type is not None:
            return by_type
    for entry in reg.families():
        fam = entry.record
        if fam.detect is not None:
            try:
                if fam.detect(source):
                    return fam
            except Exception:
                continue
    if cfg_path is not None and cfg_path.is_file():
        cfg = read_json(cfg_path)
        raise EncDecError(
            f"{cfg_path}: no installed family handles architectures={cfg.get('architectures')} "
            f"model_type={cfg.get('model_type')!r}; installed: {', '.join(reg.names())}; use --family")
    if not source.exists():
        raise EncDecError(f"{source}: no such file or directory")
    raise EncDecError(f"{source}: no config.json and no installed family recognises it; use --family "
                      f"(installed: {', '.join(reg.names())})")


def dump_json(obj, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
