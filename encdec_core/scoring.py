"""Teacher-forced scoring: the log-likelihood of a GIVEN target for a given source (CTranslate2's
``score_batch``, fairseq's ``--score-reference``), for reranking, corpus filtering and quality
estimation. ``Engine.score`` / ``Engine.score_ids`` and ``encdec score`` call ``score_requests``.

What is scored, per request:

    decoder input   start  prefix  t1 ... tn          (start: the decoder start token; prefix: the
    predicted       prefix t1 ...  tn  EOS             forced BOS of the request, when it has one)

The scored tokens are ``t1 ... tn EOS``: the target as the tokenizer encodes a label (HF's
``text_target``), ending with EOS. The prefix (mBART-50's target language, BART's ``<s>`` where the
generation config forces it) is fed but not scored: generation forces it, so its probability there
is 1; its raw log-probability is reported apart (``prefix_logprobs``), and ``prefix + tokens`` are
exactly HF's ``labels``: ``log_softmax(model(input_ids, attention_mask, labels=prefix + tokens).logits)``
gathered at the labels gives ``prefix_logprobs + token_logprobs``. ``sum`` is the target's
log-likelihood (natural log), ``mean`` = sum / number of scored tokens (CTranslate2's score).
"""
from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, field

import torch

from . import cancel
from .errors import EncDecError, LimitError, check_utf8

# fp32 logits projected at once (bytes): a [rows, vocab] block of at most this size
_LOGITS_BUDGET = 256 << 20


@dataclass(frozen=True)
class ScoreResult:
    """The teacher-forced score of one (source, target) pair.

    tokens: the scored target ids, ending with EOS; token_logprobs: the log-probability (natural
    log, fp32 softmax over the model's vocabulary) of each; sum: their sum (the target's
    log-likelihood); mean: sum / len(tokens) (CTranslate2's score). token_strings: the tokens'
    vocabulary entries when the tokenizer can say (text scoring), else None. prefix: forced tokens
    fed after the decoder start and not scored (a forced BOS: mBART-50's target language), with
    their log-probabilities in prefix_logprobs."""
    tokens: list[int]
    token_logprobs: list[float]
    sum: float
    mean: float
    token_strings: list[str] | None = None
    prefix: list[int] = field(default_factory=list)
    prefix_logprobs: list[float] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_tokens"] = self.num_tokens
        return d


# ---------------------------------------------------------------------------- input checks
def check_texts(sources, targets) -> tuple[list[str], list[str]]:
    """score's text pairs: two lists of strings of one length (or two strings: one pair)."""
    if isinstance(sources, str) and isinstance(targets, str):
        return [sources], [targets]
    for name, v in (("sources", sources), ("targets", targets)):
        if v is None or isinstance(v, (str, bytes, bytearray)) or not hasattr(v, "__iter__"):
            raise EncDecError(f"score: {name} = {v!r}: expected a list of strings (one per pair)")
    sources, targets = list(sources), list(targets)
    _same_count(sources, targets, "sources", "targets")
    for name, rows in (("sources", sources), ("targets", targets)):
        bad = [i for i, t in enumerate(rows) if not isinstance(t, str)]
        if bad:
            raise EncDecError(f"score: {name}[{bad[0]}] = {rows[bad[0]]!r}: expected a string (for token ids "
                              f"use score_ids)")
        check_utf8(f"score: {name}", rows)
    return sources, targets


def _same_count(a: list, b: list, na: str, nb: str) -> None:
    if len(a) == 0:
        raise EncDecError(f"score: {na} = []: expected at least one pair")
    if len(a) != len(b):
        raise EncDecError(f"score: {len(a)} {na} but {len(b)} {nb}: expected one target per source")


