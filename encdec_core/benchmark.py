"""Benchmarks: encoder time, ms per decode step, end-to-end latency, tokens/s and peak memory of our
engine, side by side (``compare_hf``) with HF transformers' ``generate`` (eager and, on CUDA, its
static-cache compiled fast path) and, on CPU, CTranslate2 where it is importable.

``run_benchmark`` is what ``encdec benchmark`` calls. A preset name (``"t5-small"``) builds a model of
the preset's real shapes with random weights, so no checkpoint is needed.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import EncDecError

# ---------------------------------------------------------------------------- models from presets


def find_preset(name: str, reg=None):
    """(family, source config dict) of a preset offered by any registered family."""
    from .registry import registry as default_registry

    reg = reg or default_registry
    known = []
    for entry in reg.families():
        fam = entry.record
        if name in fam.presets:
            return fam, dict(fam.presets[name])
        known.extend(fam.presets)
    raise EncDecError(f"unknown preset '{name}'; known presets: {', '.join(sorted(known)) or '(none installed)'}")


@torch.no_grad()
def init_random(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Random weights of a plausible scale: norms weight 1 / bias 0, biases 0, the rest N(0, std)."""
    from .layers.norm import Norm

    dev = next(model.parameters()).device
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    norm_params = set()
    for m in model.modules():
        if isinstance(m, Norm):
            norm_params.update(id(p) for p in m.parameters(recurse=False))
    for name, p in model.named_parameters():
        if id(p) in norm_params:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias") and p.dim() == 1:
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32).mul_(std).to(p.dtype))
    return model


def model_from_preset(name: str, dtype=torch.float32, device="cpu", seed: int = 0, reg=None):
    """Our model with the preset's real shapes and random weights."""
    from .model import build_model

    fam, src = find_preset(name, reg)
    cfg = fam.make_config(src, f"preset '{name}'")
    model = build_model(cfg, dtype=dtype, device=device)
    init_random(model, seed)
    model.init_buffers()
    model.eval()
    return model


def hf_model_from_preset(name: str, dtype=torch.float32, device="cpu", seed: int = 0, reg=None):
    """(HF model with random weights, our model holding the same weights) for a preset.

    The HF model is what transformers builds from the preset's config: under transformers 5.x a T5
    preset asking for an untied output embedding (Flan-T5) comes out tied and unscaled (``T5Config``
    always ties), and ours reads it so. The compute timed is an untied model's (one [vocab, d_model]
    product per step, no output scale). Untying it (2026-12-01 23:16, H200) timed the same, but its
    random lm_head took away the tied model's pull towards repeating the fed-back token, and the bf16
    greedy token match with HF fell from 93.8 % to 42.8 % (HF bf16 against HF fp32: 60 %): a noise
    floor of random weights, not a difference between the two (fp32 logits within 3e-4 at |logit|
    146), so the benchmark keeps transformers' own build (docs/performance.md)."""
    import transformers

    fam, src = find_preset(name, reg)
    hf_cfg = transformers.AutoConfig.for_model(**src)
    cls = getattr(transformers, fam.hf_class or "AutoModelForSeq2SeqLM")
    torch.manual_seed(seed)
    with torch.device(device):
        hf = cls.from_config(hf_cfg) if hasattr(cls, "from_config") else cls(hf_cfg)
    hf = hf.to(dtype).eval()
    # through the family's own reader and weight map, exactly as `encdec convert` reads a checkpoint
    from .convert import load_source_model

    with tempfile.TemporaryDirectory(prefix="encdec-bench-") as tmp:
        hf.save_pretrained(tmp)
        model, _, _ = load_source_model(Path(tmp), fam.name, dtype=dtype, device=device, reg=reg)
    return hf, model


def parallel_preset(name: str, tp: int, pp: int, device="cpu", dtype=None, seed: int = 0,
                    hf_weights: bool = False, keep_hf: bool = False, reg=None):
    """-> (this rank's part of a preset model, HF model or None, ParallelContext) for a tensor /
    pipeline-parallel run launched by mpirun / torchrun: every rank builds the whole model from one
    seed on its device, starts the ranks (``init_parallel``) and keeps its part
    (``checkpoint.shard_model``). hf_weights: the weights of HF's own initialisation (every rank
    alike), for a run that compares with HF; keep_hf: return that HF model (rank 0) too. The models
    are built before torch.distributed starts: transformers then writes the HF checkpoint of the
    conversion on every rank (it writes only on rank 0 once a process group exists)."""
    from .checkpoint import shard_model, validate_parallel
    from .parallel.launch import _resolve_device, check_launch_size, detect_launch, init_parallel

    info = detect_launch()
    check_launch_size(tp, pp, info)  # before anything is built
    dev = _resolve_device(device, info)
    dtype = _dtype_of(dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32))
    fam, src = find_preset(name, reg)
    validate_parallel(fam.make_config(src, f"preset '{name}'"), tp, pp)  # before building anything
    hf = None
    if hf_weights:
        hf, full = hf_model_from_preset(name, dtype, dev, seed, reg)
        if not keep_hf:
            hf = None
    else:
        full = model_from_preset(name, dtype, dev, seed, reg)
    ctx = init_parallel(tp, pp, dev)
    part = shard_model(full, ctx)
    del full
    return part, hf, ctx


