"""Engine directories: build (checkpoint + limits -> engine dir) and load (engine dir -> runnable Engine).

An engine directory holds engine.json (limits, options, the checksum of the checkpoint it came from),
the checkpoint's config.json and rank{r}.safetensors (cast to the engine dtype), and the tokenizer and
generation_config files copied at convert time. Requests beyond the limits are refused.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import torch

from . import __version__, cancel
from .checkpoint import (check_shard, check_shard_fits, checksum_dir, config_from_meta, dtype_name, file_sha256,
                         load_model, parse_dtype, read_meta)
from .config import read_json
from .family import HF_TOKENIZER_FILES
from .fsutil import as_path, atomic_dir, check_output_dir
from .errors import ConfigError, EncDecError, LimitError, check_utf8
from .parallel.context import ParallelContext

ENGINE_FILE = "engine.json"
_MODEL_FILES = ("config.json",)


@dataclass(frozen=True)
class Hypothesis:
    """One output of ``Engine.generate(..., return_scores=True)``.

    ``score``: beam search's length-normalised score (HF's ``sequences_scores``), else the sum of
    ``token_logprobs``. ``token_logprobs``: one per generated token after any decoder prefix, plus
    the EOS that ended the output when one did (``tokens`` leaves the EOS out)."""
    text: str
    tokens: list[int]
    score: float
    token_logprobs: list[float]


@dataclass(frozen=True)
class StreamEvent:
    """One step of ``Engine.generate_stream`` for one output.

    ``text``: the text added since this output's previous event (may be empty while a character is
    incomplete); ``tokens``: the token ids behind it (never the EOS). With ``finished`` the output is
    complete and ``output`` holds its whole text, exactly what ``generate`` returns; the ``text``
    pieces of an output add up to it (incremental detokenization), except where a tokenizer's
    clean-up rewrites earlier text, so a consumer that must be exact takes ``output``."""
    index: int  # the request (position in the inputs)
    sequence: int  # which of its num_return_sequences outputs
    text: str
    tokens: list[int]
    finished: bool
    output: str | None = None


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_input_len: int
    max_output_len: int
    max_beam_width: int

    def check(self, batch: int, input_len: int, output_len: int, beams: int, where: str = "engine") -> None:
        for what, val, lim, flag in (
            ("batch size", batch, self.max_batch_size, "--max-batch-size"),
            ("input length", input_len, self.max_input_len, "--max-input-len"),
            ("output length", output_len, self.max_output_len, "--max-output-len"),
            ("beam width", beams, self.max_beam_width, "--max-beam-width"),
        ):
            if val > lim:
                # the output length may be a default the user never typed (HF's 20 new tokens)
                ask = f"ask for at most {lim} new tokens, or " if what == "output length" else ""
                raise LimitError(
                    f"{where}: {what} {val} exceeds the engine's limit {lim} ({ask}rebuild with a larger {flag})")


def _check_limits(limits, where: Path) -> None:
    """engine.json's "limits": the four limits, each a positive integer."""
    names = [f.name for f in fields(Limits)]
    if not isinstance(limits, dict):
        raise ConfigError(f"{where}: field 'limits' = {limits!r}: expected an object with {', '.join(names)}")
    unknown = sorted(set(limits) - set(names))
    if unknown:
        raise ConfigError(f"{where}: field 'limits' has unknown key(s) {unknown}: expected {', '.join(names)}")
    for name in names:
        v = limits.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{where}: field 'limits.{name}' = {v!r}: expected a positive integer")


