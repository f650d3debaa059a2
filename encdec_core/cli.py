"""encdec command line: list-families, plugins, convert, build, run, benchmark, score, serve.

Option names follow TensorRT-LLM's enc_dec example in kebab-case; the snake_case spellings users
type from there (--max_batch_size) are accepted too.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

from .errors import EncDecError
from .fsutil import check_output_file, write_text_atomic

BUNDLED_DEFAULT = Path(__file__).resolve().parent / "assets" / "default"


def _opt(p: argparse.ArgumentParser, *names: str, **kw):
    """Add an option under its kebab-case names plus the snake_case spellings."""
    all_names = list(names)
    for n in names:
        if n.startswith("--") and "-" in n[2:]:
            snake = "--" + n[2:].replace("-", "_")
            if snake not in all_names:
                all_names.append(snake)
    return p.add_argument(*all_names, **kw)


def _tp_allreduce_opt(s) -> None:
    from .runtime.cuda.runner import TP_ALLREDUCE

    _opt(s, "--tp-allreduce", default=None, choices=TP_ALLREDUCE,
         help="tensor parallelism on GPUs, CUDA-graph runner: the step's all-reduce. auto (default, or "
              "ENCDEC_TP_ALLREDUCE): fused where the GPUs map each other's memory, else nccl; symm: "
              "symmetric memory; fused: symm plus all-reduce + residual add in one kernel")


def _bool(v: str):
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    if s == "never":
        return "never"
    raise argparse.ArgumentTypeError(f"expected true, false or never, got {v!r}")


def _float(v: str) -> float:
    """A finite number (argparse's float takes 'nan' and 'inf', which no option means)."""
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {v!r}")
    return x


def _rank0() -> bool:
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK"):
        if var in os.environ:
            return os.environ[var] == "0"
    return True


def _multi_rank() -> bool:
    """Launched as one of several ranks (mpirun / torchrun)."""
    return any(int(os.environ.get(v, "1") or 1) > 1 for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE"))


def _write_json(path, report: dict, flag: str) -> None:
    """A command's JSON report, written atomically by rank 0."""
    if _rank0():
        write_text_atomic(Path(path), json.dumps(report, indent=2, ensure_ascii=False) + "\n", flag)


def out(*a, **k):
    if _rank0():
        print(*a, **k)


# ---------------------------------------------------------------------------- commands
def cmd_list_families(args) -> int:
    from .registry import registry

    rows = []
    for e in registry.families():
        f = e.record
        rows.append({"name": f.name, "aliases": list(f.aliases), "architectures": list(f.architectures),
                     "model_types": list(f.model_types), "description": f.description,
                     "origin": {"distribution": e.origin.distribution, "version": e.origin.version,
                                "module": e.origin.module},
                     "presets": sorted(f.presets)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no families installed")
    for r in rows:
        print(f"{r['name']}  ({r['origin']['distribution']} {r['origin']['version']})")
        print(f"    {r['description']}")
        if r["aliases"]:
            print(f"    aliases: {', '.join(r['aliases'])}")
        if r["architectures"]:
            print(f"    architectures: {', '.join(r['architectures'])}")
    for fail in registry.failures:
        print(f"(plugin '{fail.entry_point}' from {fail.distribution} failed to load: {fail.error})")
    return 0


def cmd_plugins(args) -> int:
    from .registry import registry

    registry.names()
    plugins = [{"name": n, "origin": str(o)} for n, o in registry.manager.plugins()]
    fails = [{"name": f.entry_point, "distribution": f.distribution, "error": f.error} for f in registry.failures]
    adapters = [{"name": e.record.name, "origin": str(e.origin)} for e in registry.adapters()]
    if args.json:
        print(json.dumps({"plugins": plugins, "adapters": adapters, "failed": fails}, indent=2))
        return 0
    for p in plugins:
        print(f"{p['name']}: {p['origin']}")
    for a in adapters:
        print(f"adapter {a['name']}: {a['origin']}")
    for f in fails:
        print(f"FAILED {f['name']} ({f['distribution']}): {f['error']}")
    return 0


def cmd_convert(args) -> int:
    from .checkpoint import parse_dtype
    from .convert import convert

    src = Path(args.model_dir)
    if not src.exists():
        raise EncDecError(f"--model-dir {src}: no such file or directory")
    dtype = parse_dtype(args.dtype)
    outdir = convert(src, Path(args.output_dir), args.family, dtype, args.tp_size, args.pp_size,
                     progress=not args.quiet, adapters=[Path(d) for d in args.adapter_dirs],
                     adapter_mode=args.lora_mode)
    how = "merged" if args.lora_mode == "merge" else "kept for run time (uids 0..)"
    merged = f", {len(args.adapter_dirs)} adapter(s) {how}" if args.adapter_dirs else ""
    print(f"wrote {outdir} (tp={args.tp_size}, pp={args.pp_size}, {args.dtype}{merged})")
    return 0


def cmd_build(args) -> int:
    from .engine import build

    outdir = build(Path(args.checkpoint_dir), Path(args.output_dir), args.max_batch_size, args.max_input_len,
                   args.max_output_len, args.max_beam_width, args.dtype)
    print(f"wrote engine {outdir}")
    _warn_below_model_defaults(outdir)
    return 0


def _warn_below_model_defaults(engine_dir: Path) -> None:
    """A note when the limits are below the model's own generation defaults: every plain run of the
    engine would then be refused until the option is given smaller."""
    info = json.loads((engine_dir / "engine.json").read_text())
    meta = json.loads((engine_dir / "config.json").read_text())
    gen = meta.get("generation_config") or {}
    lim = info["limits"]
    notes = []
    try:
        want_out = max(int(gen.get("max_new_tokens") or 0), int(gen.get("max_length") or 0) - 1)
        want_beams = int(gen.get("num_beams") or 1)
    except (TypeError, ValueError):
        return
    if want_out > lim["max_output_len"]:
        notes.append(f"--max-output-len {lim['max_output_len']} is below the model's default output length "
                     f"{want_out}: runs must ask for at most {lim['max_output_len']} new tokens")
    if want_beams > lim["max_beam_width"]:
        notes.append(f"--max-beam-width {lim['max_beam_width']} is below the model's default num_beams "
                     f"{want_beams}: runs must set --num-beams")
    for n in notes:
        print(f"encdec build: note: {n}", file=sys.stderr)


def default_engine(quiet: bool = False) -> Path:
    """Convert and build the bundled default model into a cache dir once."""
    from .convert import convert
    from .engine import ENGINE_FILE, build

    if not (BUNDLED_DEFAULT / "config.json").is_file():
        raise EncDecError(f"no --engine-dir given and no bundled default model at {BUNDLED_DEFAULT}")
    h = hashlib.sha256()
    for f in sorted(BUNDLED_DEFAULT.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    # ENCDEC_CACHE set but empty: the default, not the current directory
    cache = Path(os.environ.get("ENCDEC_CACHE") or Path.home() / ".cache" / "encdec")
    eng = cache / f"default-{h.hexdigest()[:16]}" / "engine"
    if not (eng / ENGINE_FILE).is_file():
        if not quiet:
            print(f"encdec: preparing the bundled default model in {eng.parent} (once)", file=sys.stderr)
        try:
            ck = convert(BUNDLED_DEFAULT, eng.parent / "checkpoint")
            build(ck, eng, max_batch_size=64, max_input_len=512, max_output_len=256, max_beam_width=8)
        except (EncDecError, OSError) as exc:  # the cache folder's problem: named as the user set it
            where = "ENCDEC_CACHE" if os.environ.get("ENCDEC_CACHE") else "the cache folder"
            raise EncDecError(f"{where} {cache}: cannot hold the bundled model's engine ({_one_line(exc)}); set "
                              f"ENCDEC_CACHE to a writable folder, or give --engine-dir") from None
    return eng


def _gen_overrides(args) -> dict:
    ov = {
        "max_new_tokens": args.max_output_len,
        "min_new_tokens": args.min_new_tokens,
        "num_beams": args.num_beams,
        "length_penalty": args.length_penalty,
        "early_stopping": args.early_stopping,
        "num_return_sequences": args.num_return_sequences,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.random_seed,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "repetition_penalty": args.repetition_penalty,
        "suppress_tokens": args.suppress_tokens,
        "begin_suppress_tokens": args.begin_suppress_tokens,
    }
    if args.sampling:
        ov["do_sample"] = True
    return {k: v for k, v in ov.items() if v is not None}


# generation fields -> the run option that sets them (for error messages)
_GEN_FLAGS = {"max_new_tokens": "--max-output-len", "min_new_tokens": "--min-new-tokens", "num_beams": "--num-beams",
              "length_penalty": "--length-penalty", "early_stopping": "--early-stopping",
              "num_return_sequences": "--num-return-sequences", "temperature": "--temperature", "top_k": "--top-k",
              "top_p": "--top-p", "seed": "--random-seed", "no_repeat_ngram_size": "--no-repeat-ngram-size",
              "repetition_penalty": "--repetition-penalty", "do_sample": "--sampling",
              "suppress_tokens": "--suppress-tokens", "begin_suppress_tokens": "--begin-suppress-tokens",
              "bad_words_ids": "--bad-words"}


def _flag_error(exc: EncDecError) -> EncDecError:
    """A generation option's error, named by its command-line flag ("--num-beams 0: expected ...")
    instead of the generation field; other errors unchanged."""
    import re

    m = re.match(r"generate option: field '(\w+)' = (.*?): expected (.*)\Z", str(exc), re.S)
    if not m or m.group(1) not in _GEN_FLAGS:
        return exc
    return type(exc)(f"{_GEN_FLAGS[m.group(1)]} {m.group(2)}: expected {m.group(3)}")


def _read_inputs(args, keep_blank: bool = False) -> list[str]:
    """--input-text and --input-file (``-``: standard input) lines: every --input-text (an empty one
    too, as ``Engine.generate`` takes it), then the file's lines, blank ones skipped or with
    ``keep_blank`` kept as "" (``--output-file`` keeps the line numbers)."""
    texts = list(args.input_text or [])
    explicit = len(texts)
    if args.input_file:
        p = Path(args.input_file)
        try:
            if args.input_file == "-":
                if _multi_rank():
                    raise EncDecError("--input-file -: standard input reaches one rank only; under mpirun / torchrun "
                                      "give a file every rank can read")
                data = sys.stdin.buffer.read().decode("utf-8")
            elif not p.is_file():
                raise EncDecError(f"--input-file {p}: no such file")
            else:
                data = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EncDecError(f"--input-file {p}: not UTF-8 text ({exc.reason})") from None
        texts += [ln if ln.strip() else "" for ln in text_lines(data) if keep_blank or ln.strip()]
        if not explicit and not any(t.strip() for t in texts):
            raise EncDecError(f"--input-file {args.input_file}: no text (expected one input per line)")
    if not explicit and not any(t.strip() for t in texts):
        raise EncDecError("no input: give --input-text TEXT [TEXT ...] or --input-file FILE")
    return texts


def _distinct_files(inputs, outputs) -> None:
    """An output file that is one of the input files (it would be replaced by the results) or another
    output (one would overwrite the other) is refused before any work. ``-`` (a standard stream) and
    None are skipped."""
    def same(a: str, b: str) -> bool:
        pa, pb = Path(a), Path(b)
        try:
            return pa.exists() and pb.exists() and os.path.samefile(pa, pb) or pa.resolve() == pb.resolve()
        except OSError:
            return False

    outs = [(f, p) for f, p in outputs if p and p != "-"]
    for i, (flag, path) in enumerate(outs):
        for other_flag, other in [(f, p) for f, p in inputs if p and p != "-"] + outs[:i]:
            if same(path, other):
                raise EncDecError(f"{flag} {path}: the same file as {other_flag} {other}: expected a file of its "
                                  f"own (it would be overwritten)")


def text_lines(data: str) -> list[str]:
    """A text file's lines, split at "\n" only (a trailing "\r" is dropped): ``str.splitlines`` also
    splits at U+2028, form feeds, NEL and other separators that may sit inside a line, after which the
    output lines would no longer match the input lines. The newline ending the last line adds no line."""
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in data.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise EncDecError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto")
    return name


def _load_engine(engine_dir: Path, device: str, dtype, args=None):
    """Start the ranks the engine's mapping (or the launcher) asks for, verify its shards on every
    rank and that every rank was given the same options (``args``), then load this rank's part.
    Returns (engine, ctx); ctx is None for one plain process."""
    import torch

    from .engine import Engine
    from .parallel.launch import init_for_dir

    ctx = init_for_dir(engine_dir, device) if engine_dir.is_dir() else None
    if ctx is not None and args is not None:
        _check_same_args(ctx, args)
    if ctx is not None and device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    return Engine.load(engine_dir, device=device, ctx=ctx, dtype=dtype), ctx


def _check_same_args(ctx, args) -> None:
    """Every rank must run the command with the same options: ranks given another --dtype, length or
    decoding option meet in their collectives with tensors of other sizes (a gloo abort, or NCCL
    garbage). One small all-gather of a digest; every rank names the ranks that differ."""
    from .parallel.launch import LaunchError, groups_if_different

    groups = groups_if_different(ctx, {k: v for k, v in vars(args).items() if k != "func"})
    if groups:
        raise LaunchError(f"the ranks were given different options (ranks grouped by their options: "
                          f"{groups}): give every rank the same command line")


def _run_runner(args, device_type: str) -> str:
    """The decoder runner of ``encdec run``: eager, compiled (a CPU: the inductor-compiled static step;
    CUDA: the CUDA-graph runner) or cuda-graph (``--cuda-graph`` is ``--runner cuda-graph``)."""
    kind = args.runner
    if args.cuda_graph:
        if kind not in ("auto", "cuda-graph"):
            raise EncDecError(f"--cuda-graph and --runner {kind} disagree: give one of them")
        kind = "cuda-graph"
    if kind == "cuda-graph" and device_type != "cuda":
        raise EncDecError("--cuda-graph needs a CUDA device (--device cuda); on a CPU, --runner compiled "
                          "runs the compiled static step")
    if kind == "compiled" and device_type not in ("cpu", "cuda"):
        raise EncDecError(f"--runner compiled serves CPU and CUDA devices, got {device_type}")
    return "eager" if kind == "auto" else kind


def _static_runner(kind: str, engine, ctx, tp_allreduce: str | None = None):
    """The CUDA-graph runner (on a CPU: the static step compiled by inductor, without graphs) for the
    runner kinds that use it, sized by the engine's limits; None for the eager runner. It serves
    tensor parallelism with pp_size 1 (send / receive between stages are not traced)."""
    if kind not in ("cuda-graph", "compiled"):
        return None
    what = "--cuda-graph" if kind == "cuda-graph" else "--runner compiled"
    if ctx is not None and ctx.pp_size != 1:
        raise EncDecError(f"{what} serves tensor parallelism with pp_size 1, this engine has pp_size "
                          f"{ctx.pp_size}; pipeline-parallel engines run on the eager runner (drop {what})")
    from .runtime.cuda.runner import CudaGraphRunner

    return CudaGraphRunner.for_engine(engine, tp_allreduce=tp_allreduce)


def cmd_run(args) -> int:
    import torch

    lines = _read_inputs(args, keep_blank=bool(args.output_file))
    # every --input-text runs; a blank line of the file gives an empty output line, no model run
    explicit = len(args.input_text or [])
    kept = [i for i, t in enumerate(lines) if i < explicit or t.strip()]
    texts = [lines[i] for i in kept]
    if args.output_json:
        check_output_file(Path(args.output_json), "--output-json")  # before any work
    if args.output_file and args.output_file != "-":
        check_output_file(Path(args.output_file), "--output-file")
    _distinct_files([("--input-file", args.input_file)], [("--output-file", args.output_file),
                                                         ("--output-json", args.output_json)])
    engine_dir = Path(args.engine_dir) if args.engine_dir else default_engine()
    device = _device(args.device)
    engine, ctx = _load_engine(engine_dir, device, args.dtype, args)
    device = engine.model.device
    target = None
    if args.target_lang:
        target = args.target_lang if len(args.target_lang) > 1 else args.target_lang[0]
    if args.no_generation_config:
        engine.meta["generation_config"] = {}
    overrides = _gen_overrides(args)
    warpers = [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p))
               if v is not None]
    try:  # bad option values are reported below, named by their flags
        gc = engine.generation_config(**overrides) if warpers and _rank0() else None
    except EncDecError:
        gc = None
    if gc is not None and not gc.do_sample:
        verb = "applies" if len(warpers) == 1 else "apply"
        how = "with beam search" if gc.num_beams > 1 else "greedily"
        print(f"encdec: note: {', '.join(warpers)} {verb} to sampling only (add --sampling); this run decodes {how}",
              file=sys.stderr)
    tok = engine.tokenizer(Path(args.tokenizer_dir) if args.tokenizer_dir else None)
    if args.bad_words:
        try:
            overrides["bad_words_ids"] = engine.word_ids(tok, args.bad_words)
        except EncDecError as exc:
            raise EncDecError(f"--bad-words: {exc}") from None
    ids = engine.encode_sources(tok, texts, args.source_lang or None, "--source-lang")
    if args.truncate or args.max_input_length is not None:
        try:
            ids, cut = engine.truncate(tok, ids, args.max_input_length, src_lang=args.source_lang or None)
        except EncDecError as exc:
            raise type(exc)(str(exc).replace("max input length", "--max-input-length", 1)) from None
        if cut:
            limit = args.max_input_length or engine.limits.max_input_len
            if _rank0():
                print(f"encdec: note: {len(cut)} input(s) cut to {limit} tokens (first: input {cut[0]})",
                      file=sys.stderr)
    langs = engine.lang_ids(tok, target, len(texts))
    kind = _run_runner(args, torch.device(device).type)
    runner = _static_runner(kind, engine, ctx, tp_allreduce=args.tp_allreduce)
    if runner is None and args.tp_allreduce is not None:
        raise EncDecError(f"--tp-allreduce {args.tp_allreduce}: the all-reduce of the CUDA-graph runner; add --cuda-graph")
    uids = args.lora_task_uids
    if uids is not None and len(uids) == 1:
        uids = uids * len(ids)
    try:
        prefix = engine.prefix_ids(tok, args.target_prefix[0] if args.target_prefix and len(args.target_prefix) == 1
                                   else args.target_prefix, len(ids))
    except EncDecError as exc:
        raise EncDecError(str(exc).replace("target prefix", "--target-prefix", 1)) from None
    if args.streaming:
        return _run_streaming(args, engine, engine_dir, device, texts, ids, tok, langs, runner, uids, overrides,
                              prefix, (len(lines), kept))
    try:
        res = engine.generate_ids(ids, target_lang_ids=langs, runner=runner, lora_uids=uids,
                                  output_scores=args.output_log_probs, decoder_prefix=prefix, **overrides)
    except EncDecError as exc:
        raise _flag_error(exc) from None
    n = res.num_return_sequences
    outputs = [[tok.decode(res.tokens(i * n + j)) for j in range(n)] for i in range(len(texts))]
    report = {"engine": str(engine_dir), "device": str(device), "results": []}
    hf_rows = None
    if args.compare_hf:
        hf_rows = compare_hf(engine, args, ids, langs, overrides, res, uids, prefix)
    for i, t in enumerate(texts):
        row = {"input": t, "input_ids": ids[i], "output": outputs[i]}
        if args.output_log_probs:
            rows = range(i * n, i * n + n)
            row["output_ids"] = [res.tokens(r) for r in rows]
            row["scores"] = [res.score(r) for r in rows]
            row["token_logprobs"] = [res.token_logprobs(r) for r in rows]
        if hf_rows is not None:
            row.update(hf_rows[i])
        report["results"].append(row)
    if args.output_json:
        _write_json(args.output_json, report, "--output-json")
    if args.output_file:
        _write_output_file(args.output_file, outputs, (len(lines), kept))
        if hf_rows is None:
            return 0
    for i, row in enumerate(report["results"]):
        if args.output_file:  # the outputs went to the file: only --compare-hf's verdict here
            out(f"input {i}: token ids match HF fp32: {'yes' if row['match'] else 'NO'}",
                file=sys.stderr if args.output_file == "-" else sys.stdout)
            continue
        out(f"Input : {row['input']}")
        for j, o in enumerate(row["output"]):
            tag = f"Output[{j}]" if n > 1 else "Output"
            out(f"{tag}: {o}")
            if args.output_log_probs:
                lps = row["token_logprobs"][j]
                what = "length-normalised beam score" if res.sequences_scores is not None else "sum of log-probs"
                out(f"{' ' * len(tag)}  score {row['scores'][j]:.4f} ({what}; {len(lps)} tokens"
                    f"{', EOS included' if len(lps) > len(row['output_ids'][j]) else ''})")
                out(f"{' ' * len(tag)}  token log-probs: {' '.join(f'{v:.4f}' for v in lps)}")
        if hf_rows is not None:
            for j, o in enumerate(row["hf_output"]):
                tag = f"HF    [{j}]" if n > 1 else "HF    "
                out(f"{tag}: {o}")
            out(f"token ids match HF fp32: {'yes' if row['match'] else 'NO'}")
        out("")
    if hf_rows is not None and not all(r["match"] for r in hf_rows):
        return 3
    return 0


def _run_streaming(args, engine, engine_dir, device, texts, ids, tok, langs, runner, uids, overrides,
                   prefix=None, line_map=None) -> int:
    """``run --streaming``: one output is printed as it is generated; with several, each is printed
    (with its input) as soon as it is complete, in the order they finish."""
    for flag, on in (("--compare-hf", args.compare_hf), ("--output-log-probs", args.output_log_probs)):
        if on:
            raise EncDecError(f"--streaming and {flag} do not go together: drop one of them")
    rank0 = _rank0()
    outputs: dict[int, dict[int, str]] = {}
    try:
        gc = engine.generation_config(**overrides)
        if gc.num_beams > 1:
            where = "--num-beams" if overrides.get("num_beams") else "the model's generation defaults"
            raise EncDecError(f"--streaming serves greedy decoding and sampling, and this run has {gc.num_beams} "
                              f"beams ({where}): add --num-beams 1, or drop --streaming")
        n = gc.num_return_sequences
        one = len(ids) == 1 and n == 1 and not args.output_file
        started = False
        for ev in engine.stream_ids(ids, tok, langs, runner=runner, lora_uids=uids, decoder_prefix=prefix,
                                    **overrides):
            if ev.finished:
                outputs.setdefault(ev.index, {})[ev.sequence] = ev.output
            if not rank0:
                continue
            if one:
                if not started:  # the header once generation runs (a refused request prints only the error)
                    out(f"Input : {texts[0]}")
                    sys.stdout.write("Output: ")
                    started = True
                sys.stdout.write(ev.text + ("\n\n" if ev.finished else ""))
                sys.stdout.flush()
            elif ev.finished and not args.output_file:
                out(f"Input : {texts[ev.index]}")
                out(f"{f'Output[{ev.sequence}]' if n > 1 else 'Output'}: {ev.output}")
                out("")
    except EncDecError as exc:
        raise _flag_error(exc) from None
    done = [[outputs[i][j] for j in sorted(outputs[i])] for i in range(len(texts))]
    if args.output_json:
        _write_json(args.output_json, {"engine": str(engine_dir), "device": str(device), "results": [
            {"input": t, "input_ids": ids[i], "output": done[i]} for i, t in enumerate(texts)]}, "--output-json")
    if args.output_file:
        _write_output_file(args.output_file, done, line_map)
    return 0


def _write_output_file(path, outputs: list[list[str]], line_map=None) -> None:
    """``run --output-file``: each input line's outputs, one per line, in input order (a line break
    inside an output becomes a space, so line i * n + j is output j of input line i; a blank input line
    gives n empty lines); written atomically by rank 0, or to standard output for ``-``."""
    if not _rank0():
        return
    n = len(outputs[0]) if outputs else 1
    if line_map is not None:
        total, kept = line_map
        full: list[list[str]] = [[""] * n for _ in range(total)]
        for i, outs in zip(kept, outputs):
            full[i] = outs
        outputs = full
    lines = [" ".join(o.splitlines()) for outs in outputs for o in outs]
    text = "".join(line + "\n" for line in lines)
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        print(f"encdec: wrote {len(lines)} output line(s) for {len(outputs)} input line(s)", file=sys.stderr)
        return
    write_text_atomic(Path(path), text, "--output-file")
    out(f"wrote {len(lines)} output line(s) for {len(outputs)} input line(s) to {path}")


def compare_hf(engine, args, ids, langs, overrides, res, lora_uids=None, prefix=None) -> list[dict]:
    """HF transformers in fp32 on the same inputs and settings; per input: outputs and whether ids match."""
    import torch

    from .adapters import hf_with_adapters
    from .registry import registry

    fam = engine.family
    src = Path(args.hf_model_dir) if args.hf_model_dir else Path(engine.meta.get("source", ""))
    flag = "--hf-model-dir" if args.hf_model_dir else "--compare-hf"
    if not src.exists():
        raise EncDecError(f"--compare-hf: HF model dir {src} not found (give --hf-model-dir)")
    if fam is not None:  # the reference must be the engine's model: at least its family
        try:
            other = registry.detect(src)
        except EncDecError as exc:
            raise EncDecError(f"{flag} {src}: not a model this installation reads ({exc})") from None
        if other.name != fam.name:
            raise EncDecError(f"{flag} {src}: a '{other.name}' model, but the engine {engine.engine_dir} is "
                              f"'{fam.name}': expected the model the engine was converted from")
    try:
        if fam is not None and fam.hf_loader is not None:
            hf = fam.hf_loader(src)
        else:
            import transformers

            cls = getattr(transformers, (fam.hf_class if fam and fam.hf_class else "AutoModelForSeq2SeqLM"))
            hf = cls.from_pretrained(str(src), dtype=torch.float32, local_files_only=True)
    except EncDecError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises for a folder it cannot load
        raise EncDecError(f"{flag} {src}: transformers cannot load it ({type(exc).__name__}: "
                          f"{_one_line(exc)[:300]})") from None

    if engine.meta.get("adapters") and not args.hf_model_dir:
        hf = hf_with_adapters(hf, engine.meta["adapters"], registry)  # the same adapters, merged by HF's side
    hf.eval()
    variants = {-1: hf}  # run-time adapters: per uid, the HF model with that adapter merged (peft)
    if lora_uids is not None:
        import copy

        for u in sorted(set(lora_uids) - {-1}):
            variants[u] = hf_with_adapters(copy.deepcopy(hf), [engine.meta["lora_runtime"][u]], registry).eval()
    gc = engine.generation_config(**overrides)
    hgc = hf_generation_config(gc)
    prefixes = engine.decoder_prefixes(prefix, len(ids), langs, gc)  # as ours ran: a forced first token in front
    rows = []
    tok = engine.tokenizer(Path(args.tokenizer_dir) if args.tokenizer_dir else None)
    n = res.num_return_sequences
    for i, x in enumerate(ids):
        inp = torch.tensor([x])
        kw = {}
        if langs is not None and langs[i] is not None:
            kw["forced_bos_token_id"] = langs[i]
        if prefixes is not None and prefixes[i]:
            kw["decoder_input_ids"] = torch.tensor([[gc.decoder_start_token_id] + prefixes[i]])
        if gc.seed is not None:
            torch.manual_seed(gc.seed)
        with torch.no_grad():
            ref = hf if lora_uids is None else variants[lora_uids[i]]
            seq = ref.generate(input_ids=inp, attention_mask=torch.ones_like(inp), generation_config=hgc, **kw)
        hf_tokens = []
        for j in range(seq.shape[0]):
            hf_tokens.append(_strip(seq[j].tolist(), gc, len(prefixes[i]) if prefixes is not None else 0))
        ours = [res.tokens(i * n + j) for j in range(n)]
        rows.append({"hf_output": [tok.decode(t) for t in hf_tokens], "match": ours == hf_tokens,
                     "ids": ours, "hf_ids": hf_tokens})
    return rows


def hf_generation_config(gc):
    """The same settings as a transformers.GenerationConfig (every option explicit, so HF fills nothing in)."""
    import transformers

    kw = {name: getattr(gc, name) for name in gc.field_names() if name != "seed"}
    kw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items() if v is not None}
    if gc.max_new_tokens is None and gc.max_length is None:
        kw["max_new_tokens"] = gc.max_new_tokens_effective
    return transformers.GenerationConfig(**kw)


def _strip(seq: list[int], gc, prefix_len: int = 0) -> list[int]:
    """HF output row -> ids as ``GenerationOutput.tokens`` gives ours: without the start token, cut at
    the first EOS after the decoder prefix (only padding follows it). A row without an EOS keeps all its
    tokens: a pad the model generated is an output token, not padding."""
    seq = seq[1:]
    eos = set(gc.eos_token_id if isinstance(gc.eos_token_id, (list, tuple)) else [gc.eos_token_id])
    for j in range(prefix_len, len(seq)):
        if seq[j] in eos:
            return seq[:j]
    return seq


def cmd_benchmark(args) -> int:
    from .benchmark import format_table, parse_batch_sizes, parse_input_output_lens, run_benchmark

    batches = parse_batch_sizes(args.batch_size)
    lens = parse_input_output_lens(args.input_output_len)
    beams = parse_batch_sizes(args.num_beams, "--num-beams")
    device = _device(args.device)
    runner = args.runner
    if args.repeats < 1:
        raise EncDecError(f"--repeats {args.repeats}: expected a positive integer (timed runs per configuration)")
    if args.warmup < 0:
        raise EncDecError(f"--warmup {args.warmup}: expected a non-negative integer (untimed runs first)")
    outputs = [(flag, path) for flag, path in (("--csv", args.csv), ("--json", args.json), ("--plot", args.plot))
               if path]
    for flag, path in outputs:
        check_output_file(Path(path), flag)  # before the measurements, not after
    for i, (flag, path) in enumerate(outputs):
        for other, path2 in outputs[i + 1:]:
            if Path(path).resolve() == Path(path2).resolve():
                raise EncDecError(f"{flag} and {other} name the same file {path}: expected a file each (the "
                                  "last written would replace the other)")
    for flag, n in (("--tp-size", args.tp_size), ("--pp-size", args.pp_size)):
        if n < 1:
            raise EncDecError(f"{flag} {n}: expected a positive integer")
    if args.plot:
        from .benchmark import check_plot_path

        check_plot_path(args.plot)
    if bool(args.engine_dir) == bool(args.preset):
        raise EncDecError("give exactly one of --engine-dir E or --preset NAME (e.g. t5-small, bart-large)")
    sampling = _benchmark_sampling(args)  # before an engine or model is loaded
    hf_model = None
    if args.engine_dir:
        if args.tp_size != 1 or args.pp_size != 1:
            raise EncDecError("--tp-size / --pp-size apply to --preset: an engine's mapping comes from its "
                              "config.json (convert with --tp-size / --pp-size)")
        target, _ = _load_engine(Path(args.engine_dir), device, args.dtype, args)
        device = target.model.device
        # --runner auto: the CUDA-graph runner on CUDA, tensor parallelism included; eager for pipelines
    elif args.tp_size * args.pp_size > 1:
        from .benchmark import parallel_preset

        target, hf_model, _ = parallel_preset(args.preset, args.tp_size, args.pp_size, device, args.dtype,
                                              hf_weights=args.compare_hf, keep_hf=args.compare_hf and _rank0())
        device = target.device
    else:
        target = args.preset
    rank0 = _rank0()
    rows = run_benchmark(
        target, batch_sizes=batches, input_output_lens=lens, num_beams=beams,
        compare_hf=args.compare_hf and rank0, device=device, dtype=args.dtype,
        csv_path=args.csv if rank0 else None, json_path=args.json if rank0 else None,
        plot_path=args.plot if rank0 else None, progress=rank0 and not args.quiet,
        repeats=args.repeats, warmup=args.warmup, runner=runner, hf_model=hf_model,
        runner_options={"tp_allreduce": args.tp_allreduce} if args.tp_allreduce else None,
        log=(lambda *a: print(*a, file=sys.stderr)) if rank0 and not args.quiet else None,
        name=args.preset or None, sampling=sampling)
    out(format_table(rows))
    return 0


def _benchmark_sampling(args) -> dict | None:
    """``encdec benchmark``'s sampling options (None without --sampling; {} samples with the defaults);
    a warper without --sampling is refused (it would measure greedy decoding)."""
    given = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p),
                               ("seed", args.random_seed)) if v is not None}
    if not args.sampling:
        if given:
            flags = ", ".join(_GEN_FLAGS[k] for k in given)
            raise EncDecError(f"{flags}: sampling options; add --sampling to measure sampling (without it the "
                              "benchmark decodes greedily or with beams)")
        return None
    from .benchmark import check_sampling

    try:  # a bad value named by its flag, as run names it
        check_sampling(given, "generate option")
    except EncDecError as exc:
        raise _flag_error(exc) from None
    return given