# ---------------------------------------------------------------------------- CLI argument helpers


def parse_batch_sizes(text: str, option: str = "--batch-size") -> list[int]:
    """"1;8;64" -> [1, 8, 64] (';' or ',' separated): batch sizes, or with ``option`` "--num-beams" beam
    widths."""
    what = "beam widths" if option == "--num-beams" else "batch sizes"
    out = []
    for part in str(text).replace(",", ";").split(";"):
        part = part.strip()
        if not part:
            raise EncDecError(f"{option} = {text!r}: an empty entry (expected {what} like \"1;8;64\")")
        try:
            v = int(part)
        except ValueError:
            v = 0
        if v < 1:
            raise EncDecError(f"{option} = {text!r}: {part!r} is not a positive integer (expected e.g. \"1;8;64\")")
        out.append(v)
    if not out:
        raise EncDecError(f"{option} = {text!r}: expected {what} like \"1;8;64\"")
    return out


def parse_input_output_lens(text: str, option: str = "--input-output-len") -> list[tuple[int, int]]:
    """"128,64;512,128" -> [(128, 64), (512, 128)]."""
    out = []
    for part in str(text).split(";"):
        part = part.strip()
        if not part:
            raise EncDecError(f"{option} = {text!r}: an empty entry (expected pairs like \"128,64;512,128\")")
        bits = part.split(",")
        try:
            io = tuple(int(b) for b in bits)
        except ValueError:
            io = ()
        if len(io) != 2 or min(io) < 1:
            raise EncDecError(f"{option} = {text!r}: {part!r} is not 'INPUT,OUTPUT' with positive integers "
                              "(expected e.g. \"128,64;512,128\")")
        out.append(io)
    if not out:
        raise EncDecError(f"{option} = {text!r}: expected pairs like \"128,64;512,128\"")
    return out


# ---------------------------------------------------------------------------- measurement

COLUMNS = ("system", "model", "device", "dtype", "batch_size", "input_len", "output_len", "num_beams", "decoding",
           "encoder_ms", "ms_per_step", "graph_step_ms", "e2e_ms", "tokens_per_s", "generated_tokens", "peak_mem_mb",
           "speedup_vs_hf", "token_match_vs_ours", "note")


@dataclass
class Row:
    system: str
    model: str
    device: str
    dtype: str
    batch_size: int
    input_len: int
    output_len: int
    num_beams: int
    decoding: str = "greedy"  # greedy, beam, or sampling(temperature, top_k, top_p, seed)
    encoder_ms: float | None = None
    ms_per_step: float | None = None
    graph_step_ms: float | None = None
    e2e_ms: float | None = None
    tokens_per_s: float | None = None
    generated_tokens: int | None = None
    peak_mem_mb: float | None = None
    speedup_vs_hf: float | None = None
    token_match_vs_ours: float | None = None
    note: str = ""


