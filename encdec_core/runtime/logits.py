"""Logits processors for generation, as plain tensor functions.

Every processor takes the sequences so far ``seqs`` [N, cur] (decoder start token included) and
the scores of the next position ``scores`` [N, V] (fp32) and returns new scores. Whether a
processor applies at a step depends only on host integers (the current length, the limits), so
building the pipeline costs no device synchronisation.

The order of the pipeline and each rule follow HF transformers' ``generate`` (v5), so that the
same settings pick the same tokens: repetition penalty, no-repeat n-gram, bad words, minimum
length, forced BOS, forced EOS, suppressed tokens, tokens suppressed at the beginning, then
(sampling only) temperature, top-k, top-p.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

NEG_INF = -math.inf

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------- single rules
def repetition_penalty(seqs: torch.Tensor, scores: torch.Tensor, penalty: float) -> torch.Tensor:
    """Every token already in ``seqs``: negative scores times ``penalty``, positive ones divided."""
    vocab = scores.shape[-1]
    ids = seqs.clamp(max=vocab)  # ids beyond the vocabulary land in a spare column
    padded = torch.nn.functional.pad(scores, (0, 1))
    seen = padded.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[..., :vocab]


def no_repeat_ngram(seqs: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Ban every token that would repeat an n-gram already present in the row."""
    cur = seqs.shape[-1]
    if cur < n:
        return scores
    vocab = scores.shape[-1]
    prefix = seqs[:, cur + 1 - n:]  # the last n-1 tokens
    windows = seqs.unfold(1, n, 1)  # [N, cur-n+1, n]: every n-gram so far
    hit = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
    target = torch.where(hit, windows[..., -1].clamp(max=vocab), vocab)
    banned = torch.zeros((scores.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
    banned.scatter_(1, target, True)
    return scores.masked_fill(banned[:, :vocab], NEG_INF)


def bad_words(seqs: torch.Tensor, scores: torch.Tensor, prefixes: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Ban ``last[j]`` wherever a row ends with ``prefixes[j]`` (one group of multi-token bad words with
    prefixes of one length: [W, n], [W]): the word would be completed."""
    n = prefixes.shape[1]
    if n > seqs.shape[1]:
        return scores
    vocab = scores.shape[-1]
    hit = (seqs[:, None, -n:] == prefixes).all(dim=-1)  # [N, W]
    target = torch.where(hit, last.unsqueeze(0), vocab)  # not hit: a spare column
    banned = torch.zeros((scores.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
    banned.scatter_(1, target, True)
    return scores.masked_fill(banned[:, :vocab], NEG_INF)


def ban_tokens(scores: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """``token_mask`` [V] bool: those tokens get -inf (EOS before the minimum length)."""
    return torch.where(token_mask, NEG_INF, scores)


def force_tokens(scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Every row: -inf everywhere except ``token_ids`` (1-D, same for every row), which get 0."""
    out = torch.full_like(scores, NEG_INF)
    out.index_fill_(1, token_ids, 0.0)
    return out


def force_tokens_per_row(scores: torch.Tensor, row_token: torch.Tensor) -> torch.Tensor:
    """``row_token`` [N] long: rows with a value >= 0 are forced to that token, rows with -1 kept."""
    forced = torch.full_like(scores, NEG_INF)
    forced.scatter_(1, row_token.clamp(min=0).unsqueeze(1), 0.0)
    return torch.where((row_token >= 0).unsqueeze(1), forced, scores)


def temperature(scores: torch.Tensor, t: float) -> torch.Tensor:
    return scores / t


def top_k(scores: torch.Tensor, k: int, min_keep: int = 1) -> torch.Tensor:
    """Keep the k best scores of each row (ties with the k-th kept too)."""
    k = min(max(k, min_keep), scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p(scores: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Nucleus: keep the smallest set of best tokens whose probability reaches p."""
    ascending, order = torch.sort(scores, descending=False)
    cum = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - p)
    drop[..., -min_keep:] = False
    drop = drop.scatter(1, order, drop)
    return scores.masked_fill(drop, NEG_INF)


# The top-p sort from top_k_top_p's candidates: CUDA sorts rows longer than this with a stable segmented
# radix sort (ties in index order, the order rebuilt here); shorter rows may order ties otherwise.
STABLE_SORT_MIN_VOCAB = 4097


# top_k_top_p's candidates: the best max(2k, this) scores. Ties at the k-th score beyond them send the
# request back to the token loop, and bf16 logits tie often enough that 2k alone would for small k. 128
# is the longest row torch's CUDA sort handles with one warp's merge sort (longer ones take a block radix
# sort: with 178 candidates, top_k_top_p ran ~40 us slower on one row than with 100, H200, 2026-12-02).
MIN_CANDIDATES = 128


def top_k_top_p(scores: torch.Tensor, k: int, p: float, min_keep: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_p(top_k(scores, k), p)`` without sorting the whole vocabulary: one ``torch.topk`` of the
    max(2k, 128) best gives the k-th score (top-k's threshold) and the candidates, which hold
    every score top-k keeps unless its ties at the threshold reach past them. The candidates, ordered as a stable
    ascending sort orders them (by index, then stably by value), fill the end of a row of -inf: that
    row is the one ``torch.sort`` returns, so the softmax and cumsum over it, and the tokens dropped,
    are bit for bit top_p's, where the whole row's sort is stable (CUDA, vocabularies of at least
    ``STABLE_SORT_MIN_VOCAB``). Returns (scores, overflow [N] bool): a row with overflow may differ
    from top_p's (top-k kept its last candidate, or it holds a nan); the caller redoes such a request."""
    n, v = scores.shape
    k = min(max(k, min_keep), v)
    m = min(v, max(2 * k, MIN_CANDIDATES))
    vals, idx = torch.topk(scores, m)
    kth = vals[:, k - 1:k]
    kept = scores.masked_fill(scores < kth, NEG_INF)  # top_k's result
    cand = torch.where(vals >= kth, vals, NEG_INF)
    # top-k may keep a score the candidates lack where the last candidate is kept too (unless every score
    # is a candidate); a nan (topk's largest) is no candidate: the token loop's multinomial refuses it
    overflow = torch.isnan(vals[:, 0])
    if m < v:
        overflow = overflow | torch.isfinite(cand[:, -1])
    by_index, perm = torch.sort(idx, dim=-1)
    ascending, perm2 = torch.sort(cand.gather(1, perm), dim=-1, stable=True)
    row = torch.full_like(scores, NEG_INF)
    row[:, v - m:] = ascending
    drop = row.softmax(dim=-1).cumsum(dim=-1) <= (1 - p)
    drop[..., -min_keep:] = False
    mask = torch.zeros_like(drop).scatter_(1, by_index.gather(1, perm2), drop[:, v - m:])
    return kept.masked_fill(mask, NEG_INF), overflow


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.multinomial(probs, 1).squeeze(1)`` without its checks of ``probs`` (three reductions):
    torch draws one sample as the argmax of ``probs / q`` with ``q`` exponential(1) from the
    generator, which is what this does, so the tokens and the generator's state after are the
    same. Invalid probabilities (nan, negative, an all-zero row) are not refused here."""
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(dim=-1)


# ---------------------------------------------------------------------------- the pipeline
class LogitsPipeline:
    """The processors a GenerationConfig asks for, in HF's order.

    ``forced_bos`` may be a per-row LongTensor [N] (-1 = not forced) so one batch can force a
    different first token per request (mBART target languages).
    """

    def __init__(self, *, vocab_size: int, eos_token_ids: Sequence[int], min_length: int, max_length: int,
                 repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                 forced_bos: torch.Tensor | int | None = None, forced_eos: Sequence[int] | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_tokens_to_keep: int = 1, bad_words: Sequence[Sequence[int]] | None = None,
                 suppress: Sequence[int] | None = None, begin_suppress: Sequence[int] | None = None,
                 begin_index: int | Sequence[int] = 1, device=None):
        self.device = device
        self.rep = float(repetition_penalty)
        self.ngram = int(no_repeat_ngram_size or 0)
        self.min_length = int(min_length or 0)
        self.max_length = int(max_length)

        def mask(ids):
            """[V] bool, True at ``ids``."""
            m = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            m[torch.tensor(list(ids), dtype=torch.long, device=device)] = True
            return m

        self.eos_mask = mask(eos_token_ids) if eos_token_ids and self.min_length > 0 else None
        self.forced_bos = forced_bos
        # the forced first token(s) on the host (read once here, before any request work is queued):
        # the runner's loops decide from them where the host may skip its stop checks
        self.forced_bos_ids = (frozenset(int(t) for t in forced_bos.view(-1).tolist())
                               if isinstance(forced_bos, torch.Tensor) else frozenset({int(forced_bos)})
                               if forced_bos is not None else frozenset())
        self._bos_ids = (torch.tensor([int(forced_bos)], dtype=torch.long, device=device)
                         if forced_bos is not None and not isinstance(forced_bos, torch.Tensor) else None)
        self.forced_eos = (torch.tensor(list(forced_eos), dtype=torch.long, device=device)
                           if forced_eos else None)
        self.forced_eos_ids = tuple(int(t) for t in forced_eos) if forced_eos else None  # the same, on the host
        self.do_sample = bool(do_sample)
        self.temperature = float(temperature)
        self.top_k = int(top_k or 0)
        self.top_p = float(top_p)
        self.min_keep = int(min_tokens_to_keep)
        # bad words (HF's NoBadWordsLogitsProcessor): a word that is an EOS alone is dropped, like HF;
        # one-token words are a fixed mask, longer ones are grouped by prefix length
        eos = set(eos_token_ids or ())
        words = [list(w) for w in (bad_words or ()) if not (len(w) == 1 and w[0] in eos)]
        single = [w[0] for w in words if len(w) == 1]
        self.bad_single = mask(single) if single else None
        groups: dict[int, list[list[int]]] = {}
        for w in words:
            if len(w) > 1:
                groups.setdefault(len(w) - 1, []).append(w)
        self.bad_multi = [(torch.tensor([w[:-1] for w in ws], dtype=torch.long, device=device),
                           torch.tensor([w[-1] for w in ws], dtype=torch.long, device=device))
                          for _, ws in sorted(groups.items())]
        self.suppress = mask(suppress) if suppress else None
        self.begin_suppress = mask(begin_suppress) if begin_suppress else None
        # begin_suppress applies at length begin_index, or per row (a list: requests with their own
        # forced first token begin after it, those without at the first generated position)
        per_row = isinstance(begin_index, (list, tuple))
        self.begin_rows = torch.tensor(list(begin_index), dtype=torch.long, device=device) if per_row else None
        self._begin_at = frozenset(int(i) for i in (begin_index if per_row else (begin_index,)))

    @property
    def position_only(self) -> bool:
        """True when every processor depends on the position only (not on the tokens so far) and is
        one the CUDA runner's fused loops implement (minimum length, forced first / last tokens):
        ``at_position`` then gives the same scores with the position on the device. Bad words and
        suppressed tokens keep the step-by-step loop. Sampling's warpers (``warp``) do not count."""
        return (self.rep == 1.0 and self.ngram == 0 and self.bad_single is None
                and not self.bad_multi and self.suppress is None and self.begin_suppress is None)

    @property
    def static(self) -> bool:
        """``position_only`` and no random draws (greedy decoding or beam search)."""
        return self.position_only and not self.do_sample

    def _force_bos(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores that allow only the forced first token (one for all rows, or one per row)."""
        if isinstance(self.forced_bos, torch.Tensor):
            return force_tokens_per_row(scores, self.forced_bos)
        return force_tokens(scores, self._bos_ids.to(scores.device))

    def at_position(self, scores: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        """The pipeline at length ``cur`` (0-dim device tensor), with no host read (CUDA graphs):
        each position-dependent rule is computed and selected with ``torch.where``. Only for
        ``position_only`` pipelines; sampling's warpers are ``warp``."""
        if not self.position_only:
            raise ValueError("at_position needs a pipeline without repetition penalty, n-gram bans, bad words or "
                             "suppressed tokens")
        if self.eos_mask is not None:
            scores = torch.where(cur < self.min_length, ban_tokens(scores, self.eos_mask), scores)
        if self.forced_bos is not None:
            scores = torch.where(cur == 1, self._force_bos(scores), scores)
        if self.forced_eos is not None:
            scores = torch.where(cur == self.max_length - 1, force_tokens(scores, self.forced_eos), scores)
        return scores

    def __call__(self, seqs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cur = seqs.shape[-1]
        if self.rep != 1.0:
            scores = repetition_penalty(seqs, scores, self.rep)
        if self.ngram > 0:
            scores = no_repeat_ngram(seqs, scores, self.ngram)
        if self.bad_single is not None:
            scores = ban_tokens(scores, self.bad_single)
        for prefixes, last in self.bad_multi:
            scores = bad_words(seqs, scores, prefixes, last)
        if self.eos_mask is not None and cur < self.min_length:
            scores = ban_tokens(scores, self.eos_mask)
        if self.forced_bos is not None and cur == 1:
            scores = self._force_bos(scores)
        if self.forced_eos is not None and cur == self.max_length - 1:
            scores = force_tokens(scores, self.forced_eos)
        if self.suppress is not None:
            scores = ban_tokens(scores, self.suppress)
        if self.begin_suppress is not None and cur in self._begin_at:
            if self.begin_rows is None:
                scores = ban_tokens(scores, self.begin_suppress)
            else:  # the rows that begin at this length
                scores = torch.where((self.begin_rows == cur).unsqueeze(1) & self.begin_suppress, NEG_INF, scores)
        return self.warp(scores) if self.do_sample else scores

    def warp_candidates(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``warp`` with top-k then top-p through ``top_k_top_p`` where that is top_p's result bit for
        bit (both set, CUDA, a vocabulary of at least ``STABLE_SORT_MIN_VOCAB``): (scores, its overflow
        rows, or None where ``warp`` ran)."""
        if not (self.top_k and self.top_p < 1.0 and scores.device.type == "cuda"
                and scores.shape[-1] >= STABLE_SORT_MIN_VOCAB):
            return self.warp(scores), None
        if self.temperature != 1.0:
            scores = temperature(scores, self.temperature)
        return top_k_top_p(scores, self.top_k, self.top_p, self.min_keep)

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        """Sampling's warpers after the processors, in HF's order: temperature, top-k, top-p."""
        if self.temperature != 1.0:
            scores = temperature(scores, self.temperature)
        if self.top_k != 0:
            scores = top_k(scores, self.top_k, self.min_keep)
        if self.top_p < 1.0:
            scores = top_p(scores, self.top_p, self.min_keep)
        return scores
