"""Engine directories: build (checkpoint + limits -> engine dir) and load (engine dir -> runnable Engine).

An engine directory holds engine.json (limits, options, the checksum of the checkpoint it came from),
the checkpoint's config.json and rank{r}.safetensors (cast to the engine dtype), and the tokenizer and
generation_config files copied at convert time. Requests beyond the limits are refused.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from . import __version__
from .checkpoint import (check_shard, checksum_dir, config_from_meta, dtype_name, file_sha256, load_model,
                         parse_dtype, read_meta)
from .config import read_json
from .family import HF_TOKENIZER_FILES
from .fsutil import atomic_dir, check_output_dir
from .errors import ConfigError, EncDecError, LimitError

ENGINE_FILE = "engine.json"
_MODEL_FILES = ("config.json",)


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


def build(checkpoint_dir: Path, output_dir: Path, max_batch_size: int = 8, max_input_len: int = 512,
          max_output_len: int | None = None, max_beam_width: int | None = None, dtype: str | None = None) -> Path:
    """Engine directory from a checkpoint. ``max_output_len`` / ``max_beam_width`` None: 200 / 4, or
    the model's generation defaults where larger."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    meta = read_meta(checkpoint_dir)
    d_out, d_beams = _default_limits(meta)
    max_output_len = d_out if max_output_len is None else max_output_len
    max_beam_width = d_beams if max_beam_width is None else max_beam_width
    limits = Limits(_positive("--max-batch-size", max_batch_size), _positive("--max-input-len", max_input_len),
                    _positive("--max-output-len", max_output_len), _positive("--max-beam-width", max_beam_width))
    cfg = config_from_meta(meta, str(checkpoint_dir / "config.json"))
    check_output_dir(output_dir, "--output-dir")  # before any work
    world = int(meta["mapping"]["world_size"])
    for r in range(world):
        if not (checkpoint_dir / f"rank{r}.safetensors").is_file():
            raise EncDecError(f"{checkpoint_dir / f'rank{r}.safetensors'}: shard for rank {r} is missing")
        check_shard(checkpoint_dir / f"rank{r}.safetensors")  # a truncated shard is refused here, not at run
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
        }
        with open(tmp / ENGINE_FILE, "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
    return output_dir


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
        if not isinstance(engine_dir, (str, os.PathLike)):
            raise EncDecError(f"engine directory = {engine_dir!r}: expected a path (str or Path)")
        engine_dir = Path(engine_dir)
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
        model = load_model(engine_dir, ctx=ctx, device=device, dtype=dt, meta=meta)
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
            return GenerationConfig.from_model(self.config, self.generation_defaults,
                                               **{k: v for k, v in overrides.items() if v is not None})
        except ConfigError as exc:  # the defaults live in the engine's config.json, copied at convert time
            head = "generation_config.json:"
            if not str(exc).startswith(head):
                raise
            raise ConfigError(f"{self.engine_dir / 'config.json'} field 'generation_config' (the model's "
                              f"generation_config.json):{str(exc)[len(head):]}") from None

    def generate_ids(self, ids: list[list[int]], target_lang_ids=None, runner=None, lora_uids=None, **overrides):
        """Token ids in, GenerationOutput out (rows in the order of ``ids``); limits checked first.

        More requests than the engine's max batch size run in batches of at most that many, the
        requests sorted by length first so that each batch holds similar lengths (less padding;
        CTranslate2 does the same); the outputs come back in the input order.

        lora_uids: with run-time adapters (convert --lora-mode runtime), one adapter uid per request
        (-1: the base model), or one int for all."""
        from .runtime.generation import merge_outputs

        if isinstance(ids, (str, bytes)):
            raise EncDecError(f"generate: ids = {ids!r}: expected a list of requests, each a list of int token ids "
                              f"(for text use generate)")
        if ids is None or len(ids) == 0:
            raise EncDecError("no input given")
        _check_ids(ids, self.config.encoder_vocab_size)
        if target_lang_ids is not None and (isinstance(target_lang_ids, (str, bytes))
                                            or not hasattr(target_lang_ids, "__len__")):
            raise EncDecError(f"target language ids = {target_lang_ids!r}: expected a list with one token id "
                              f"(or None) per input")
        if lora_uids is not None:
            if isinstance(lora_uids, (str, bytes, bool)) or not isinstance(lora_uids, int) \
                    and not hasattr(lora_uids, "__iter__"):
                raise EncDecError(f"LoRA task uids = {lora_uids!r}: expected an int (one uid for all inputs) "
                                  f"or a list with one int per input")
            bank = getattr(self.model, "lora_bank", None)
            if bank is None:
                raise EncDecError(f"LoRA task uids given, but engine {self.engine_dir} has no run-time adapters "
                                  f"(convert with --lora-dir ... --lora-mode runtime)")
            if isinstance(lora_uids, int):
                lora_uids = [lora_uids] * len(ids)
            lora_uids = list(lora_uids)
            if len(lora_uids) != len(ids):
                raise EncDecError(f"LoRA task uids: {len(lora_uids)} for {len(ids)} inputs (expected one per input, "
                                  f"or one for all)")
            if runner is not None and getattr(runner, "_lora", None) is not bank:
                raise EncDecError("run-time LoRA: the runner was not built for this engine's adapters (build it "
                                  "with CudaGraphRunner.for_engine(engine) after loading the engine)")
        gc = self.generation_config(**overrides)
        max_in = max(len(x) for x in ids)
        if min(len(x) for x in ids) == 0:
            raise EncDecError("an input is empty after tokenization")
        if target_lang_ids is not None and len(target_lang_ids) != len(ids):
            raise EncDecError(f"target language ids: {len(target_lang_ids)} for {len(ids)} inputs")
        out_len = _output_len(gc)
        bmax = self.limits.max_batch_size
        self.limits.check(min(len(ids), bmax), max_in, out_len, max(gc.num_beams, 1))
        if len(ids) <= bmax:
            return self._generate_batch(ids, target_lang_ids, runner, gc, lora_uids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        parts = []
        for c in range(0, len(ids), bmax):
            reqs = order[c: c + bmax]
            langs = None if target_lang_ids is None else [target_lang_ids[i] for i in reqs]
            uids = None if lora_uids is None else [lora_uids[i] for i in reqs]
            parts.append((reqs, self._generate_batch([ids[i] for i in reqs], langs, runner, gc, uids)))
        return merge_outputs(parts, len(ids), self.config.pad_token_id)

    def _generate_batch(self, ids, target_lang_ids, runner, gc, lora_uids=None):
        """One batch of at most the engine's max batch size through ``generate`` (with ``lora_uids``:
        each request's run-time adapter active)."""
        if lora_uids is not None:
            with self.model.lora_bank.rows(lora_uids):
                return self._generate_batch(ids, target_lang_ids, runner, gc)
        from .runtime.generation import generate

        pad = self.config.pad_token_id
        dev = self.model.device
        max_in = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), max_in), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), max_in), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        with torch.inference_mode():
            return generate(self.model, input_ids.to(dev), mask.to(dev), gc,
                            forced_bos_token_ids=target_lang_ids, runner=runner)

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

    def generate(self, texts: list[str], tokenizer_dir=None, target_lang=None, **overrides) -> list[list[str]]:
        """Texts in, for each input a list of num_return_sequences output texts.

        target_lang: one language code for all, or a list with one per request (None = model default).
        """
        if isinstance(texts, str):
            texts = [texts]
        if texts is None or isinstance(texts, (bytes, bytearray)) or not hasattr(texts, "__iter__"):
            raise EncDecError(f"generate: texts = {texts!r}: expected a string or a list of strings")
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise EncDecError(f"generate: texts[{bad[0]}] = {texts[bad[0]]!r}: expected a string (for token ids "
                              f"use generate_ids)")
        tok = self.tokenizer(tokenizer_dir)
        ids = tok.encode(list(texts))
        out = self.generate_ids(ids, target_lang_ids=self.lang_ids(tok, target_lang, len(texts)), **overrides)
        n = out.num_return_sequences
        return [[tok.decode(out.tokens(i * n + j)) for j in range(n)] for i in range(len(texts))]


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


def _check_ids(ids, vocab: int) -> None:
    """generate_ids' input: a list of requests, each a list of int token ids in [0, vocab)."""
    import operator

    for i, row in enumerate(ids):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__len__") or not hasattr(row, "__iter__"):
            raise EncDecError(f"generate: input {i} = {row!r}: expected a list of token ids (ids is a list of "
                              f"requests, each a list of ints)")
        for j, t in enumerate(row):
            try:
                if isinstance(t, bool):
                    raise TypeError
                t = operator.index(t)
            except TypeError:
                raise EncDecError(f"generate: input {i}, position {j}: token id {t!r}: expected an int") from None
            if not 0 <= t < vocab:
                raise EncDecError(f"generate: input {i}, position {j}: token id {t}: expected ids in [0, {vocab}) "
                                  f"(the encoder vocabulary)")


def _output_len(gc) -> int:
    return int(gc.max_new_tokens_effective)