# ---------------------------------------------------------------------------- score
def _read_side(texts, file, side: str) -> tuple[list[str], str]:
    """One side of ``encdec score``'s pairs: (texts, the flag they came from). A file keeps every
    line (a blank line is an empty text: skipping it would pair the lines after it wrongly)."""
    flag_t, flag_f = f"--{side}-text", f"--{side}-file"
    if texts and file:
        raise EncDecError(f"give {flag_t} or {flag_f}, not both")
    if file:
        p = Path(file)
        if not p.is_file():
            raise EncDecError(f"{flag_f} {p}: no such file")
        try:
            lines = text_lines(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise EncDecError(f"{flag_f} {p}: not UTF-8 text ({exc.reason})") from None
        if not lines:
            raise EncDecError(f"{flag_f} {p}: empty file (expected one {side} per line)")
        return lines, f"{flag_f} {p}"
    if not texts:
        raise EncDecError(f"no {side}s: give {flag_t} TEXT [TEXT ...] or {flag_f} FILE")
    return list(texts), flag_t


def cmd_serve(args) -> int:
    """An HTTP/JSON server for one engine (encdec_core/serve.py): dynamic batching, streaming, scoring.
    A tensor- / pipeline-parallel engine is served under mpirun / torchrun: rank 0 serves HTTP and every
    rank runs each batch (encdec_core/parallel/serving.py)."""
    import torch

    from .serve import Server

    if not 0 <= args.port < 65536:
        raise EncDecError(f"--port {args.port}: expected 0..65535 (0: any free port)")
    if not (args.max_batch_delay_ms >= 0 and args.max_batch_delay_ms <= 60_000):
        raise EncDecError(f"--max-batch-delay-ms {args.max_batch_delay_ms}: expected 0..60000")
    from .serve import check_request_timeout

    check_request_timeout(args.request_timeout)
    if args.max_request_inputs < 1:
        raise EncDecError(f"--max-request-inputs {args.max_request_inputs}: expected a positive integer")
    from .benchmark import parse_batch_sizes

    warm = [None if v is None else parse_batch_sizes(v, flag) for v, flag in
            ((args.warmup_batch_sizes, "--warmup-batch-sizes"), (args.warmup_input_lens, "--warmup-input-lens"))]
    engine_dir = Path(args.engine_dir) if args.engine_dir else default_engine()
    engine, ctx = _load_engine(engine_dir, _device(args.device), args.dtype, args)
    kind = _run_runner(args, torch.device(engine.model.device).type)
    runner = _static_runner(kind, engine, ctx)
    lead = ctx is None or ctx.rank == 0
    say = (lambda msg: print(f"encdec serve: {msg}", file=sys.stderr, flush=True)) if lead else (lambda msg: None)
    # CUDA graphs: every bucket by default (seconds each, at start instead of at first requests); the
    # CPU's compiled step compiles for 15-60 s per bucket (2 cores), so only the lists given. Every rank
    # warms up alike: the graphs' captures run the model's collectives.
    if runner is not None and not args.no_warmup and (runner.use_graphs or warm != [None, None]):
        from .serve import warm_up

        secs = warm_up(runner, engine.limits, *warm, log=say, engine=engine)
        say(f"graphs captured in {secs:.1f} s (--no-warmup skips this)")
    channel = None
    if ctx is not None:
        from .parallel import serving

        channel = serving.Channel()
        if not lead:
            # rank 0 ends this rank when its server stops: a Ctrl-C or SIGTERM that reaches every rank
            # stops rank 0's server, which then tells the others (the launcher kills what rank 0 leaves)
            with _on_signal(signal.SIGINT, signal.SIG_IGN), _on_signal(signal.SIGTERM, signal.SIG_IGN):
                serving.follow(engine, runner, channel,
                               lambda m: print(f"encdec serve: {m}", file=sys.stderr, flush=True))
            return 0
        serving.lead(channel, say)
        engine = serving.Leader(engine, channel)
    log = say if args.log_requests else None
    try:
        server = Server(engine, args.host, args.port, runner=runner, max_delay=args.max_batch_delay_ms / 1000.0,
                        log=log, request_timeout=args.request_timeout, max_request_inputs=args.max_request_inputs)
    except BaseException:
        if channel is not None:
            engine.stop_followers()
        raise
    host, port = server.address
    ranks = "" if ctx is None else (f", tp_size {ctx.tp_size} x pp_size {ctx.pp_size}: every rank runs each batch; "
                                    f"rank 0 is pid {os.getpid()}")
    print(f"encdec serve: {engine_dir} ({engine.config.family}, {engine.model.device}, runner {kind}{ranks}) on "
          f"http://{host}:{port} (POST /v1/generate, /v1/score; GET /health, /v1/model); Ctrl-C stops",
          file=sys.stderr, flush=True)
    # a service manager's (or mpirun's) SIGTERM stops the server as Ctrl-C does: answers end, ranks stop
    with _on_signal(signal.SIGTERM, _raise_interrupt):
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            if channel is not None:
                if server.scheduler.running():
                    raise EncDecError("serve: the scheduler still runs a batch 60 s after the stop; the other "
                                      "ranks are left to the launcher")
                engine.stop_followers()
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _on_signal(signum, handler):
    """``handler`` for ``signum`` within the block (the main thread only: elsewhere Python refuses)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, old)


def cmd_score(args) -> int:
    """Teacher-forced scores of given (source, target) pairs (encdec_core/scoring.py)."""
    sources, s_from = _read_side(args.source_text, args.source_file, "source")
    targets, t_from = _read_side(args.target_text, args.target_file, "target")
    if len(sources) != len(targets):
        raise EncDecError(f"{s_from} gives {len(sources)} source(s) but {t_from} gives {len(targets)} target(s): "
                          f"expected one target per source")
    if args.output_json:
        check_output_file(Path(args.output_json), "--output-json")  # before any work
    _distinct_files([("--source-file", args.source_file), ("--target-file", args.target_file)],
                    [("--output-json", args.output_json)])
    engine_dir = Path(args.engine_dir) if args.engine_dir else default_engine()
    device = _device(args.device)
    engine, _ = _load_engine(engine_dir, device, args.dtype, args)  # mpirun / torchrun: every rank scores
    target = None
    if args.target_lang:
        target = args.target_lang if len(args.target_lang) > 1 else args.target_lang[0]
    results = engine.score(sources, targets, tokenizer_dir=Path(args.tokenizer_dir) if args.tokenizer_dir else None,
                           target_lang=target, source_lang=args.source_lang,
                           lora_uids=args.lora_task_uids[0] if args.lora_task_uids and len(args.lora_task_uids) == 1
                           else args.lora_task_uids)
    rows = []
    for i, (src, tgt, r) in enumerate(zip(sources, targets, results)):
        rows.append({"index": i, "source": src, "target": tgt, "score": r.mean, "sum": r.sum,
                     "num_tokens": r.num_tokens, "target_ids": r.tokens, "tokens": r.token_strings,
                     "token_logprobs": r.token_logprobs, "prefix": r.prefix, "prefix_logprobs": r.prefix_logprobs})
    report = {"engine": str(engine_dir), "device": str(engine.model.device),
              "score": "mean log-probability (natural log) per scored target token, EOS included; sum: the "
                       "target's log-likelihood; prefix: forced tokens fed before the target, not scored",
              "results": rows}
    if args.output_json:
        _write_json(args.output_json, report, "--output-json")
    for row in rows:
        out(f"[{row['index']}] score {row['score']:.6f}  sum {row['sum']:.6f}  tokens {row['num_tokens']}")
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encdec", description=__doc__.splitlines()[0])
    from . import __version__

    p.add_argument("--version", action="version", version=f"encdec {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("list-families", help="families installed, with aliases, architectures and origin")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list_families)

    s = sub.add_parser("plugins", help="loaded plugins and failures")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plugins)

    s = sub.add_parser("convert", help="HF dir / fairseq checkpoint -> encdec checkpoint (config.json + rank*.safetensors)")
    _opt(s, "--model-dir", required=True, help="HF model directory or fairseq checkpoint folder/file")
    _opt(s, "--output-dir", required=True)
    _opt(s, "--family", default=None, help="family name or alias (default: detected)")
    _opt(s, "--dtype", default="float32", help="float32 | float16 | bfloat16")
    _opt(s, "--tp-size", type=int, default=1)
    _opt(s, "--pp-size", type=int, default=1)
    _opt(s, "--lora-dir", "--hf-lora-dir", "--adapter-dir", dest="adapter_dirs", action="append", default=[],
         metavar="DIR", help="an adapter to merge into the weights (a peft LoRA directory: adapter_config.json + "
                             "adapter_model.safetensors); repeat to merge several, in order")
    _opt(s, "--lora-mode", choices=("merge", "runtime"), default="merge",
         help="merge: add the adapters to the weights (default); runtime: keep them apart, one chosen per "
              "request by `run --lora-task-uids` (uid = position of its --lora-dir; any --tp-size / --pp-size)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("build", help="checkpoint -> engine directory with limits")
    _opt(s, "--checkpoint-dir", required=True)
    _opt(s, "--output-dir", required=True)
    _opt(s, "--max-batch-size", type=int, default=8)
    _opt(s, "--max-input-len", "--max-encoder-input-len", type=int, default=None,
         help="default: 512, or the model's learned positions where fewer (BART's max_position_embeddings)")
    _opt(s, "--max-output-len", "--max-seq-len", type=int, default=None,
         help="default: 200, or the model's generation default (max_new_tokens / max_length) where larger; at "
              "most the model's learned positions")
    _opt(s, "--max-beam-width", type=int, default=None,
         help="default: 4, or the model's generation default (num_beams) where larger")
    _opt(s, "--dtype", default=None, help="cast the engine to float32 | float16 | bfloat16")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("run", help="text in, text out")
    _opt(s, "--engine-dir", default=None, help="engine directory (default: the bundled model)")
    _opt(s, "--tokenizer-dir", default=None, help="tokenizer folder (default: the engine dir)")
    _opt(s, "--input-text", nargs="+", default=None)
    _opt(s, "--input-file", default=None, help="one input per line")
    _opt(s, "--max-output-len", "--max-new-tokens", "--max-new-token", type=int, default=None)
    _opt(s, "--min-new-tokens", type=int, default=None)
    _opt(s, "--num-beams", type=int, default=None)
    _opt(s, "--length-penalty", type=_float, default=None)
    _opt(s, "--early-stopping", type=_bool, default=None)
    _opt(s, "--num-return-sequences", type=int, default=None)
    _opt(s, "--sampling", "--do-sample", action="store_true")
    _opt(s, "--temperature", type=_float, default=None)
    _opt(s, "--top-k", type=int, default=None)
    _opt(s, "--top-p", type=_float, default=None)
    _opt(s, "--random-seed", "--seed", type=int, default=None)
    _opt(s, "--no-repeat-ngram-size", type=int, default=None)
    _opt(s, "--repetition-penalty", type=_float, default=None)
    _opt(s, "--max-input-length", type=int, default=None, metavar="N",
         help="cut each input to N tokens (keeping its closing special tokens), as TensorRT-LLM's run.py does; "
              "N at most the engine's --max-input-len")
    _opt(s, "--truncate", action="store_true",
         help="cut inputs longer than the engine's --max-input-len instead of refusing them")
    _opt(s, "--suppress-tokens", type=int, nargs="+", default=None, metavar="ID",
         help="token ids never generated (HF suppress_tokens)")
    _opt(s, "--begin-suppress-tokens", type=int, nargs="+", default=None, metavar="ID",
         help="token ids not generated as the first token (HF begin_suppress_tokens)")
    _opt(s, "--bad-words", nargs="+", default=None, metavar="TEXT",
         help="words or phrases never generated: each is tokenized as target text (without special tokens) and "
              "its token sequence is never completed (HF bad_words_ids)")
    _opt(s, "--target-lang", nargs="+", default=None, help="target language code(s): one, or one per input")
    _opt(s, "--source-lang", default=None, help="source language code (mBART-50 tokenizers)")
    _opt(s, "--no-generation-config", action="store_true",
         help="ignore the model's generation_config.json defaults")
    _opt(s, "--lora-task-uids", type=int, nargs="+", default=None, metavar="UID",
         help="run-time LoRA (convert --lora-mode runtime): the adapter uid of each input, or one for all; "
              "-1 = the base model")
    _opt(s, "--compare-hf", "--compare-hf-fp32", action="store_true",
         help="also run HF transformers in fp32 and report whether token ids match")
    _opt(s, "--hf-model-dir", "--model-name", default=None, help="HF model dir for --compare-hf")
    _opt(s, "--device", default="auto", help="cpu | cuda | auto")
    _opt(s, "--cuda-graph", action="store_true",
         help="decode with the compiled CUDA-graph runner (pays a one-off compile; for long runs and serving)")
    _opt(s, "--runner", default="auto", choices=("auto", "eager", "cuda-graph", "compiled"),
         help="auto: eager (cuda-graph with --cuda-graph); compiled: on a CPU the decoder step compiled by "
              "inductor with frozen, autotuned weights (a one-off compile per batch size; for many inputs), "
              "on CUDA the CUDA-graph runner")
    _opt(s, "--dtype", default=None, help="override the engine dtype at load")
    _tp_allreduce_opt(s)
    _opt(s, "--output-log-probs", "--return-scores", "--output-scores", action="store_true",
         help="also each output's score and the log-probability of each generated token (printed, and in "
              "--output-json as scores / token_logprobs / output_ids); beam search: HF's length-normalised "
              "sequence score, else the sum of the token log-probs")
    _opt(s, "--target-prefix", nargs="+", default=None, metavar="TEXT",
         help="text each output starts with and continues (CTranslate2's target_prefix): one for all inputs, "
              "or one per input; the outputs include it")
    _opt(s, "--streaming", action="store_true",
         help="print the output as it is generated (one input; with several, each output as soon as it is "
              "complete); greedy decoding and sampling")
    _opt(s, "--output-json", default=None)
    _opt(s, "--output-file", default=None, metavar="FILE",
         help="write the outputs as text, one per line in input order (num_return_sequences lines per input), "
              "instead of printing them (CTranslate2's translate_file)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("benchmark", help="latency / throughput, optionally against HF generate")
    _opt(s, "--engine-dir", default=None, help="engine to measure")
    _opt(s, "--preset", default=None, help="or a family preset with random weights (t5-small, bart-large, ...)")
    _opt(s, "--batch-size", default="1;8", help='";"-separated batch sizes, e.g. "1;8;64;256"')
    _opt(s, "--input-output-len", default="128,64", help='";"-separated in,out pairs, e.g. "128,64;512,128"')
    _opt(s, "--num-beams", default="1", help='beam widths, ";"-separated')
    _opt(s, "--compare-hf", action="store_true",
         help="HF generate (eager, and the compiled static-cache path on CUDA) side by side in the same run")
    _opt(s, "--device", default="auto")
    _opt(s, "--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    _opt(s, "--runner", default="auto", choices=("auto", "eager", "cuda-graph", "compiled"),
         help="auto: cuda-graph on CUDA, eager on CPU; compiled: on a CPU, the decoder step compiled "
              "by inductor with frozen, autotuned weights (a one-off compile per batch size)")
    _opt(s, "--tp-size", type=int, default=1,
         help="with --preset: tensor-parallel size (launch tp x pp ranks with mpirun / torchrun)")
    _opt(s, "--pp-size", type=int, default=1, help="with --preset: pipeline-parallel size")
    _tp_allreduce_opt(s)
    _opt(s, "--repeats", type=int, default=3)
    _opt(s, "--warmup", type=int, default=1)
    _opt(s, "--csv", default=None)
    _opt(s, "--json", default=None)
    _opt(s, "--plot", default=None, help="PNG plot (needs matplotlib)")
    _opt(s, "--sampling", "--do-sample", action="store_true",
         help="measure sampling (num_beams 1) with the options below, the same for every system")
    _opt(s, "--temperature", type=_float, default=None, help="with --sampling (default 1.0)")
    _opt(s, "--top-k", type=int, default=None, help="with --sampling (default 50; 0: the whole vocabulary)")
    _opt(s, "--top-p", type=_float, default=None, help="with --sampling (default 1.0: off)")
    _opt(s, "--random-seed", "--seed", type=int, default=None, help="with --sampling (default 0)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_benchmark)

    s = sub.add_parser("serve", help="HTTP/JSON server: dynamic batching, streaming, scoring")
    _opt(s, "--engine-dir", default=None, help="engine directory (default: the bundled model)")
    _opt(s, "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    _opt(s, "--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    _opt(s, "--max-batch-delay-ms", type=_float, default=5.0,
         help="how long the scheduler waits for more requests with the same options to batch with the first")
    from .serve import MAX_REQUEST_INPUTS, REQUEST_TIMEOUT  # standard library only: cheap to import here

    _opt(s, "--max-request-inputs", type=int, default=MAX_REQUEST_INPUTS, metavar="N",
         help="inputs (or score pairs) one request may carry; more get a 400 (default %(default)d); a request "
              "whose client leaves stops before its next batch, and the requests behind it wait until then")

    _opt(s, "--request-timeout", type=_float, default=REQUEST_TIMEOUT, metavar="SECONDS",
         help="how long a connection may send no byte of its request (or take none of its reply), and how long "
              "its request line and headers may take in all: then a JSON 408 and the connection closes; idle "
              "keep-alive connections close after it too (default %(default)g)")
    _opt(s, "--device", default="auto", help="cpu | cuda | cuda:N | auto")
    _opt(s, "--dtype", default=None, help="override the engine dtype at load")
    _opt(s, "--cuda-graph", action="store_true", help="decode with the CUDA-graph runner (one-off compile)")
    _opt(s, "--runner", default="auto", choices=("auto", "eager", "cuda-graph", "compiled"),
         help="as for run: auto is eager (cuda-graph with --cuda-graph); compiled on a CPU: the inductor-compiled step")
    _opt(s, "--warmup-batch-sizes", default=None,
         help='with a compiled / CUDA-graph runner: batch sizes whose graphs are captured before serving, '
              '";"-separated (default: every batch bucket up to the engine\'s max batch size)')
    _opt(s, "--warmup-input-lens", default=None,
         help='input lengths to capture for, ";"-separated (default: 16, 32, ... up to the max input length)')
    _opt(s, "--no-warmup", action="store_true",
         help="serve at once; each new (batch, input length) bucket then compiles and captures at its first request")
    _opt(s, "--log-requests", action="store_true", help="log each HTTP request to stderr")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("score", help="log-likelihood of given targets for given sources (teacher forcing)")
    _opt(s, "--engine-dir", default=None, help="engine directory (default: the bundled model)")
    _opt(s, "--tokenizer-dir", default=None, help="tokenizer folder (default: the engine dir)")
    _opt(s, "--source-text", nargs="+", default=None, metavar="TEXT", help="source texts")
    _opt(s, "--target-text", nargs="+", default=None, metavar="TEXT", help="target texts, one per source")
    _opt(s, "--source-file", default=None, metavar="FILE", help="one source per line")
    _opt(s, "--target-file", default=None, metavar="FILE", help="one target per line, as many lines as sources")
    _opt(s, "--target-lang", nargs="+", default=None, metavar="CODE",
         help="target language code(s) (mBART-50): one, or one per pair; the forced BOS the target is scored after")
    _opt(s, "--source-lang", default=None, metavar="CODE", help="source language code (mBART-50 tokenizers)")
    _opt(s, "--lora-task-uids", type=int, nargs="+", default=None, metavar="UID",
         help="run-time LoRA (convert --lora-mode runtime): the adapter uid of each pair, or one for all; "
              "-1 = the base model")
    _opt(s, "--device", default="auto", help="cpu | cuda | cuda:N | auto")
    _opt(s, "--dtype", default=None, help="override the engine dtype at load (the log-softmax is fp32 anyway)")
    _opt(s, "--output-json", default=None, metavar="FILE",
         help="write every pair's score, sum, token ids, token strings and per-token log-probs as JSON")
    s.set_defaults(func=cmd_score)

    try:
        from .registry import registry

        registry.manager.load_entry_points()
        registry.manager.pm.hook.encdec_register_commands(subparsers=sub)
    except Exception as exc:  # a plugin's command must not break the CLI
        print(f"encdec: warning: a plugin failed to add commands: {exc}", file=sys.stderr)
    return p


def _one_line(exc: BaseException) -> str:
    """An error message on one line (a library's message may span several)."""
    return " ".join(str(exc).split())


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _check_utf8_args(args)
        # SIGTERM (a scheduler's time limit, `kill`) unwinds like Ctrl-C: the temporary output
        # directories and files are removed on the way out instead of being left half-written
        with _sigterm_unwinds():
            return int(args.func(args) or 0)
    except _Terminated:
        return 143
    except EncDecError as exc:
        if os.environ.get("ENCDEC_DEBUG"):  # where it was raised, for a bug report
            import traceback

            traceback.print_exc(file=sys.stderr)
        print(f"encdec: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`| head`): quiet, as other tools are
        try:  # stdout to /dev/null, so that the interpreter's flush at exit does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE
    except (OSError, MemoryError) as exc:
        if os.environ.get("ENCDEC_DEBUG"):
            raise
        print(f"encdec: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: say so in one line; ENCDEC_DEBUG=1 shows the traceback
        if os.environ.get("ENCDEC_DEBUG"):
            raise
        print(f"encdec: internal error: {type(exc).__name__}: {_one_line(exc)} (set ENCDEC_DEBUG=1 for the "
              f"traceback)", file=sys.stderr)
        return 1
    finally:
        _shutdown_parallel()


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM (a BaseException, like KeyboardInterrupt: ``except
    Exception`` blocks let it through to the clean-up of the atomic outputs)."""


@contextlib.contextmanager
def _sigterm_unwinds():
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except (ValueError, OSError):  # no signals here (an embedding interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_utf8_args(args) -> None:
    """Command-line text that is not UTF-8 (Python keeps such bytes as lone surrogates) is refused here,
    naming the option, instead of failing inside the tokenizer."""
    from .errors import first_non_utf8

    for name, value in vars(args).items():
        items = value if isinstance(value, (list, tuple)) else [value]
        found = first_non_utf8(items)
        if found is not None:
            i, pos, c = found
            which = f" (value {i + 1})" if len(items) > 1 else ""
            byte = f"byte 0x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"U+{ord(c):04X}"
            raise EncDecError(f"--{name.replace('_', '-')}{which}: not UTF-8 text ({byte} at character {pos}); "
                              f"expected UTF-8 (for other encodings convert the text first, e.g. with iconv)")


def _shutdown_parallel() -> None:
    """Tear down the process group a multi-rank run started (mpirun / torchrun), so its worker
    threads do not abort the process at interpreter exit (seen with gloo on CPU, about 1 run in 10)."""
    launch = sys.modules.get("encdec_core.parallel.launch")
    if launch is not None:
        try:
            launch.shutdown()
        except Exception:  # noqa: BLE001 - exiting anyway; the result is already printed
            pass


if __name__ == "__main__":
    sys.exit(main())