def check_id_rows(rows, vocab: int, name: str, side: str, who: str = "score",
                  row_name=None) -> list[list[int]]:
    """A list of requests, each a list of int token ids in [0, vocab); returned as lists of int.
    Errors read "{who}: {row_name(i)}, position j: ..." (row_name default: ``{name}[i]``)."""
    if isinstance(rows, torch.Tensor):  # [requests, length]; a 1-D tensor is refused below like a flat list
        rows = rows.tolist()
    if rows is None or isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__"):
        raise EncDecError(f"{who}: {name} = {rows!r}: expected a list of requests, each a list of int token ids "
                          f"(for text use {who})")
    row_name = row_name or (lambda i: f"{name}[{i}]")
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__len__") or not hasattr(row, "__iter__"):
            raise EncDecError(f"{who}: {row_name(i)} = {row!r}: expected a list of token ids ({name} is a list of "
                              f"requests, each a list of ints)")
        ids = []
        for j, t in enumerate(row):
            try:
                if isinstance(t, bool):
                    raise TypeError
                t = operator.index(t)
            except TypeError:
                raise EncDecError(f"{who}: {row_name(i)}, position {j}: token id {t!r}: expected an int") from None
            if not 0 <= t < vocab:
                raise EncDecError(f"{who}: {row_name(i)}, position {j}: token id {t}: expected ids in [0, {vocab}) "
                                  f"(the {side} vocabulary)")
            ids.append(t)
        out.append(ids)
    return out


def check_pairs(source_ids, target_ids, cfg) -> tuple[list[list[int]], list[list[int]]]:
    src = check_id_rows(source_ids, cfg.encoder_vocab_size, "source_ids", "encoder")
    tgt = check_id_rows(target_ids, cfg.vocab_size, "target_ids", "decoder")
    _same_count(src, tgt, "source_ids", "target_ids")
    for i, s in enumerate(src):
        if not s:
            raise EncDecError(f"score: source_ids[{i}] = []: expected at least one token (an input is empty after "
                              f"tokenization?)")
    return src, tgt


def check_forced(forced, n: int, vocab: int, who: str = "score", unit: str = "pair") -> list[int | None]:
    """Per-request forced-BOS ids (target languages): None, or a list (or 1-D tensor) of n ids / None.
    Errors read "{who}: target_lang_ids ..." and count ``unit``s (pairs, inputs)."""
    if forced is None:
        return [None] * n
    if isinstance(forced, torch.Tensor):
        forced = forced.tolist()
    if isinstance(forced, (str, bytes)) or not hasattr(forced, "__len__"):
        raise EncDecError(f"{who}: target_lang_ids = {forced!r}: expected a list with one token id (or None) per "
                          f"{unit}")
    if len(forced) != n:
        raise EncDecError(f"{who}: target_lang_ids has {len(forced)} entries for {n} {unit}s: expected one per {unit}")
    out = []
    for i, t in enumerate(forced):
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab):
            raise EncDecError(f"{who}: target_lang_ids[{i}] = {t!r}: expected None or a token id in [0, {vocab})")
        out.append(t)
    return out