def _positive(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{name} = {v!r}: expected a positive integer")
    return v


def _default_limits(meta: dict) -> tuple[int, int]:
    """Output length and beam width an engine gets when the build does not say: 200 and 4, or the
    model's own generation defaults where larger (fairseq NMT decodes with 5 beams), so that
    ``run`` with the model's defaults is never refused by an engine built with the defaults."""
    gen = meta.get("generation_config") or {}
    beams, out = 4, 200
    try:
        beams = max(beams, int(gen.get("num_beams") or 1))
        out = max(out, int(gen.get("max_new_tokens") or 0), int(gen.get("max_length") or 0))
    except (TypeError, ValueError):
        pass  # a malformed default is reported where generation reads it
    return out, beams


def build(checkpoint_dir: Path, output_dir: Path, max_batch_size: int = 8, max_input_len: int | None = None,
          max_output_len: int | None = None, max_beam_width: int | None = None, dtype: str | None = None) -> Path:
    """Engine directory from a checkpoint. ``max_input_len`` None: 512; ``max_output_len`` /
    ``max_beam_width`` None: 200 / 4, or the model's generation defaults where larger; the default
    lengths stop at what a model with learned positions has (BART: max_position_embeddings)."""
    checkpoint_dir, output_dir = as_path(checkpoint_dir, "--checkpoint-dir"), as_path(output_dir, "--output-dir")
    meta = read_meta(checkpoint_dir)
    cfg = config_from_meta(meta, str(checkpoint_dir / "config.json"))
    d_in, (d_out, d_beams) = 512, _default_limits(meta)
    if cfg.position_type == "learned" and not cfg.position_padding_aware:
        d_in, d_out = min(d_in, cfg.max_position_embeddings), min(d_out, cfg.max_position_embeddings - 1)
    max_input_len = d_in if max_input_len is None else max_input_len
    max_output_len = d_out if max_output_len is None else max_output_len
    max_beam_width = d_beams if max_beam_width is None else max_beam_width
    limits = Limits(_positive("--max-batch-size", max_batch_size), _positive("--max-input-len", max_input_len),
                    _positive("--max-output-len", max_output_len), _positive("--max-beam-width", max_beam_width))
    if output_dir.resolve().is_relative_to(checkpoint_dir.resolve()):  # replaced, or copied into itself
        where = "is" if output_dir.resolve() == checkpoint_dir.resolve() else "lies inside"
        raise EncDecError(f"--output-dir {output_dir}: {where} the --checkpoint-dir {checkpoint_dir}; expected a "
                          f"directory outside the checkpoint (the engine would replace or copy it)")
    check_output_dir(output_dir, "--output-dir")  # before any work
    world = int(meta["mapping"]["world_size"])
    headers = []
    for r in range(world):
        if not (checkpoint_dir / f"rank{r}.safetensors").is_file():
            raise EncDecError(f"{checkpoint_dir / f'rank{r}.safetensors'}: shard for rank {r} is missing")
        # a truncated shard is refused here, not at run
        headers.append(check_shard(checkpoint_dir / f"rank{r}.safetensors"))
    got = checksum_dir(checkpoint_dir, world)
    if meta.get("checksum") and got != meta["checksum"]:
        raise EncDecError(
            f"{checkpoint_dir}: the rank*.safetensors files do not match the checksum in config.json "
            f"(a shard was changed or comes from another conversion); convert again")
    src_dtype = parse_dtype(meta["dtype"], f"{checkpoint_dir / 'config.json'} field 'dtype'")
    tgt_dtype = parse_dtype(dtype) if dtype else src_dtype
    if cfg.position_type == "learned" and not cfg.position_padding_aware:
        n = cfg.max_position_embeddings
        for flag, val, lim in (("--max-input-len", max_input_len, n), ("--max-output-len", max_output_len, n - 1)):
            if val > lim:
                raise ConfigError(
                    f"{flag} {val} exceeds the model's learned positions: expected at most {lim} "
                    f"(max_position_embeddings {n} in {checkpoint_dir / 'config.json'})")
    tp, pp = int(meta["mapping"]["tp_size"]), int(meta["mapping"]["pp_size"])
    for r in range(world):  # tensors that do not fit the config: refused here, not by every run
        check_shard_fits(checkpoint_dir, headers[r], cfg, ParallelContext(tp_size=tp, pp_size=pp, rank=r))
    with atomic_dir(output_dir, "--output-dir") as tmp:
        for item in checkpoint_dir.iterdir():
            if item.name.startswith("rank") and item.suffix == ".safetensors":
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        if tgt_dtype == src_dtype:
            for r in range(world):
                src = checkpoint_dir / f"rank{r}.safetensors"
                try:
                    os.link(src, tmp / src.name)
                except OSError:
                    shutil.copy2(src, tmp / src.name)
        else:
            from safetensors.torch import load_file, save_file

            for r in range(world):
                t = load_file(str(checkpoint_dir / f"rank{r}.safetensors"))
                t = {k: (v.to(tgt_dtype) if v.is_floating_point() else v) for k, v in t.items()}
                save_file(t, str(tmp / f"rank{r}.safetensors"))
            m2 = dict(meta)
            m2["dtype"] = dtype_name(tgt_dtype)
            m2["checksum"] = checksum_dir(tmp, world)
            m2["shard_checksums"] = {str(r): file_sha256(tmp / f"rank{r}.safetensors") for r in range(world)}
            with open(tmp / "config.json", "w") as f:
                json.dump(m2, f, indent=2)
                f.write("\n")
        info = {
            "format": "encdec-engine",
            "format_version": 1,
            "encdec_version": __version__,
            "torch_version": torch.__version__,
            "family": meta.get("family", cfg.family),
            "dtype": dtype_name(tgt_dtype),
            "mapping": meta["mapping"],
            "limits": limits.__dict__,
            "checkpoint": {"path": str(checkpoint_dir.resolve()), "checksum": got},
            # what load compares (a stat, no read): a shard changed since (a hard link shares its
            # checkpoint's file) is then checked against its checksum
            "shards": {str(r): _shard_stat(tmp / f"rank{r}.safetensors") for r in range(world)},
        }
        with open(tmp / ENGINE_FILE, "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
    return output_dir


def _shard_stat(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def check_engine_shards(engine_dir: Path, info: dict, meta: dict) -> None:
    """A shard whose size or modification time is not what build recorded (edited in place, or in the
    checkpoint it is hard-linked to; or only copied) is read and compared with its sha256 in
    config.json: a changed one is refused. An unchanged stat costs nothing more. For a single process:
    the ranks of a parallel launch hash their shards anyway, and agree on the outcome
    (``parallel.launch.verify_checkpoint``)."""
    for r, want in (info.get("shards") or {}).items():
        shard = engine_dir / f"rank{r}.safetensors"
        if not shard.is_file() or _shard_stat(shard) == want:
            continue
        digest = (meta.get("shard_checksums") or {}).get(r)
        if digest and file_sha256(shard) != digest:
            raise EncDecError(f"{shard}: changed since 'encdec build' (its sha256 no longer matches "
                              f"{engine_dir / 'config.json'}; an engine shares its shard files with the "
                              f"checkpoint it was built from): convert and build again")


class Engine:
    """A loaded engine: model for this rank, limits, tokenizer and generation defaults."""

    def __init__(self, engine_dir: Path, model, info: dict, meta: dict, ctx=None):
        self.engine_dir = Path(engine_dir)
        self.model = model
        self.info = info
        self.meta = meta
        self.ctx = ctx
        self.limits = Limits(**info["limits"])
        self._tokenizer = None

    @property
    def config(self):
        return self.model.cfg

    @property
    def family(self):
        from .registry import registry

        return registry.find(self.info.get("family") or self.config.family)

    @property
    def generation_defaults(self) -> dict:
        return dict(self.meta.get("generation_config") or {})

    @classmethod
    def load(cls, engine_dir, device: str | torch.device = "cpu", ctx=None, dtype=None) -> "Engine":
        engine_dir = as_path(engine_dir, "engine directory")
        if ctx is not None and not isinstance(ctx, ParallelContext):
            raise EncDecError(f"ctx = {ctx!r}: expected a ParallelContext (encdec_core.parallel.context) or None")
        if not engine_dir.is_dir():
            raise EncDecError(f"{engine_dir}: engine directory not found (run 'encdec build' first)")
        info = read_json(engine_dir / ENGINE_FILE, "engine")
        if info.get("format") != "encdec-engine":
            raise ConfigError(f"{engine_dir / ENGINE_FILE}: field 'format' = {info.get('format')!r}: "
                              f"expected 'encdec-engine'")
        for key in ("limits", "mapping", "dtype"):
            if key not in info:
                raise ConfigError(f"{engine_dir / ENGINE_FILE}: missing field '{key}'")
        _check_limits(info["limits"], engine_dir / ENGINE_FILE)
        meta = read_meta(engine_dir)
        dt = None if dtype is None else parse_dtype(dtype, "--dtype" if isinstance(dtype, str) else "dtype")
        device = _load_device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EncDecError("--device cuda: CUDA is not available on this machine")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise EncDecError(f"--device {device}: this machine has {n} CUDA device(s): cuda:0 .. cuda:{n - 1}")
        model = load_model(engine_dir, ctx=ctx, device=device, dtype=dt, meta=meta)  # names a missing tensor
        if ctx is None:  # then: bytes changed (ranks verify their shards before, all agreeing)
            check_engine_shards(engine_dir, info, meta)
        lora = meta.get("lora_runtime")
        if lora:  # adapters kept unmerged (convert --lora-mode runtime): chosen per request
            from .runtime.lora import LORA_DIR, LoraBank

            if not isinstance(lora, list):
                raise ConfigError(f"{engine_dir / 'config.json'}: field 'lora_runtime' = {lora!r}: expected a list")
            model.lora_bank = LoraBank(model, engine_dir / LORA_DIR, len(lora))
        return cls(engine_dir, model, info, meta, ctx)

    # ------------------------------------------------------------------ text
    def tokenizer(self, tokenizer_dir: Path | None = None):
        from .tokenizer import load_tokenizer

        if tokenizer_dir is None and self._tokenizer is not None:
            return self._tokenizer
        if tokenizer_dir is not None and not isinstance(tokenizer_dir, (str, os.PathLike)):
            raise EncDecError(f"tokenizer_dir = {tokenizer_dir!r}: expected a path (str or Path) or None")
        fam = self.family
        where = Path(tokenizer_dir or self.engine_dir)
        if (fam is None or fam.tokenizer is None) and where.is_dir() \
                and not any((where / f).is_file() for f in (*HF_TOKENIZER_FILES, "vocab.txt", "tokenizer.model")):
            what, hint = (("--tokenizer-dir", "") if tokenizer_dir is not None else
                          ("engine directory", "; give --tokenizer-dir with the model's tokenizer"))
            raise ConfigError(f"{what} {where}: no tokenizer files (expected tokenizer.json or "
                              f"tokenizer_config.json, as 'encdec convert' copies from the model folder){hint}")
        tok = load_tokenizer(fam, where, self.config)
        if tokenizer_dir is None:
            self._tokenizer = tok
        return tok

    def generation_config(self, **overrides):
        from .runtime.generation import GenerationConfig

        try:
            gc = GenerationConfig.from_model(self.config, self.generation_defaults,
                                             **{k: v for k, v in overrides.items() if v is not None})
            gc.validate(self.config.vocab_size)  # token ids in range: checked here, where the file is known
            return gc
        except ConfigError as exc:  # the defaults live in the engine's config.json, copied at convert time
            head = "generation_config.json:"
            if not str(exc).startswith(head):
                raise
            raise ConfigError(f"{self.engine_dir / 'config.json'} field 'generation_config' (the model's "
                              f"generation_config.json):{str(exc)[len(head):]}") from None

    def generate_ids(self, ids: list[list[int]], target_lang_ids=None, runner=None, lora_uids=None,
                     output_scores: bool = False, on_token=None, decoder_prefix=None, **overrides):
        """Token ids in, GenerationOutput out (rows in the order of ``ids``); limits checked first.
        ``output_scores``: also each generated token's log-probability (``GenerationOutput.token_logprobs``,
        ``.score``); the tokens are the same.
        ``on_token(request, sequence, token, finished)``: called as tokens are generated (greedy and
        sampling): each new token of output ``sequence`` of request ``request`` (an EOS that ends it
        comes with finished=True), and ``token`` None with finished=True for an output the length
        limit ends.

        More requests than the engine's max batch size run in batches of at most that many, the
        requests sorted by length first so that each batch holds similar lengths (less padding;
        CTranslate2 does the same); the outputs come back in the input order.

        lora_uids: with run-time adapters (convert --lora-mode runtime), one adapter uid per request
        (-1: the base model), or one int for all.

        decoder_prefix: target tokens each output starts with and continues (CTranslate2's
        ``target_prefix``): one list of ids for all requests or one per request (None or [] for none;
        a 1-D or 2-D tensor too), after the decoder start token. A model's forced first token (mBART-50's target language,
        BART's ``<s>``) is put in front of a prefix that does not begin with it. The output's tokens
        include the prefix; lengths count after it (max_new_tokens new tokens follow it, and prefix
        plus new tokens must fit the engine's max output length). Requests with prefixes of different
        lengths run in separate batches."""
        from .runtime.generation import merge_outputs

        if ids is None:
            raise EncDecError("no input given")
        ids = _check_ids(ids, self.config.encoder_vocab_size)  # lists of ints (from any iterable or a 2-D tensor)
        if len(ids) == 0:
            raise EncDecError("no input given")
        if not isinstance(output_scores, bool):
            raise EncDecError(f"generate: output_scores = {output_scores!r}: expected True or False")
        if on_token is not None and not callable(on_token):
            raise EncDecError(f"generate: on_token = {on_token!r}: expected a callable "
                              f"(request, sequence, token, finished)")
        if target_lang_ids is not None and (isinstance(target_lang_ids, (str, bytes))
                                            or not hasattr(target_lang_ids, "__len__")):
            raise EncDecError(f"target language ids = {target_lang_ids!r}: expected a list with one token id "
                              f"(or None) per input")
        lora_uids = self._lora_uids(lora_uids, len(ids), runner)
        gc = self.generation_config(**overrides)
        max_in = max(len(x) for x in ids)
        if min(len(x) for x in ids) == 0:
            raise EncDecError("an input is empty after tokenization")
        if target_lang_ids is not None:  # one per input, each None or a token id (before the prefixes use them)
            from .scoring import check_forced

            target_lang_ids = check_forced(target_lang_ids, len(ids), self.config.vocab_size, "generate", "input")
        out_len = _output_len(gc)
        bmax = self.limits.max_batch_size
        prefixes = self.decoder_prefixes(decoder_prefix, len(ids), target_lang_ids, gc)
        longest = max(map(len, prefixes)) if prefixes else 0
        if longest:
            out_len = gc.limits(1 + longest)[1] - 1
            if out_len > self.limits.max_output_len:
                raise LimitError(f"engine: a decoder prefix of {longest} tokens plus {out_len - longest} new tokens "
                                 f"exceeds the engine's output limit {self.limits.max_output_len} (ask for at most "
                                 f"{max(self.limits.max_output_len - longest, 0)} new tokens, or rebuild with a "
                                 f"larger --max-output-len)")
        self.limits.check(min(len(ids), bmax), max_in, out_len, max(gc.num_beams, 1))
        if gc.num_return_sequences > self.limits.max_beam_width:  # sampling (beam search has n <= num_beams)
            raise LimitError(f"engine: num_return_sequences {gc.num_return_sequences} exceeds the engine's limit "
                             f"{self.limits.max_beam_width} outputs per input (each output is a decoder row, like a "
                             f"beam; rebuild with a larger --max-beam-width)")
        if on_token is not None and gc.num_beams > 1:
            raise EncDecError(f"streaming serves greedy decoding and sampling, not num_beams = {gc.num_beams} "
                              f"(a beam's tokens are final only when the search ends)")

        def streamer(reqs):
            return None if on_token is None else _RowStreamer(on_token, reqs, gc.num_return_sequences, gc.eos_token_ids)

        cancel.check()  # serve: the client may have gone while the request waited
        if len(ids) <= bmax and (prefixes is None or len({len(p) for p in prefixes}) == 1):
            return self._generate_batch(ids, target_lang_ids, runner, gc, lora_uids, output_scores,
                                        streamer(range(len(ids))), prefixes)
        # batches of requests with prefixes of one length, sources of similar lengths
        plen = [0] * len(ids) if prefixes is None else [len(p) for p in prefixes]
        order = sorted(range(len(ids)), key=lambda i: (plen[i], len(ids[i])))
        chunks, cur = [], []
        for i in order:
            if cur and (len(cur) == bmax or plen[i] != plen[cur[0]]):
                chunks.append(cur)
                cur = []
            cur.append(i)
        chunks.append(cur)
        parts = []
        for k, reqs in enumerate(chunks):
            if k:
                cancel.check()
            langs = None if target_lang_ids is None else [target_lang_ids[i] for i in reqs]
            uids = None if lora_uids is None else [lora_uids[i] for i in reqs]
            pre = None if prefixes is None else [prefixes[i] for i in reqs]
            parts.append((reqs, self._generate_batch([ids[i] for i in reqs], langs, runner, gc, uids, output_scores,
                                                     streamer(reqs), pre)))
        return merge_outputs(parts, len(ids), self.config.pad_token_id)

    def decoder_prefixes(self, decoder_prefix, n: int, target_lang_ids, gc) -> list[list[int]] | None:
        """Each request's decoder prefix (checked; the forced first token put in front), or None."""
        if decoder_prefix is None:
            return None
        what = "decoder prefix"
        if isinstance(decoder_prefix, (str, bytes)) or not hasattr(decoder_prefix, "__len__"):
            raise EncDecError(f"{what} = {decoder_prefix!r}: expected a list of token ids, or one such list (or "
                              f"None) per input")
        items = _split_prefix(decoder_prefix, n)
        if len(items) != n:
            raise EncDecError(f"{what}: {len(items)} for {n} inputs (expected one per input, or one for all)")
        vocab = self.config.vocab_size
        out = []
        for r, p in enumerate(items):
            p = [] if p is None else p
            if isinstance(p, (str, bytes)) or not hasattr(p, "__iter__"):
                raise EncDecError(f"{what}[{r}] = {p!r}: expected a list of token ids (or None)")
            p = list(p)
            bad = [t for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                bad = bad[0]
                raise EncDecError(f"{what}[{r}] contains {bad!r}: expected token ids in [0, {vocab}) (the decoder "
                                  f"vocabulary)")
            forced = gc.forced_bos_token_id
            if target_lang_ids is not None and target_lang_ids[r] is not None:
                forced = target_lang_ids[r]
            if p and forced is not None and p[0] != forced:
                p = [int(forced)] + p
            out.append(p)
        return None if not any(out) else out

    def _lora_uids(self, lora_uids, n: int, runner=None) -> list[int] | None:
        """Checked per-request adapter uids (one int: the same for all ``n``), or None."""
        if lora_uids is None:
            return None
        if isinstance(lora_uids, (str, bytes, bool)) or not isinstance(lora_uids, int) \
                and not hasattr(lora_uids, "__iter__"):
            raise EncDecError(f"LoRA task uids = {lora_uids!r}: expected an int (one uid for all inputs) "
                              f"or a list with one int per input")
        bank = getattr(self.model, "lora_bank", None)
        if bank is None:
            raise EncDecError(f"LoRA task uids given, but engine {self.engine_dir} has no run-time adapters "
                              f"(convert with --lora-dir ... --lora-mode runtime)")
        if isinstance(lora_uids, int):
            lora_uids = [lora_uids] * n
        lora_uids = list(lora_uids)
        if len(lora_uids) != n:
            raise EncDecError(f"LoRA task uids: {len(lora_uids)} for {n} inputs (expected one per input, "
                              f"or one for all)")
        if runner is not None and getattr(runner, "_lora", None) is not bank:
            raise EncDecError("run-time LoRA: the runner was not built for this engine's adapters (build it "
                              "with CudaGraphRunner.for_engine(engine) after loading the engine)")
        return lora_uids

    def _generate_batch(self, ids, target_lang_ids, runner, gc, lora_uids=None, output_scores=False, streamer=None,
                        prefixes=None):
        """One batch of at most the engine's max batch size through ``generate`` (with ``lora_uids``:
        each request's run-time adapter active)."""
        if lora_uids is not None:
            with self.model.lora_bank.rows(lora_uids):
                return self._generate_batch(ids, target_lang_ids, runner, gc, output_scores=output_scores,
                                            streamer=streamer, prefixes=prefixes)
        from .runtime.encode import pad_rows
        from .runtime.generation import generate

        input_ids, mask = pad_rows(ids, self.config.pad_token_id)
        with torch.inference_mode():  # host tensors: generate checks them there (no device reads) and moves them
            return generate(self.model, input_ids, mask, gc,
                            forced_bos_token_ids=target_lang_ids, runner=runner, output_scores=output_scores,
                            streamer=streamer, decoder_input_ids=_prefix_tensor(prefixes, gc))

    def lang_ids(self, tok, target_lang, n: int):
        """Target language code(s) -> forced-BOS token ids: one code for all n requests, or one per
        request (None keeps the model's default); None when no language is asked for."""
        if target_lang is None:
            return None
        if not isinstance(target_lang, (str, list, tuple)):
            raise EncDecError(f"target language = {target_lang!r}: expected a language code (str) or a list "
                              f"with one code (or None) per input")
        codes = [target_lang] * n if isinstance(target_lang, str) else list(target_lang)
        bad = [c for c in codes if c is not None and not isinstance(c, str)]
        if bad:
            raise EncDecError(f"target language code(s) {bad}: expected language codes (str) or None")
        if len(codes) != n:
            raise EncDecError(f"target language: {len(codes)} codes for {n} inputs (give 1 or one per input)")
        if not hasattr(tok, "lang_id"):
            raise EncDecError(f"family '{self.config.family}' has no target-language control")
        return [None if c is None else tok.lang_id(c) for c in codes]

    # ------------------------------------------------------------------ scoring
    def score_ids(self, source_ids, target_ids, target_lang_ids=None, token_strings=None, lora_uids=None) -> list:
        """Teacher-forced scores of given targets: one ``ScoreResult`` per (source, target) pair, in
        the order given (see encdec_core/scoring.py for what is scored).

        source_ids: a list of requests, each a list of encoder token ids (as ``tokenizer().encode``
        gives them). target_ids: one list of decoder token ids per request; an EOS is appended
        unless the row ends with one, and a leading forced BOS (as HF labels carry it) is not
        scored twice. target_lang_ids: one forced-BOS id (or None: the model's default) per
        request, as ``generate_ids`` takes them. token_strings: ids -> vocabulary entries, for
        ``ScoreResult.token_strings``. Limits: sources up to --max-input-len tokens, targets (with
        EOS and forced BOS) up to --max-output-len; more pairs than --max-batch-size run in batches.
        lora_uids: with run-time adapters, the adapter of each pair (-1: the base model), or one for all."""
        from .scoring import check_forced, check_limits, check_pairs, plan, score_requests

        if token_strings is not None and not callable(token_strings):
            raise EncDecError(f"score: token_strings = {token_strings!r}: expected a callable (token ids -> "
                              f"vocabulary entries) or None")
        src, tgt = check_pairs(source_ids, target_ids, self.config)
        forced = check_forced(target_lang_ids, len(src), self.config.vocab_size)
        gc = self.generation_config()
        planned = plan(tgt, forced, gc.forced_bos_token_id, tuple(gc.eos_token_ids))
        check_limits(self.limits, src, planned)
        uids = self._lora_uids(lora_uids, len(src))
        return score_requests(self.model, self.limits, src, planned, int(gc.decoder_start_token_id),
                              token_strings, uids)

    def score(self, sources, targets, tokenizer_dir=None, target_lang=None, source_lang=None, lora_uids=None) -> list:
        """Texts in: for each (source, target) pair a ``ScoreResult`` with the log-probability of each
        target token (the target tokenized as HF tokenizes ``text_target``, ending with EOS), their
        sum (the log-likelihood) and mean (per token: CTranslate2's score).

        target_lang: one language code for all pairs, or one per pair (mBART-50: the forced BOS the
        target is scored after, as in generation); source_lang: the source language (mBART-50
        tokenizers); lora_uids: with run-time adapters, the adapter of each pair (or one for all)."""
        from .scoring import check_texts

        sources, targets = check_texts(sources, targets)
        tok = self.tokenizer(tokenizer_dir)
        src = self.encode_sources(tok, sources, source_lang, "score: source_lang")
        enc_t = getattr(tok, "encode_target", None)
        tgt = enc_t(targets) if enc_t is not None else tok.encode(targets)
        eos = set(self.generation_config().eos_token_ids)
        # the target ends at its first EOS (mBART-cc25's tokenizer puts the language code after it)
        tgt = [list(t[: next((j + 1 for j, x in enumerate(t) if x in eos), len(t))]) for t in tgt]
        for i, s in enumerate(src):
            if len(s) == 0:
                raise EncDecError(f"score: sources[{i}] = {sources[i]!r} is empty after tokenization")
        langs = self.lang_ids(tok, target_lang, len(sources))
        return self.score_ids(src, tgt, target_lang_ids=langs,
                              token_strings=getattr(tok, "target_token_strings", None), lora_uids=lora_uids)

    def prefix_ids(self, tok, target_prefix, n: int) -> list[list[int]] | None:
        """Token ids of target prefixes given as text (one for all, or one per input; None entries for
        none): the target-side tokens (``tok.encode_target``) without their closing EOS."""
        if target_prefix is None:
            return None
        if isinstance(target_prefix, str):
            target_prefix = [target_prefix] * n
        if isinstance(target_prefix, bytes) or not hasattr(target_prefix, "__iter__"):
            raise EncDecError(f"target prefix = {target_prefix!r}: expected a string, or one string (or None) "
                              f"per input")
        target_prefix = list(target_prefix)
        if len(target_prefix) != n:
            raise EncDecError(f"target prefix: {len(target_prefix)} for {n} inputs (expected one per input, or one "
                              f"for all)")
        bad = next((i for i, t in enumerate(target_prefix) if t is not None and not isinstance(t, str)), None)
        if bad is not None:
            raise EncDecError(f"target prefix[{bad}] = {target_prefix[bad]!r}: expected a string or None")
        check_utf8("target prefix", target_prefix)
        enc = getattr(tok, "encode_target", None)
        if enc is None:
            raise EncDecError(f"target prefix: the tokenizer of family '{self.config.family}' cannot encode "
                              f"target text (it has no encode_target); pass token ids to generate_ids")
        eos = set(self.generation_config().eos_token_ids)
        texts = [t for t in target_prefix if t]
        coded = iter(enc(texts) if texts else [])
        out = []
        for t in target_prefix:
            ids = list(next(coded)) if t else []
            while ids and ids[-1] in eos:
                ids.pop()
            out.append(ids)
        return out

    def encode_sources(self, tok, texts: list[str], source_lang: str | None = None,
                       what: str = "source_lang") -> list[list[int]]:
        """Source texts -> encoder token ids; ``source_lang`` (mBART-50's tokenizers): the language code
        the texts are encoded with, as HF's ``tokenizer.src_lang`` (None: the tokenizer's saved one).
        ``what`` names the option in errors."""
        if source_lang is None:
            return tok.encode(texts)
        if not isinstance(source_lang, str):
            raise EncDecError(f"{what} = {source_lang!r}: expected a language code (str) or None")
        try:
            return tok.encode(texts, src_lang=source_lang)
        except TypeError:
            raise EncDecError(f"{what}: family '{self.config.family}' has no source-language control") from None

    def truncate(self, tok, ids: list[list[int]], max_len: int | None = None,
                 src_lang: str | None = None) -> tuple[list[list[int]], list[int]]:
        """Inputs cut to ``max_len`` tokens (default: the engine's max input length), keeping the special
        tokens the tokenizer puts around every input (found by encoding an empty text: T5's closing
        ``</s>``, BART's ``<s>`` and ``</s>``, mBART-cc25's ``</s> lang``, mBART-50's ``lang`` ... ``</s>``),
        as HF's tokenizer truncation and TensorRT-LLM's ``run.py --max_input_length`` do. ``src_lang``:
        the source language the inputs were encoded with (mBART's tokenizers put its code among those
        tokens). Returns (ids, indices of the cut inputs)."""
        limit = self.limits.max_input_len if max_len is None else max_len
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise EncDecError(f"max input length {limit!r}: expected a positive integer")
        if limit > self.limits.max_input_len:
            raise LimitError(f"max input length {limit} exceeds the engine's limit {self.limits.max_input_len} "
                             f"(rebuild with a larger --max-input-len)")
        frame = list(self.encode_sources(tok, [""], src_lang)[0])
        out, cut = [], []
        for i, x in enumerate(ids):
            x = list(x)
            if len(x) <= limit:
                out.append(x)
                continue
            lead, tail = _special_frame(x, frame)  # not ending with the closing tokens: cut plainly
            if lead + tail >= limit:
                raise EncDecError(f"max input length {limit}: too short to keep the {lead + tail} special token(s) "
                                  f"around every input")
            out.append(x[: limit - tail] + (x[-tail:] if tail else []))
            cut.append(i)
        return out, cut

    def word_ids(self, tok, words) -> list[list[int]]:
        """Token sequences of words or phrases (``bad_words_ids`` from text): each tokenized as target
        text (``tok.encode_target``) without the special tokens around every target (found by
        encoding an empty target: T5's closing ``</s>``, BART's ``<s>`` and ``</s>``)."""
        if isinstance(words, str):
            words = [words]
        if isinstance(words, bytes) or not hasattr(words, "__iter__"):
            raise EncDecError(f"words = {words!r}: expected a list of strings")
        words = list(words)
        bad = next((w for w in words if not isinstance(w, str) or not w.strip()), None)
        if bad is not None or not words:
            raise EncDecError(f"{bad!r}: expected non-empty words (strings)")
        check_utf8("words", words)
        enc = getattr(tok, "encode_target", None)
        if enc is None:
            raise EncDecError(f"the tokenizer of family '{self.config.family}' cannot encode target text (it has "
                              f"no encode_target); give token ids (generation option bad_words_ids)")
        frame = list(enc([""])[0])
        out = []
        for w, ids in zip(words, enc(words)):
            ids = list(ids)
            lead, tail = _special_frame(ids, frame)
            core = ids[lead: len(ids) - tail if tail else None]
            if not core:
                raise EncDecError(f"{w!r} gives no tokens")
            out.append(core)
        return out

    def generate_stream(self, texts: list[str], tokenizer_dir=None, target_lang=None, runner=None,
                        lora_uids=None, target_prefix=None, source_lang=None, **overrides) -> Iterator[StreamEvent]:
        """Like ``generate`` (greedy decoding or sampling), yielding a ``StreamEvent`` per output as its
        tokens are generated, in the order they come (outputs of one batch interleave; inputs beyond
        the max batch size run in later batches). Generation runs in a worker thread while the caller
        consumes and detokenizes; closing the iterator early stops it at the next step."""
        texts = _check_texts(texts)
        _text_api_names("generate_stream", overrides)
        tok = self.tokenizer(tokenizer_dir)
        ids = self.encode_sources(tok, texts, source_lang, "generate_stream: source_lang")
        return self.stream_ids(ids, tok, self.lang_ids(tok, target_lang, len(texts)), runner, lora_uids,
                               decoder_prefix=self.prefix_ids(tok, target_prefix, len(texts)), **overrides)

    def stream_ids(self, ids: list[list[int]], tok, target_lang_ids=None, runner=None, lora_uids=None,
                   decoder_prefix=None, **overrides) -> Iterator[StreamEvent]:
        """``generate_stream`` for token ids, detokenized with ``tok`` (``engine.tokenizer()``); an
        output's first text includes its ``decoder_prefix`` (as ``generate_ids`` takes it)."""
        ids = _check_ids(ids, self.config.encoder_vocab_size)
        langs = target_lang_ids
        q: queue.Queue = queue.Queue()
        stop = threading.Event()
        dev = self.model.device

        def on_token(req, seq, t, finished):
            q.put((req, seq, t, finished))

        def work():
            try:
                if dev.type == "cuda":
                    torch.cuda.set_device(dev)  # a new thread starts on device 0
                # closing the iterator stops the work before its next step (or batch); under serve on
                # several ranks, at the step rank 0 stops at (cancel.set_agreement)
                with cancel.cancel_when(stop.is_set):
                    self.generate_ids(ids, target_lang_ids=langs, runner=runner, lora_uids=lora_uids,
                                      on_token=on_token, decoder_prefix=decoder_prefix, **overrides)
                q.put(None)
            except cancel.Cancelled:
                q.put(None)
            except BaseException as exc:  # handed to the consumer
                q.put(exc)

        worker = threading.Thread(target=work, name="encdec-generate", daemon=True)
        worker.start()
        detok: dict[tuple[int, int], _Detokenizer] = {}
        prefixes = _split_prefix(decoder_prefix, len(ids)) if decoder_prefix is not None else None
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                req, seq, t, finished = item
                d = detok.get((req, seq))
                if d is None:
                    d = detok[(req, seq)] = _Detokenizer(tok, (prefixes[req] or []) if prefixes else [])
                text = d.add(t) if t is not None and not finished else ""
                if finished:
                    rest, full = d.finish()
                    yield StreamEvent(req, seq, text + rest, d.take_new(), True, full)
                else:
                    yield StreamEvent(req, seq, text, d.take_new(), False)
        finally:
            stop.set()
            worker.join()

    def generate(self, texts: list[str], tokenizer_dir=None, target_lang=None, return_scores: bool = False,
                 target_prefix=None, source_lang=None, **overrides) -> list[list[str]] | list[list[Hypothesis]]:
        """Texts in, for each input a list of num_return_sequences output texts.

        target_lang: one language code for all, or a list with one per request (None = model default).
        source_lang: the language code the texts are encoded with (mBART-50's tokenizers, as HF's
        ``tokenizer.src_lang``; None: the tokenizer's saved one).
        return_scores: a ``Hypothesis`` (text, token ids, score, token log-probs) in place of each text.
        target_prefix: text each output starts with and continues (one for all, or one per input; None
        for none), tokenized as a target (``generate_ids``' ``decoder_prefix``); the outputs include it.
        """
        texts = _check_texts(texts)
        _text_api_names("generate", overrides)
        if not isinstance(return_scores, bool):
            raise EncDecError(f"generate: return_scores = {return_scores!r}: expected True or False")
        tok = self.tokenizer(tokenizer_dir)
        ids = self.encode_sources(tok, texts, source_lang, "generate: source_lang")
        out = self.generate_ids(ids, target_lang_ids=self.lang_ids(tok, target_lang, len(texts)),
                                output_scores=return_scores,
                                decoder_prefix=self.prefix_ids(tok, target_prefix, len(texts)), **overrides)
        n = out.num_return_sequences
        if not return_scores:
            return [[tok.decode(out.tokens(i * n + j)) for j in range(n)] for i in range(len(texts))]
        return [[hypothesis(out, i * n + j, tok) for j in range(n)] for i in range(len(texts))]


# options of the token-id calls that the text calls set themselves, and the text calls' names for them
_TEXT_API_NAMES = {"output_scores": "return_scores=True", "decoder_prefix": "target_prefix (text)",
                   "target_lang_ids": "target_lang (language codes)"}


def _text_api_names(call: str, overrides) -> None:
    given = sorted(k for k in overrides if k in _TEXT_API_NAMES)
    if given:
        k = given[0]
        raise EncDecError(f"{call}: {k} = {overrides[k]!r} is an option of the calls on token ids "
                          f"(generate_ids, stream_ids); with texts use {_TEXT_API_NAMES[k]}")


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if texts is None or isinstance(texts, (bytes, bytearray)) or not hasattr(texts, "__iter__"):
        raise EncDecError(f"generate: texts = {texts!r}: expected a string or a list of strings")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise EncDecError(f"generate: texts[{bad[0]}] = {texts[bad[0]]!r}: expected a string (for token ids "
                          f"use generate_ids)")
    check_utf8("generate: texts", texts)
    return texts


def _split_prefix(decoder_prefix, n: int) -> list:
    """``generate_ids``' ``decoder_prefix`` as one entry per request: a list of ids (or an empty
    list) is one prefix for all ``n``; anything else is taken as one entry per request."""
    if isinstance(decoder_prefix, torch.Tensor):  # [P] one prefix for all, or [n, P]
        decoder_prefix = decoder_prefix.tolist()
    items = [p.tolist() if isinstance(p, torch.Tensor) else p for p in decoder_prefix]
    if not items or all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return [items] * n
    return items


def _special_frame(ids: list[int], frame: list[int]) -> tuple[int, int]:
    """(lead, tail): how many of ``ids``' first tokens are the tokenizer's leading special tokens
    (``frame``: what it makes of an empty text) and how many last tokens its closing ones (0 where
    ``ids`` does not end with them)."""
    lead = 0
    while lead < len(frame) and lead < len(ids) and ids[lead] == frame[lead]:
        lead += 1
    tail = len(frame) - lead
    if tail and ids[-tail:] != frame[lead:]:
        tail = 0
    return lead, tail


def _prefix_tensor(prefixes, gc):
    """[B, 1 + P] decoder start token + the batch's prefixes (one length) on the host, or None without
    prefixes."""
    if prefixes is None or not any(prefixes):
        return None
    start = gc.decoder_start_token_id
    return torch.tensor([[start] + p for p in prefixes], dtype=torch.long)


class _Detokenizer:
    """Incremental text of one output: each call decodes only the tokens from a window's start,
    and gives out what the newest tokens added to the text of the window without them (a token that
    completes no character yet, U+FFFD at the end, waits for the next). The window moves on as
    text is given out, so the cost per token does not grow with the output."""

    def __init__(self, tok, prefix=()):
        self.tok, self.ids, self.start, self.read, self.new = tok, list(prefix), 0, 0, []
        self.sent = ""

    def add(self, t: int) -> str:
        self.ids.append(t)
        self.new.append(t)
        before = self.tok.decode(self.ids[self.start: self.read])
        now = self.tok.decode(self.ids[self.start:])
        if len(now) <= len(before) or now.endswith("\ufffd") or not now.startswith(before):
            return ""
        delta = now[len(before):]
        self.start, self.read = self.read, len(self.ids)
        self.sent += delta
        return delta

    def finish(self) -> tuple[str, str]:
        """(the text not given out yet, the whole output text)."""
        full = self.tok.decode(self.ids)
        rest = full[len(self.sent):] if full.startswith(self.sent) else ""
        self.sent += rest
        return rest, full

    def take_new(self) -> list[int]:
        new, self.new = self.new, []
        return new


class _RowStreamer:
    """generate's streamer for one batch, passing tokens on to ``on_token`` under request indices (row r
    of the batch is output r % n of request reqs[r // n])."""

    def __init__(self, on_token, reqs, n: int, eos):
        self.on_token, self.reqs, self.n, self.eos = on_token, list(reqs), n, set(eos)
        self.done = [False] * (len(self.reqs) * n)

    def put(self, tokens, live) -> None:
        cancel.check_step()  # a stream whose reader has gone stops here, before this step's tokens go out
        for r, (t, alive) in enumerate(zip(tokens, live)):
            if alive and not self.done[r]:
                end = t in self.eos
                self.done[r] = end
                self.on_token(self.reqs[r // self.n], r % self.n, t, end)

    def end(self) -> None:
        for r, d in enumerate(self.done):
            if not d:
                self.done[r] = True
                self.on_token(self.reqs[r // self.n], r % self.n, None, True)


def hypothesis(out, row: int, tok) -> Hypothesis:
    """Row ``row`` of a GenerationOutput made with output scores, as a Hypothesis."""
    ids = out.tokens(row)
    return Hypothesis(tok.decode(ids), ids, out.score(row), out.token_logprobs(row))


def _load_device(device) -> torch.device:
    """Engine.load's device: cpu, cuda or cuda:N (a str or torch.device)."""
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"  # torch's meaning of a bare index
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device) if isinstance(device, str) else None
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise EncDecError(f"device = {device!r}: expected cpu, cuda or cuda:N")
    return dev


def _check_ids(ids, vocab: int) -> list[list[int]]:
    """generate_ids' input: a list of requests, each a list of int token ids in [0, vocab); returned
    as lists of int."""
    from .scoring import check_id_rows

    return check_id_rows(ids, vocab, "ids", "encoder", who="generate", row_name=lambda i: f"input {i}")


def _output_len(gc) -> int:
    return int(gc.max_new_tokens_effective)
