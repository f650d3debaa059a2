"""Our checkpoint: config.json + rank{r}.safetensors, sharded by a plan kept apart from renaming.

Tensor-parallel plan (applied to our parameter names after the WeightMap):
    vocab    rows split (vocab padded to a multiple of tp): embeddings and lm_head
    column   output features split; ``parts`` fused blocks (q|k|v, gate|up) split one by one
    row      input features split (dim 1); the row layer's bias stays whole
    heads    relative-bias table [buckets, heads] split by heads (dim 1)
    (anything else is replicated)
Pipeline-parallel: rank r keeps the encoder/decoder layers of its stage; all else is replicated.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import EncDecConfig, read_json
from .fsutil import atomic_dir
from .errors import ConfigError, EncDecError, WeightError, non_floating
from .model import EncDecModel, build_model, padded_vocab
from .parallel.context import ParallelContext, split_range

FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name, what: str = "--dtype") -> torch.dtype:
    """A dtype we store and run: its name (float16, bf16, ...) or the torch dtype itself."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    key = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}.get(str(name), str(name))
    if key not in DTYPES:
        raise ConfigError(f"{what} = {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dt: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dt]


@dataclass(frozen=True)
class ShardRule:
    pattern: str
    kind: str  # vocab | column | row | heads | replicate
    parts: int = 1


def shard_plan(cfg: EncDecConfig) -> list[ShardRule]:
    gated = 2 if cfg.gated_ffn else 1
    return [
        ShardRule(r"(shared|(encoder|decoder)\.embed_tokens|lm_head)\.weight", "vocab"),
        ShardRule(r".*\.self_attn\.qkv\.(weight|bias)", "column", 3),
        ShardRule(r".*\.cross_attn\.q\.(weight|bias)", "column", 1),
        ShardRule(r".*\.cross_attn\.kv\.(weight|bias)", "column", 2),
        ShardRule(r".*\.(self_attn|cross_attn)\.out\.weight", "row"),
        ShardRule(r".*\.ffn\.wi\.(weight|bias)", "column", gated),
        ShardRule(r".*\.ffn\.wo\.weight", "row"),
        ShardRule(r".*rel_bias\.weight", "heads"),
    ]


def shard_rule(name: str, plan: list[ShardRule]) -> ShardRule | None:
    """The rule of ``plan`` that parameter ``name`` follows, or None (replicated)."""
    for rule in plan:
        if re.fullmatch(rule.pattern, name):
            return rule
    return None


def shard_tensor(name: str, t: torch.Tensor, plan: list[ShardRule], tp: int, rank: int) -> torch.Tensor:
    if tp == 1:
        return t
    rule = shard_rule(name, plan)
    if rule is None:
        return t
    if rule.kind == "vocab":
        v = t.shape[0]
        vp = padded_vocab(v, tp)
        if vp != v:
            t = torch.cat([t, t.new_zeros((vp - v,) + tuple(t.shape[1:]))], 0)
        return t.chunk(tp, 0)[rank].contiguous()
    if rule.kind == "column":
        blocks = t.chunk(rule.parts, 0)
        return torch.cat([b.chunk(tp, 0)[rank] for b in blocks], 0).contiguous()
    if rule.kind in ("row", "heads"):
        return t.chunk(tp, 1)[rank].contiguous()
    return t


_LAYER = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.")


def stage_of(name: str, cfg: EncDecConfig, pp: int):
    """Which PP stage holds a parameter; None = every stage."""
    m = _LAYER.match(name)
    if not m:
        return None
    n = cfg.num_layers(m.group(1))
    i = int(m.group(2))
    for s in range(pp):
        if i in split_range(n, pp, s):
            return s
    raise WeightError(f"parameter {name}: layer {i} out of range (0..{n - 1})")


def checkpoint_meta(cfg: EncDecConfig, dtype: torch.dtype, tp: int, pp: int, extra: dict | None = None) -> dict:
    return {
        "format": "encdec-checkpoint",
        "format_version": FORMAT_VERSION,
        "dtype": dtype_name(dtype),
        "mapping": {"tp_size": tp, "pp_size": pp, "world_size": tp * pp},
        "model": cfg.to_dict(),
        **(extra or {}),
    }


def validate_parallel(cfg: EncDecConfig, tp: int, pp: int) -> None:
    for name, v in (("--tp-size", tp), ("--pp-size", pp)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} = {v!r}: expected a positive integer")
    for side in ("encoder", "decoder"):
        if cfg.heads(side) % tp:
            raise ConfigError(
                f"--tp-size {tp} does not divide the {side}'s {cfg.heads(side)} attention heads "
                f"(tensor parallelism splits heads; choose a tp that divides {cfg.heads(side)})")
        if cfg.ffn_dim(side) % tp:
            raise ConfigError(f"--tp-size {tp} does not divide the {side}'s ffn dim {cfg.ffn_dim(side)}")
    if pp > cfg.decoder_layers or (cfg.encoder_layers and pp > cfg.encoder_layers):
        raise ConfigError(
            f"--pp-size {pp} exceeds the layer count (encoder {cfg.encoder_layers}, decoder {cfg.decoder_layers})")


def rank_tensors(tensors: dict[str, torch.Tensor], cfg: EncDecConfig, ctx: ParallelContext,
                 dtype: torch.dtype | None = None, plan: list[ShardRule] | None = None) -> dict[str, torch.Tensor]:
    """The tensors rank ``ctx.rank`` holds, from a single-rank state (names as in the checkpoint):
    its pipeline stage's layers, each cut to its tensor-parallel slice (``shard_plan``)."""
    plan = shard_plan(cfg) if plan is None else plan
    out = {}
    for name, t in tensors.items():
        st = stage_of(name, cfg, ctx.pp_size)
        if st is not None and st != ctx.pp_rank:
            continue
        x = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        out[name] = shard_tensor(name, x, plan, ctx.tp_size, ctx.tp_rank).contiguous()
    return out


@torch.no_grad()
def shard_model(model: EncDecModel, ctx: ParallelContext, device=None) -> EncDecModel:
    """This rank's part of a single-rank model held in memory (every rank holds the same full model,
    e.g. built from a preset with one seed): the model ``load_model`` would build from a checkpoint
    converted with ``ctx``'s mapping. No collective runs."""
    if model.ctx.world_size != 1:
        raise EncDecError(f"shard_model: expected a single-rank model, got tp={model.ctx.tp_size} "
                          f"pp={model.ctx.pp_size}")
    validate_parallel(model.cfg, ctx.tp_size, ctx.pp_size)
    tensors = rank_tensors(model.state_dict(), model.cfg, ctx)
    part = build_model(model.cfg, ctx, model.dtype, meta=True)
    expected = part.expected_shapes()
    wrong = sorted(set(expected) ^ set(tensors))
    wrong += [k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    if wrong:
        raise WeightError(f"shard_model: tensors that do not fit rank {ctx.rank}'s model: {', '.join(wrong[:8])}")
    part = part.to_empty(device=device if device is not None else model.device)
    for k, v in part.state_dict().items():
        v.copy_(tensors[k])
    part.init_buffers()
    return part.eval()


def write_checkpoint(out_dir: Path, cfg: EncDecConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                     tp: int = 1, pp: int = 1, extra_meta: dict | None = None, extra_files=(),
                     progress: bool = False) -> Path:
    """Write atomically: everything goes to a temp dir next to ``out_dir``, renamed at the end."""
    from safetensors.torch import save_file

    validate_parallel(cfg, tp, pp)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        plan = shard_plan(cfg)
        world = tp * pp
        it = range(world)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="writing shards", unit="rank", disable=world == 1 and False)
        for rank in it:
            shard = rank_tensors(tensors, cfg, ParallelContext(tp_size=tp, pp_size=pp, rank=rank), dtype, plan)
            save_file(shard, str(tmp / f"rank{rank}.safetensors"), metadata={"rank": str(rank)})
        meta = checkpoint_meta(cfg, dtype, tp, pp, extra_meta)
        meta["checksum"] = checksum_dir(tmp, world)
        # per-rank sha256: a rank checks only its own shard at load (parallel/launch.verify_checkpoint)
        meta["shard_checksums"] = {str(r): file_sha256(tmp / f"rank{r}.safetensors") for r in range(world)}
        with open(tmp / "config.json", "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        for src in extra_files:
            src = Path(src)
            dst = tmp / src.name
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
    return out_dir


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def checksum_dir(d: Path, world: int) -> str:
    h = hashlib.sha256()
    for r in range(world):
        with open(Path(d) / f"rank{r}.safetensors", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_meta(ckpt_dir: Path) -> dict:
    ckpt_dir = Path(ckpt_dir)
    meta = read_json(ckpt_dir / "config.json", "encdec checkpoint config")
    if meta.get("format") != "encdec-checkpoint":
        raise ConfigError(
            f"{ckpt_dir / 'config.json'}: field 'format' = {meta.get('format')!r}: expected 'encdec-checkpoint' "
            f"(is this an HF model dir? run 'encdec convert' first)")
    for key in ("model", "dtype", "mapping"):
        if key not in meta:
            raise ConfigError(f"{ckpt_dir / 'config.json'}: missing field '{key}'")
    where = ckpt_dir / "config.json"
    if not isinstance(meta["model"], dict):
        raise ConfigError(f"{where}: field 'model' = {meta['model']!r}: expected an object of model fields")
    if not isinstance(meta["dtype"], str):
        raise ConfigError(f"{where}: field 'dtype' = {meta['dtype']!r}: expected one of {', '.join(DTYPES)}")
    mp = meta["mapping"]
    if not isinstance(mp, dict):
        raise ConfigError(f"{where}: field 'mapping' = {mp!r}: expected "
                          f"{{'tp_size': N, 'pp_size': M, 'world_size': N*M}}")
    for key in ("tp_size", "pp_size", "world_size"):
        v = mp.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{where}: field 'mapping.{key}' = {v!r}: expected a positive integer")
    if mp["world_size"] != mp["tp_size"] * mp["pp_size"]:
        raise ConfigError(f"{where}: field 'mapping.world_size' = {mp['world_size']}: expected tp_size x pp_size = "
                          f"{mp['tp_size'] * mp['pp_size']}")
    gen = meta.get("generation_config")
    if gen is not None and not isinstance(gen, dict):  # build and Engine read it as a dict
        raise ConfigError(f"{where}: field 'generation_config' = {gen!r}: expected an object of generation "
                          f"options (the model's generation_config.json) or null")
    return meta


def check_float_tensors(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every weight is a floating-point tensor (an integer or bool tensor would be cast silently)."""
    bad = [f"{k} ({str(t.dtype).replace('torch.', '')})" for k, t in tensors.items() if not t.is_floating_point()]
    if bad:
        raise WeightError(f"{source}: {non_floating(bad)}")


def check_shard(f: Path) -> dict[str, tuple[tuple, str]]:
    """``f`` is a complete safetensors file (its header is read, not its tensors); returns the header:
    tensor name -> (shape, safetensors dtype such as 'BF16')."""
    from safetensors import SafetensorError, safe_open

    if not f.is_file():
        raise WeightError(f"{f}: shard is missing")
    try:
        header = {}
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                header[k] = (tuple(sl.get_shape()), sl.get_dtype())
        return header
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightError(f"{f}: not a valid safetensors file ({exc})") from None


def _fit_errors(expected: dict[str, tuple], shapes: dict[str, tuple]) -> list[str]:
    """What keeps tensors of ``shapes`` from filling a model of ``expected`` shapes (none: they fit)."""
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k} has {shapes[k]}, expected {expected[k]}" for k in expected if k in shapes and shapes[k] != expected[k]]
    parts = []
    if missing:
        parts.append(f"missing tensor(s): {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected tensor(s): {', '.join(unexpected)}")
    if wrong:
        parts.append("wrong shape: " + "; ".join(wrong))
    return parts


def check_shard_fits(ckpt_dir: Path, header: dict, cfg: EncDecConfig, ctx: ParallelContext) -> None:
    """Rank ``ctx.rank``'s shard, by its ``header`` (``check_shard``'s; no tensor is loaded), holds the
    tensors, shapes and floating dtypes of the model ``cfg`` describes: build refuses what load_model would."""
    f = Path(ckpt_dir) / f"rank{ctx.rank}.safetensors"
    parts = _fit_errors(build_model(cfg, ctx, meta=True).expected_shapes(), {k: s for k, (s, _) in header.items()})
    if parts:
        raise WeightError(f"{f}: " + " | ".join(parts) + f" (for the model in {Path(ckpt_dir) / 'config.json'})")
    bad = [f"{k} ({dt})" for k, (_, dt) in header.items() if not dt.startswith(("F", "BF"))]
    if bad:
        raise WeightError(f"{f}: {non_floating(bad)}")


def config_from_meta(meta: dict, source: str) -> EncDecConfig:
    return EncDecConfig.from_dict(meta["model"], source)


def load_rank_tensors(ckpt_dir: Path, rank: int) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = Path(ckpt_dir) / f"rank{rank}.safetensors"
    if not f.is_file():
        raise WeightError(f"{f}: shard for rank {rank} is missing")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightError(f"{f}: not a valid safetensors file ({exc})") from None


def load_model(ckpt_dir: Path, ctx: ParallelContext | None = None, device="cpu", dtype: torch.dtype | None = None,
               meta: dict | None = None) -> EncDecModel:
    """Build the model for this rank and fill it from rank{r}.safetensors, checking every tensor."""
    ckpt_dir = Path(ckpt_dir)
    meta = meta or read_meta(ckpt_dir)
    cfg = config_from_meta(meta, str(ckpt_dir / "config.json"))
    mp = meta["mapping"]
    tp, pp = int(mp["tp_size"]), int(mp["pp_size"])
    if ctx is None:
        if tp * pp != 1:
            raise EncDecError(
                f"{ckpt_dir}: checkpoint is sharded for tp={tp} pp={pp} (world {tp * pp}); launch {tp * pp} ranks "
                f"(mpirun -n {tp * pp} ...) or convert with --tp-size 1 --pp-size 1")
        ctx = ParallelContext()
    if (ctx.tp_size, ctx.pp_size) != (tp, pp):
        raise EncDecError(
            f"{ckpt_dir}: checkpoint is sharded for tp={tp} pp={pp} (world {tp * pp}) but this launch has "
            f"tp={ctx.tp_size} pp={ctx.pp_size} (world {ctx.world_size})")
    store_dtype = parse_dtype(meta["dtype"], f"{ckpt_dir / 'config.json'} field 'dtype'")
    dtype = dtype or store_dtype
    tensors = load_rank_tensors(ckpt_dir, ctx.rank)
    model = build_model(cfg, ctx, dtype, meta=True)
    expected = model.expected_shapes()
    parts = _fit_errors(expected, {k: tuple(t.shape) for k, t in tensors.items()})
    if parts:
        raise WeightError(f"{ckpt_dir / f'rank{ctx.rank}.safetensors'}: " + " | ".join(parts))
    check_float_tensors({k: tensors[k] for k in expected}, str(ckpt_dir / f"rank{ctx.rank}.safetensors"))
    model = model.to_empty(device=device)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(tensors[k].to(dtype))
    model.init_buffers()  # non-persistent buffers (sinusoid tables) are rebuilt, not loaded
    model.eval()
    return model