# ---------------------------------------------------------------------------- plan and run
def plan(target_ids: list[list[int]], forced: list[int | None], default_forced: int | None,
         eos: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """(prefix, tokens) per request: prefix = [forced BOS] when the request has one (its target
    language, else the generation config's ``forced_bos_token_id``); tokens = the target without a
    leading copy of that forced token (HF labels carry it), ending with EOS (appended when absent)."""
    if not eos:
        raise EncDecError("score: the model has no EOS token (eos_token_id in its config / generation config): "
                          "a target cannot be scored to its end")
    out = []
    for i, row in enumerate(target_ids):
        f = forced[i] if forced[i] is not None else default_forced
        prefix = [] if f is None else [int(f)]
        toks = list(row)
        if prefix and toks and toks[0] == prefix[0]:
            toks = toks[1:]
        if not toks or toks[-1] not in eos:
            toks.append(int(eos[0]))
        out.append((prefix, toks))
    return out


def check_limits(limits, source_ids, planned) -> None:
    """Each request's source and target length against the engine's build limits."""
    for i, (src, (prefix, toks)) in enumerate(zip(source_ids, planned)):
        if len(src) > limits.max_input_len:
            raise LimitError(f"score: pair {i}: source length {len(src)} tokens exceeds the engine's limit "
                             f"{limits.max_input_len} (shorten it, or rebuild with a larger --max-input-len)")
        n = len(prefix) + len(toks)
        if n > limits.max_output_len:
            what = " and the forced BOS" if prefix else ""
            raise LimitError(f"score: pair {i}: target length {n} tokens (with the EOS{what}) exceeds the engine's "
                             f"limit {limits.max_output_len} (shorten it, or rebuild with a larger --max-output-len)")


def score_requests(model, limits, source_ids, planned, start: int, token_strings=None,
                   lora_uids=None) -> list[ScoreResult]:
    """Score every request, in batches of at most the engine's max batch size (requests sorted by
    length so that a batch holds similar lengths, as generate_ids does); results in input order.
    lora_uids: each request's run-time adapter (model.lora_bank), or None."""
    n = len(source_ids)
    bmax = limits.max_batch_size
    pack = getattr(model, "pack_cpu_weights", None)
    if pack is not None:
        pack()  # fp32 on CPU: oneDNN-packed weights, as generation uses (once; a no-op elsewhere)
    order = sorted(range(n), key=lambda i: (len(source_ids[i]), len(planned[i][0]) + len(planned[i][1])))
    results: list[ScoreResult | None] = [None] * n
    for c in range(0, n, bmax):
        cancel.check()  # serve: stop between batches once the client has gone
        reqs = order[c: c + bmax]
        fulls = [planned[i][0] + planned[i][1] for i in reqs]
        if lora_uids is None:
            lps = score_batch(model, [source_ids[i] for i in reqs], fulls, start)
        else:
            with model.lora_bank.rows([lora_uids[i] for i in reqs]):
                lps = score_batch(model, [source_ids[i] for i in reqs], fulls, start)
        for i, lp in zip(reqs, lps):
            prefix, toks = planned[i]
            p = len(prefix)
            tok_lp = lp[p:]
            total = math.fsum(tok_lp)
            strings = token_strings(toks) if token_strings is not None else None
            results[i] = ScoreResult(tokens=toks, token_logprobs=tok_lp, sum=total, mean=total / len(toks),
                                     token_strings=strings, prefix=prefix, prefix_logprobs=lp[:p])
    return results


def score_batch(model, sources: list[list[int]], fulls: list[list[int]], start: int) -> list[list[float]]:
    """One batch: the log-probability of each token of ``fulls[i]`` (prefix + target + EOS) given
    ``sources[i]``. Sources and decoder inputs are right-padded; the encoder masks its padding
    (also for the cross attention), the decoder's padding follows every real token, so the causal
    mask keeps it out of them (positions count from 0 on every row). Only the real positions are
    projected to the vocabulary, a block of rows at a time; log-softmax in fp32."""
    from .runtime.encode import pad_rows

    cfg = model.cfg
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    dev = model.device
    input_ids, mask = pad_rows(sources, pad)
    dec_in, dec_mask = pad_rows([[start] + y[:-1] for y in fulls], pad)  # teacher forcing: shifted right
    labels, _ = pad_rows(fulls, 0)
    valid = dec_mask.bool()
    t_len = dec_in.shape[1]
    input_ids, mask, dec_in = input_ids.to(dev), mask.to(dev), dec_in.to(dev)
    labels, valid = labels.to(dev), valid.to(dev)
    with torch.inference_mode():
        enc = model.encode(input_ids, mask)
        state = model.init_state(enc, mask, t_len)
        h = model.decode_hidden(dec_in, state)  # [b, t, d]
        hv, lv = h[valid], labels[valid]  # the real positions, row-major: [N, d], [N]
        vocab = cfg.vocab_size
        rows = max(1, _LOGITS_BUDGET // (4 * max(vocab, 1)))
        parts = []
        for c in range(0, hv.shape[0], rows):
            logits = model.logits(hv[c: c + rows].unsqueeze(0))[0]  # fp32 [n, vocab], padded columns cut
            lp = torch.log_softmax(logits.float(), dim=-1)
            parts.append(lp.gather(-1, lv[c: c + rows, None]).squeeze(-1))
        flat = torch.cat(parts).cpu().tolist()
    out, k = [], 0
    for y in fulls:
        out.append(flat[k: k + len(y)])
        k += len(y)
    return out