class _Timer:
    """Wall time with a device sync on CUDA (the whole call, host work included)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, repeats: int = 3, warmup: int = 1):
        for _ in range(warmup):
            out = fn()
        times = []
        for _ in range(max(1, repeats)):
            if self.cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn()
            if self.cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times), out


@contextlib.contextmanager
def _peak_memory(device: torch.device, box: list):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
        box.append(torch.cuda.max_memory_allocated(device) / 2**20)


def _dtype_of(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    from .checkpoint import parse_dtype

    return parse_dtype(dtype)


def _resolve(engine_or_model, device, dtype, seed, compare_hf, reg=None):
    """-> (name, our model, HF model or None). Accepts an Engine, an EncDecModel, a preset name or an
    engine directory."""
    from .model import EncDecModel

    hf = None
    if isinstance(engine_or_model, (str, Path)) and not Path(engine_or_model).exists():
        name = str(engine_or_model)
        if compare_hf:
            hf, model = hf_model_from_preset(name, dtype, device, seed, reg)
        else:
            model = model_from_preset(name, dtype, device, seed, reg)
        return name, model, hf
    if isinstance(engine_or_model, (str, Path)):
        from .engine import Engine

        engine_or_model = Engine.load(engine_or_model, device=device, dtype=dtype)
    meta = None
    if isinstance(engine_or_model, EncDecModel):
        model = engine_or_model
        name = getattr(model.cfg, "family", "model")
    else:  # an Engine
        model = engine_or_model.model
        meta = getattr(engine_or_model, "meta", None)
        name = engine_label(Path(getattr(engine_or_model, "engine_dir", "engine")))
    if model.dtype != dtype or model.device != torch.device(device):
        model = model.to(device=device, dtype=dtype)
        model.dtype = dtype
        for stack in (model.encoder, model.decoder):
            stack.dtype = dtype
        model.init_buffers()
    if compare_hf:
        hf = hf_from_model(model, meta)
    return name, model, hf


_GENERIC_DIR = re.compile(r"(bf16|fp16|fp32|bfloat16|float16|float32|engine|int8|tp\d+(pp\d+)?|pp\d+)",
                          re.IGNORECASE)


def engine_label(path: Path) -> str:
    """The ``model`` column of an engine: its folder's name, with the parent's where the name says only
    a dtype or a mapping (the README's layout ``engines/t5-small/bf16`` gives ``t5-small/bf16``)."""
    path = Path(path)
    if _GENERIC_DIR.fullmatch(path.name) and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def hf_from_model(model, meta: dict | None = None):
    """The HF reference of a converted model: the source directory its checkpoint records (``source``
    in config.json, written by ``encdec convert``), loaded with the family's HF class; else None."""
    src = (meta or {}).get("source")
    if not src or not Path(src).is_dir() or not (Path(src) / "config.json").is_file():
        return None
    try:
        from .registry import registry

        fam = registry.find((meta or {}).get("family") or model.cfg.family)
        if fam is not None and fam.hf_loader is not None:
            hf = fam.hf_loader(Path(src))
        else:
            import transformers

            cls = getattr(transformers, (fam.hf_class if fam is not None else None) or "AutoModelForSeq2SeqLM")
            hf = cls.from_pretrained(src)
        if (meta or {}).get("adapters"):
            from .adapters import hf_with_adapters
            from .registry import registry

            hf = hf_with_adapters(hf, meta["adapters"], registry)
        return hf.to(device=model.device, dtype=model.dtype).eval()
    except Exception as exc:  # the benchmark still runs; the HF rows are skipped
        print(f"benchmark: cannot load the HF reference from {src}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _inputs(cfg, batch: int, in_len: int, device, seed: int):
    g = torch.Generator().manual_seed(seed + 1000 * batch + in_len)
    lo = 4
    hi = cfg.encoder_vocab_size
    ids = torch.randint(lo, hi, (batch, in_len), generator=g)
    ids[:, -1] = cfg.eos_token_id
    mask = torch.ones_like(ids)
    return ids.to(device), mask.to(device)


def _match(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """Fraction of equal generated tokens (start token excluded), over the common length."""
    if a is None or b is None:
        return None
    a, b = a.to("cpu"), b.to("cpu")
    if a.shape[0] != b.shape[0]:
        return None
    n = min(a.shape[1], b.shape[1])
    if n <= 1:
        return None
    return (a[:, 1:n] == b[:, 1:n]).float().mean().item()


RUNNERS = ("auto", "eager", "cuda-graph", "compiled")


class _Ours:
    """Our engine on one device: "auto" is the CUDA graph runner on CUDA and the eager runner
    elsewhere; "compiled" on a CPU is the static step compiled by inductor with frozen, autotuned
    weights (``CudaGraphRunner(..., use_graphs=False)``; a one-off compile per batch size)."""

    def __init__(self, model, max_batch: int, max_in: int, max_out: int, runner: str, options=None):
        self.model = model
        self.runner = None
        dev = model.device
        if runner not in RUNNERS:
            raise EncDecError(f"benchmark: runner {runner!r}: expected one of {', '.join(RUNNERS)}")
        if runner == "auto":  # the graph runner serves tensor parallelism, not pipelines
            runner = "cuda-graph" if dev.type == "cuda" and model.ctx.pp_size == 1 else "eager"
        if runner in ("cuda-graph", "compiled") and model.ctx.pp_size != 1:
            raise EncDecError(f"benchmark: runner '{runner}' serves pipeline size 1, this model has pp_size "
                              f"{model.ctx.pp_size}: use --runner eager")
        if runner == "compiled" and dev.type == "cuda":
            runner = "cuda-graph"
        if runner == "cuda-graph" and dev.type != "cuda":
            raise EncDecError(f"benchmark: runner 'cuda-graph' needs a CUDA device, got {dev} "
                              "(on a CPU: 'compiled' or 'eager')")
        if runner == "compiled" and dev.type != "cpu":
            raise EncDecError(f"benchmark: runner 'compiled' serves CUDA and CPU devices, got {dev}")
        self.kind = runner
        if options and runner == "eager":
            names = ", ".join(sorted(options))
            raise EncDecError(f"benchmark: runner options ({names}) apply to the cuda-graph and compiled runners, "
                              f"and this run uses the eager runner (device {dev}, pp_size {model.ctx.pp_size})")
        if runner in ("cuda-graph", "compiled"):
            from .runtime.cuda import CudaGraphRunner

            opts = dict(options or {})
            if runner == "compiled":
                opts.setdefault("use_graphs", False)
            self.runner = CudaGraphRunner(model, max_batch, max_out + 1, max_in, **opts)

    @property
    def note(self) -> str:
        """The rows' note: the runner, and under tensor parallelism the all-reduce it chose."""
        if self.runner is not None and self.model.ctx.tp_size > 1:
            return f"{self.kind}, tp_allreduce {self.runner.tp_allreduce}"
        return self.kind

    def encode(self, ids, mask):
        """What a request runs before its first step: with the graph runner's graphed prefill, that
        prefill (encoder, every layer's cross-attention K/V, from its CUDA graph; timing the eager
        encoder instead, slower at small batches, made ``ms_per_step`` too small, even 0); else the
        encoder."""
        if self.runner is not None and getattr(self.runner, "prefill_graphs", False):
            with torch.no_grad():  # not inference mode: the runner's static buffers are updated in place later
                return self.runner.prefill(ids, mask)
        with torch.inference_mode():
            if self.runner is not None:
                return self.runner.encode(ids, mask)[0]
            return self.model.encode(ids, mask)

    def generate(self, ids, mask, out_len: int, beams: int, sampling: dict | None = None):
        from .runtime.generation import GenerationConfig, generate

        cfg = self.model.cfg
        if self.runner is not None and beams == 1 and sampling is None:
            return self.runner.greedy(ids, mask, max_new_tokens=out_len, min_new_tokens=out_len)
        opts = {"do_sample": False, **_sampling_options(sampling)}
        gc = GenerationConfig.from_model(cfg, None, max_new_tokens=out_len, min_new_tokens=out_len,
                                         num_beams=beams, forced_eos_token_id=None, **opts)
        out = generate(self.model, ids, mask, gc, runner=self.runner)
        return out.sequences if hasattr(out, "sequences") else out


def _sampling_options(sampling: dict | None) -> dict:
    """GenerationConfig keywords of a benchmark's sampling options (None: greedy / beam search)."""
    if sampling is None:
        return {}
    return dict(do_sample=True, temperature=sampling.get("temperature", 1.0), top_k=sampling.get("top_k", 50),
                top_p=sampling.get("top_p", 1.0), seed=sampling.get("seed", 0))


def check_sampling(sampling: dict, source: str) -> None:
    """Refuse bad sampling values (ConfigError: "SOURCE: field 'top_p' = 2.0: expected ...") before any
    model is built; the start token is the model's and not checked here."""
    from .runtime.generation import GenerationConfig

    GenerationConfig(**_sampling_options(sampling), decoder_start_token_id=0, source=source).validate()


def decoding_label(num_beams: int, sampling: dict | None) -> str:
    """The ``decoding`` column: greedy, beam, or the sampling options."""
    if sampling is not None:
        o = _sampling_options(sampling)
        return (f"sampling(temperature={o['temperature']:g}, top_k={o['top_k']}, top_p={o['top_p']:g}, "
                f"seed={o['seed']})")
    return "beam" if num_beams > 1 else "greedy"


def _hf_generate(hf, ids, mask, out_len, beams, static: bool, sampling: dict | None = None):
    import transformers

    opts = {"do_sample": False, **_sampling_options(sampling)}
    seed = opts.pop("seed", None)
    gen = transformers.GenerationConfig(
        max_new_tokens=out_len, min_new_tokens=out_len, num_beams=beams,
        decoder_start_token_id=hf.config.decoder_start_token_id, eos_token_id=hf.config.eos_token_id,
        pad_token_id=hf.config.pad_token_id, forced_eos_token_id=None, forced_bos_token_id=None,
        early_stopping=False, length_penalty=1.0, no_repeat_ngram_size=0, **opts)
    kw = {"cache_implementation": "static"} if static else {}
    if seed is not None:  # HF draws from torch's global generators
        torch.manual_seed(seed)
    with torch.inference_mode():
        return hf.generate(input_ids=ids, attention_mask=mask, generation_config=gen, **kw)


def _hf_encode(hf, ids, mask):
    with torch.inference_mode():
        return hf.get_encoder()(input_ids=ids, attention_mask=mask)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="benchmark", unit="run", file=sys.stderr)
    except ImportError:
        return None


def environment(device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import ctranslate2

        info["ctranslate2"] = ctranslate2.__version__
    except ImportError:
        pass
    dev = torch.device(device)
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def run_benchmark(engine_or_model, batch_sizes: Sequence[int] = (1, 8),
                  input_output_lens: Sequence[tuple[int, int]] = ((128, 64),), num_beams: int = 1,
                  compare_hf: bool = False, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, csv_path: str | Path | None = None,
                  json_path: str | Path | None = None, plot_path: str | Path | None = None,
                  progress: bool = True, *, repeats: int = 3, warmup: int = 1, seed: int = 0,
                  runner: str = "auto", hf_static: bool | None = None, compare_ct2: bool | None = None,
                  hf_static_max_batch: int = 64, log=None, reg=None,
                  configs: Sequence[tuple[int, int]] | None = None,
                  runner_options: dict | None = None, hf_model=None, name: str | None = None,
                  sampling: dict | None = None) -> list[dict]:
    """Measure our engine (and, with ``compare_hf``, HF transformers side by side in the same run).

    engine_or_model: an Engine, an EncDecModel, an engine directory or a preset name ("t5-small":
        real shapes, random weights; with compare_hf the HF model gets the same weights).
    Every run generates exactly ``output_len`` tokens (EOS suppressed by min_new_tokens, for every
    system alike). Rows (one per system and configuration), as dicts with COLUMNS:
        encoder_ms   encoder forward alone (ours with the graphed prefill: that prefill, cross K/V included);
                     e2e_ms   encoder + all decode steps (median of repeats)
        ms_per_step  (e2e_ms - encoder_ms) / output_len (host loop, prefill and selection included)
        graph_step_ms  ours, greedy on CUDA: device time of one replayed decode step (CUDA events)
         tokens_per_s  batch * output_len / e2e
        peak_mem_mb  peak CUDA memory during the run (CUDA only)
        speedup_vs_hf  tokens/s over HF eager generate's;  token_match_vs_ours  equal-token rate
    configs: explicit (batch_size, num_beams) pairs instead of batch_sizes x num_beams.
    runner_options: keyword arguments of CudaGraphRunner (e.g. {"compile_mode": "max-autotune-no-cudagraphs"}).
    hf_model: with compare_hf and an EncDecModel, the HF model that holds its weights (e.g. from
        ``hf_model_from_preset`` before the model was cut to a rank's part: ``parallel_preset``).
    name: the ``model`` column (default: the preset, the engine's folder, or an EncDecModel's family).
    sampling: measure sampling instead of greedy decoding (None: greedy / beams): {"temperature", "top_k",
        "top_p", "seed"}, each optional (defaults 1.0, 50, 1.0, 0; {} samples with the defaults), the
        same options and seed for every system; num_beams must be 1. The ``decoding`` column names
        them; ``graph_step_ms`` (a greedy step) is left empty.
    Systems: "encdec" (CUDA graph runner on CUDA, eager on CPU), "hf" (generate, eager), "hf-static"
    (generate with cache_implementation="static", compiled; CUDA, batch <= hf_static_max_batch),
    "ctranslate2" (CPU, when importable and the family converts). Writes CSV / JSON / a PNG plot when
    paths are given. Returns the rows.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _dtype_of(dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32))
    say = log or (lambda *a: None)
    if isinstance(batch_sizes, int):
        batch_sizes = (batch_sizes,)
    beams_list = (num_beams,) if isinstance(num_beams, int) else tuple(num_beams)
    if configs is None:
        configs = [(int(b), int(k)) for k in beams_list for b in batch_sizes]
    configs = [(int(b), int(k)) for b, k in configs]
    for b, k in configs:
        if k < 1:
            raise EncDecError(f"benchmark: num_beams {k!r}: expected a positive integer")
    ios = [tuple(x) for x in input_output_lens]
    for b in batch_sizes:
        if int(b) < 1:
            raise EncDecError(f"benchmark: batch size {b!r}: expected a positive integer")
    for io in ios:
        if len(io) != 2 or int(io[0]) < 1 or int(io[1]) < 1:
            raise EncDecError(f"benchmark: input/output length {io!r}: expected two positive integers")
    if sampling is not None:
        unknown = sorted(set(sampling) - {"temperature", "top_k", "top_p", "seed"})
        if unknown:
            raise EncDecError(f"benchmark: sampling option(s) {', '.join(unknown)}: expected temperature, top_k, "
                              "top_p, seed")
        beams = sorted({k for _, k in configs if k != 1})
        if beams:
            raise EncDecError(f"benchmark: sampling is measured with num_beams 1, got num_beams {beams[0]} "
                              "(beam sampling is not measured)")
        check_sampling(sampling, "benchmark's sampling options")
    if int(repeats) < 1 or int(warmup) < 0:
        raise EncDecError(f"benchmark: repeats {repeats!r}, warmup {warmup!r}: expected repeats >= 1 and warmup >= 0")
    if isinstance(engine_or_model, (str, Path)) and Path(engine_or_model).exists():
        from .engine import Engine

        engine_or_model = Engine.load(engine_or_model, device=device, dtype=dtype)
    limits = getattr(engine_or_model, "limits", None)
    if limits is not None:  # an engine serves what it was built for (learned positions end at its limit)
        where = f"benchmark of engine {getattr(engine_or_model, 'engine_dir', '')}"
        for in_len, out_len in ios:
            for b, k in configs:
                limits.check(b, int(in_len), int(out_len), k, where=where)
    label, model, hf = _resolve(engine_or_model, device, dtype, seed, compare_hf and hf_model is None, reg)
    name = label if name is None else name
    if compare_hf and hf_model is not None:
        hf = hf_model
    if compare_hf and hf is None:
        say("benchmark: no HF reference for this model (HF rows skipped)")
    if hf_static is None:
        hf_static = device.type == "cuda"
    ct2 = None
    if compare_ct2 is None:
        compare_ct2 = compare_hf and device.type == "cpu"
    if compare_ct2 and hf is not None:
        ct2 = _ct2_translator(hf, name, model.cfg)
    max_b = max(b * k for b, k in configs)
    ours = _Ours(model, max_b, max(i for i, _ in ios), max(o for _, o in ios), runner, runner_options)
    timer = _Timer(device)
    dname = str(dtype).replace("torch.", "")
    rows: list[Row] = []
    systems = 1 + (2 if hf is not None else 0) + (1 if ct2 is not None else 0)
    bar = _progress(len(configs) * len(ios) * systems, progress)

    def tick(what):
        if bar is not None:
            bar.set_postfix_str(what)
            bar.update(1)

    def write_json(done: list[Row], complete: bool):
        # after each configuration (complete=False) the JSON holds the rows measured so far, so a run
        # stopped by a time limit keeps them; the final write replaces it
        if json_path:
            env = {**environment(device), "tp_size": model.ctx.tp_size, "pp_size": model.ctx.pp_size}
            _atomic_write(Path(json_path), json.dumps({"environment": env, "complete": complete,
                                                       "rows": [asdict(r) for r in done]}, indent=2) + "\n")

    def save_partial():
        if json_path:
            done = [Row(**asdict(r)) for r in rows]  # _finish fills derived columns in place
            _finish(done)
            write_json(done, complete=False)

    for in_len, out_len in ios:
        for b, num_beams in configs:
            ids, mask = _inputs(model.cfg, b, in_len, device, seed)
            base = dict(model=name, device=str(device), dtype=dname, batch_size=b, input_len=in_len,
                        output_len=out_len, num_beams=num_beams, decoding=decoding_label(num_beams, sampling))
            mem: list = []
            enc_ms, _ = timer(lambda: ours.encode(ids, mask), repeats, warmup)
            with _peak_memory(device, mem):  # a runner's first call compiles / captures: never timed (as HF static's)
                e2e, our_out = timer(lambda: ours.generate(ids, mask, out_len, num_beams, sampling), repeats,
                                     warmup + (1 if ours.runner is not None else 0))
            gstep = None
            if ours.runner is not None and num_beams == 1 and sampling is None:
                gstep = ours.runner.time_step(ids, mask, min(out_len, 32))
            ours_row = Row("encdec", **base, encoder_ms=enc_ms, e2e_ms=e2e, peak_mem_mb=mem[0] if mem else None,
                           graph_step_ms=gstep, note=ours.note)
            rows.append(ours_row)
            tick(f"encdec b{b} {in_len}/{out_len}")
            say(f"encdec b={b} in={in_len} out={out_len}: {e2e:.2f} ms")
            if hf is not None:
                for static in (False, True):
                    sysname = "hf-static" if static else "hf"
                    if static and (not hf_static or b * num_beams > hf_static_max_batch):
                        tick(f"{sysname} skipped")
                        continue
                    mem = []
                    try:
                        henc, _ = timer(lambda: _hf_encode(hf, ids, mask), repeats, warmup)
                        with _peak_memory(device, mem):
                            he2e, hout = timer(lambda: _hf_generate(hf, ids, mask, out_len, num_beams, static,
                                                                    sampling),
                                               repeats, warmup + (1 if static else 0))
                        rows.append(Row(sysname, **base, encoder_ms=henc, e2e_ms=he2e,
                                        peak_mem_mb=mem[0] if mem else None,
                                        token_match_vs_ours=_match(hout, our_out)))
                        say(f"{sysname} b={b}: {he2e:.2f} ms")
                    except Exception as exc:  # report, keep the other rows
                        rows.append(Row(sysname, **base, note=f"failed: {type(exc).__name__}: {exc}"[:300]))
                    tick(f"{sysname} b{b} {in_len}/{out_len}")
            if ct2 is not None:
                ct2_base = {**base, "dtype": "float32"}  # CTranslate2 runs its float32 model whatever --dtype says
                try:
                    cout_e2e, cout = timer(lambda: ct2(ids, mask, out_len, num_beams, sampling), repeats, warmup)
                    rows.append(Row("ctranslate2", **ct2_base, e2e_ms=cout_e2e,
                                    token_match_vs_ours=_match(cout, our_out)))
                except Exception as exc:
                    rows.append(Row("ctranslate2", **ct2_base, note=f"failed: {type(exc).__name__}: {exc}"[:300]))
                tick(f"ct2 b{b}")
            save_partial()
    if bar is not None:
        bar.close()
    _finish(rows)
    out = [asdict(r) for r in rows]
    if csv_path:
        write_csv(out, csv_path)
    write_json(rows, complete=True)
    if plot_path:
        plot(out, plot_path)
    return out


def _finish(rows: list[Row]) -> None:
    """Derived columns: ms/step, tokens/s, speedup over HF eager of the same configuration."""
    for r in rows:
        if r.e2e_ms is None:
            continue
        toks = r.batch_size * r.output_len
        r.generated_tokens = toks
        r.tokens_per_s = toks / (r.e2e_ms / 1e3)
        if r.encoder_ms is not None:
            r.ms_per_step = max(r.e2e_ms - r.encoder_ms, 0.0) / r.output_len
    key = lambda r: (r.model, r.batch_size, r.input_len, r.output_len, r.num_beams, r.decoding)  # noqa: E731
    hf = {key(r): r for r in rows if r.system == "hf" and r.tokens_per_s}
    for r in rows:
        h = hf.get(key(r))
        if h is not None and r.tokens_per_s:
            r.speedup_vs_hf = r.tokens_per_s / h.tokens_per_s


def _atomic_write(path: Path, text: str) -> None:
    from .fsutil import write_text_atomic

    write_text_atomic(Path(path), text)


def write_csv(rows: list[dict], path) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (round(r[k], 4) if isinstance(r[k], float) else r[k]))
                    for k in COLUMNS})
    _atomic_write(Path(path), buf.getvalue())


def format_table(rows: list[dict]) -> str:
    """A markdown table of the main columns."""
    cols = ("system", "model", "batch_size", "input_len", "output_len", "num_beams", "decoding", "encoder_ms",
            "ms_per_step",
            "graph_step_ms",
            "e2e_ms", "tokens_per_s", "peak_mem_mb", "speedup_vs_hf", "token_match_vs_ours")
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"

    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    return head + "".join("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |\n" for r in rows)


def check_plot_path(path) -> None:
    """--plot's file, checked before any measurement: matplotlib installed, a format it writes."""
    try:
        import matplotlib
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as exc:
        raise EncDecError(f"--plot {path}: matplotlib is not installed ({exc}); pip install matplotlib") from None
    del matplotlib
    fmt = Path(path).suffix[1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise EncDecError(f"--plot {path}: {'no file extension' if not fmt else f'format {fmt!r}'}: expected a "
                          f"file name ending in one of {', '.join('.' + f for f in sorted(formats))}")


def plot(rows: list[dict], path) -> None:
    """tokens/s against batch size, one line per system and in/out length (needs matplotlib)."""
    check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict = {}
    for r in rows:
        if r.get("tokens_per_s"):
            series.setdefault((r["system"], r["input_len"], r["output_len"]), []).append(
                (r["batch_size"], r["tokens_per_s"]))
    for (sysname, i, o), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{sysname} {i}/{o}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens / s")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, format=path.suffix[1:].lower())  # not the ".tmp" in the temporary name
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- CTranslate2 (CPU)

def _ct2_translator(hf, name: str, cfg=None):
    """A callable (ids, mask, out_len, beams) -> token ids [B, 1 + out] running CTranslate2 on the same
    weights, or None when ctranslate2 is missing or cannot convert this model."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return None
    try:
        return _Ct2(hf, cfg)
    except Exception as exc:
        print(f"benchmark: CTranslate2 cannot convert {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


class _Vocab:
    """A stand-in tokenizer for CTranslate2's converter: token i is the string 't{i}'."""

    def __init__(self, cfg):
        self.size = cfg.vocab_size
        self._tok = [f"t{i}" for i in range(self.size)]
        name = lambda i: self._tok[i] if i is not None and 0 <= i < self.size else self._tok[0]  # noqa: E731
        self.pad_token = name(cfg.pad_token_id)
        self.eos_token = name(cfg.eos_token_id)
        self.bos_token = name(cfg.bos_token_id if cfg.bos_token_id is not None else cfg.decoder_start_token_id)
        self.unk_token = name(getattr(cfg, "unk_token_id", None) or 2)

    def get_vocab(self):
        return {t: i for i, t in enumerate(self._tok)}

    def convert_ids_to_tokens(self, i):
        return self._tok[i] if isinstance(i, int) else [self._tok[j] for j in i]

    def __len__(self):
        return self.size


class _Ct2:
    """CTranslate2 (CPU, float32) on the HF model's weights, converted in memory to a temp dir."""

    def __init__(self, hf, our_cfg=None):
        import ctranslate2
        from ctranslate2.converters import transformers as ct2t

        loader = ct2t._MODEL_LOADERS.get(type(hf.config).__name__)
        if loader is None:
            raise EncDecError(f"no CTranslate2 loader for {type(hf.config).__name__}")
        cfg = hf.config
        if our_cfg is not None and not hasattr(cfg, "normalize_before"):
            cfg.normalize_before = our_cfg.decoder_pre_norm  # read by CTranslate2's loader, gone in transformers v5
        self.vocab = _Vocab(type("C", (), {
            "vocab_size": cfg.vocab_size, "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id,
            "bos_token_id": getattr(cfg, "bos_token_id", None), "decoder_start_token_id": cfg.decoder_start_token_id,
            "unk_token_id": getattr(cfg, "unk_token_id", None)})())
        self.start = cfg.decoder_start_token_id
        model = hf.float().eval()
        with torch.no_grad():
            spec = loader(model, self.vocab)
        spec.validate()
        spec.optimize(quantization=None)
        self._dir = tempfile.TemporaryDirectory(prefix="encdec-ct2-")
        spec.save(self._dir.name)
        self.translator = ctranslate2.Translator(self._dir.name, device="cpu", compute_type="float32",
                                                 intra_threads=torch.get_num_threads(), inter_threads=1)

    def __call__(self, ids, mask, out_len: int, beams: int, sampling: dict | None = None):
        src = []
        for row, m in zip(ids.tolist(), mask.tolist()):
            src.append([f"t{t}" for t, k in zip(row, m) if k])
        kw = {}
        if sampling is not None:  # CTranslate2's sampling options (its top-k 0 is the whole vocabulary, as HF's)
            import ctranslate2

            o = _sampling_options(sampling)
            ctranslate2.set_random_seed(o["seed"] % 2 ** 32)  # its seeds are unsigned 32-bit
            kw = dict(sampling_topk=o["top_k"], sampling_topp=o["top_p"], sampling_temperature=o["temperature"])
        res = self.translator.translate_batch(src, beam_size=beams, max_decoding_length=out_len,
                                              min_decoding_length=out_len, num_hypotheses=1,
                                              return_end_token=True, max_batch_size=0, **kw)
        outs = [[self.start] + [int(t[1:]) for t in r.hypotheses[0]] for r in res]
        n = max(len(o) for o in outs)
        return torch.tensor([o + [0] * (n - len(o)) for o in outs], dtype=torch.long)
