"""Beam search (and beam sampling) with HF transformers' (v5) rules, vectorised over the batch.

State per request b and beam slot j, all tensors on the device (``BeamState``):
- running hypotheses ``run_seq`` [B, nb, L] with accumulated log-probs ``run_score`` [B, nb]
  (at start only beam 0 is live: the others score -1e9 so the first step does not pick the
  same token nb times);
- finished hypotheses ``fin_seq`` [B, nb, L], their length-normalised scores ``fin_score``
  (-1e9 while a slot is empty), ``fin_done`` and their generated lengths ``fin_len``.

Each step keeps the best K = max(2, 1 + #eos) * nb continuations over all beams, so at least nb
of them do not end. Continuations that end (EOS, or the maximum length) and rank among the first
nb compete for the finished slots with score sum_logprob / generated_len ** length_penalty
(generated_len counts the new token, not the start token). The rest continue. A request stops
taking finished hypotheses once it cannot improve (the early-stopping heuristic below) or, with
early_stopping=True, once its nb slots are full. The loop ends when no request can improve, or
every request is full (early_stopping=True), or every continuation ended.

``BeamState.update`` takes the current length as a 0-dim *device* tensor and never reads a value
on the host, so the CUDA-graph runner captures it (with the decoder step and the cache reorder)
in one graph; the Python loop below runs the very same update. Steps taken after the loop could
have stopped change no finished hypothesis (every slot of every request is then full and beats
any new candidate, which carries a -1e9 penalty), so a graph loop may check the stop flag only
every few steps and still return the same result.
"""
from __future__ import annotations

import torch

from .generation import GenerationConfig, feed_prefix, nothing_to_sample

_BIG = -1.0e9


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` [B, k] of the beam dimension of ``t`` [B, n, ...]."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def small_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k largest of each row of ``x`` [..., n], largest first and equal
    values lowest index first, for short rows: pairwise comparisons that inductor fuses into one or
    two kernels inside the compiled beam step, where ``torch.topk`` runs a radix select and a sort
    (2 kernels, ~11 us a step at 8 x 4 on an H200). Same answer as ``torch.topk`` wherever values
    are distinct. No NaN.

    The update takes the ``nb`` running beams with it: equal live scores there are -inf candidates
    (a forced token) or, at the last step, ended ones, and neither reaches a result, except where
    beams tie on the -1e9 placeholder score that swallows their log-probs in fp32 (a first token
    forced to EOS with early_stopping "never": docs/families.md lists it). The finished
    hypotheses keep ``torch.topk``: two forced EOS ids give exactly equal finished scores, and HF
    orders them by ``torch.topk``'s own tie order (``test_processors_match_hf[beam-rep-forced]``)."""
    n = x.shape[-1]
    ar = torch.arange(n, device=x.device)
    xi, xj = x.unsqueeze(-1), x.unsqueeze(-2)  # [..., i, 1], [..., 1, j]
    before = (xj > xi) | ((xj == xi) & (ar.view(1, n) < ar.view(n, 1)))  # j ranks ahead of i
    rank = before.sum(-1)  # [..., n]: a permutation of 0..n-1 per row
    slot = torch.arange(k, device=x.device).view(k, 1)
    return ((rank.unsqueeze(-2) == slot) * ar).sum(-1)  # [..., k]: the i of rank 0..k-1


class BeamState:
    """Every tensor of a beam search over ``batch`` requests, in place (static addresses)."""

    def __init__(self, gc: GenerationConfig, batch: int, max_len: int, prompt: int, device,
                 track_scores: bool = False, padded: bool = False):
        nb = gc.num_beams
        self.gc, self.batch, self.nb, self.max_len, self.prompt = gc, batch, nb, max_len, prompt
        # the top-k over [batch, beams x vocabulary] of each step: torch.topk, or a callable with its
        # (input, k) -> (values, indices) contract (the CUDA runner's Triton kernel)
        self.topk = torch.topk
        eos = gc.eos_token_ids
        self.keep = max(2, 1 + len(eos)) * nb
        # HF fills unused positions with pad, or with the first EOS when pad is 0 / unset, or -1 without EOS
        pad = gc.pad_token_id
        self.fill = (pad if pad else eos[0]) if eos else -1
        self.lp, self.es = gc.length_penalty, gc.early_stopping
        self.device = torch.device(device)
        z = dict(device=device)
        self.run_seq = torch.empty((batch, nb, max_len), dtype=torch.long, **z)
        self.fin_seq = torch.empty_like(self.run_seq)
        self.run_score = torch.empty((batch, nb), dtype=torch.float32, **z)
        self.fin_score = torch.empty((batch, nb), dtype=torch.float32, **z)
        self.fin_done = torch.empty((batch, nb), dtype=torch.bool, **z)
        self.fin_len = torch.empty((batch, nb), dtype=torch.long, **z)
        # track_scores: each token's processed log-prob, carried along with its hypothesis
        self.run_tlp = torch.empty((batch, nb, max_len), dtype=torch.float32, **z) if track_scores else None
        self.fin_tlp = torch.empty_like(self.run_tlp) if track_scores else None
        self.can_improve = torch.empty((batch, 1), dtype=torch.bool, **z)
        self.src_index = torch.empty(batch * nb, dtype=torch.long, **z)  # rows the caches take after a step
        self.go_on = torch.empty((), dtype=torch.bool, **z)
        # sampling: a request whose every candidate the options exclude (all -inf) ends the search;
        # beam_search reports it (torch.multinomial fails on such a row: a device assert on CUDA)
        self.starved = torch.zeros((), dtype=torch.bool, **z)
        # requests 0..active-1 are real; a CUDA graph captured for a batch bucket runs the rest as
        # padding, which neither keeps the search going nor stops it, nor counts in the result
        self.active = torch.ones((batch, 1), dtype=torch.bool, **z)
        self.row_active = torch.ones((batch * nb, 1), dtype=torch.bool, **z)
        self.n_active = batch
        self.padded = padded  # may run with fewer active requests (reset(active=)): zero their log-probs
        self.top_nb = torch.zeros(self.keep, dtype=torch.bool, **z)
        self.top_nb[:nb] = True
        self.eos_t = torch.tensor(eos, dtype=torch.long, **z) if eos else None
        self.offsets = (torch.arange(batch, **z) * nb).view(-1, 1)
        # generated_len ** length_penalty for every length, as the fp32 a Python-scalar division uses
        # (on CUDA torch divides by a host scalar as a multiplication by its fp32 reciprocal: same here)
        lens = [float(n) ** self.lp if n > 0 else 1.0 for n in range(max_len + 1)]
        self.len_pow = torch.tensor(lens, dtype=torch.float32, **z)
        self.inv_len_pow = 1.0 / self.len_pow
        if self.es == "never" and self.lp > 0.0:
            self.best_len = torch.full((), max_len - prompt, dtype=torch.long, **z)
        else:
            self.best_len = None

    def reset(self, prefix: torch.Tensor, active: int | None = None) -> None:
        """A new search from ``prefix`` [batch * nb, prompt] (rows repeated per beam); ``active``: the
        number of real requests (the first ones; default all)."""
        b, nb, p = self.batch, self.nb, self.prompt
        self.n_active = b if active is None else int(active)
        if not 1 <= self.n_active <= b or (self.n_active < b and not self.padded):
            raise ValueError(f"BeamState.reset: active={active}, expected 1..{b} (below {b} only for a state "
                             f"made with padded=True)")
        self.active.fill_(True)
        self.active[self.n_active:] = False
        self.row_active.fill_(True)
        self.row_active[self.n_active * nb:] = False
        self.run_seq.fill_(self.fill)
        self.run_seq[:, :, :p] = prefix.view(b, nb, p)
        self.fin_seq.copy_(self.run_seq)
        if self.run_tlp is not None:
            self.run_tlp.zero_()
            self.fin_tlp.zero_()
        self.run_score.zero_()
        self.run_score[:, 1:] = _BIG
        self.fin_score.fill_(_BIG)
        self.fin_done.zero_()
        self.fin_len.zero_()
        self.can_improve.fill_(True)
        self.go_on.fill_(True)
        self.starved.fill_(False)

    def _per_len(self, scores: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """``scores / n ** length_penalty`` with the rounding of a division by a host float."""
        n = n.view(1)
        if self.device.type == "cuda":
            return scores * self.inv_len_pow.index_select(0, n)
        return scores / self.len_pow.index_select(0, n)

    def update(self, logp: torch.Tensor, cur: torch.Tensor, generator=None) -> None:
        """One step from the processed log-probs ``logp`` [batch * nb, V] at length ``cur`` (0-dim
        device tensor: the position the new token takes). Sets ``src_index`` (the rows every cache
        takes) and ``go_on``; the new tokens are ``run_seq[:, :, cur]``."""
        b, nb, keep, L = self.batch, self.nb, self.keep, self.max_len
        vocab = logp.shape[-1]
        # padding requests' rows carry whatever the bucket's unused rows compute (their sources are
        # padding; nothing keeps those logits finite): zeros keep every top-k index they take valid
        if self.padded:
            logp = torch.where(self.row_active, logp, 0.0)
        acc = (logp.view(b, nb, vocab) + self.run_score[:, :, None]).view(b, nb * vocab)

        # best `keep` continuations over all beams of each request (or `keep` samples)
        if self.gc.do_sample:
            dead = torch.isneginf(acc).all(dim=-1, keepdim=True) & self.active  # nothing to draw from
            self.starved.logical_or_(dead.any())
            probs = torch.where(dead, 1.0, torch.softmax(acc, dim=-1))  # a valid draw; the search then stops
            idx = torch.multinomial(probs, num_samples=keep, generator=generator)
            cand_score = torch.gather(acc, 1, idx)
            cand_score, order = cand_score.sort(dim=-1, descending=True)
            idx = idx.gather(-1, order)
        else:
            cand_score, idx = self.topk(acc, keep)
        src = idx // vocab
        tok = idx % vocab
        cand_seq = _take(self.run_seq, src)
        cand_seq.index_copy_(2, cur.view(1), tok.unsqueeze(-1))
        cand_tlp = None
        if self.run_tlp is not None:
            cand_tlp = _take(self.run_tlp, src)
            cand_tlp.index_copy_(2, cur.view(1), logp.reshape(b, nb * vocab).gather(1, idx).unsqueeze(-1))

        ended = (cur + 1 >= L).expand(b, keep)
        if self.eos_t is not None:
            ended = ended | torch.isin(tok, self.eos_t)

        # the nb best continuations that go on
        live_score = cand_score + ended.to(torch.float32) * _BIG
        pick = small_topk(live_score, nb)
        self.run_seq.copy_(_take(cand_seq, pick))
        if cand_tlp is not None:
            self.run_tlp.copy_(_take(cand_tlp, pick))
        self.run_score.copy_(_take(live_score, pick))
        run_src = _take(src, pick)

        # finished hypotheses: merge the new ones (top nb only) into the nb slots
        new_done = ended & self.top_nb[None, :]
        gen_len = cur + 1 - self.prompt
        norm = self._per_len(cand_score, gen_len)
        full = self.fin_done.all(dim=-1, keepdim=True) & (self.es is True)
        norm = norm + full.to(torch.float32) * _BIG
        norm = norm + (~self.can_improve).to(torch.float32) * _BIG
        norm = norm + (~new_done) * _BIG
        m_seq = torch.cat((self.fin_seq, cand_seq), dim=1)
        m_score = torch.cat((self.fin_score, norm), dim=1)
        m_done = torch.cat((self.fin_done, new_done), dim=1)
        m_len = torch.cat((self.fin_len, gen_len.expand(b, keep)), dim=1)
        best = torch.topk(m_score, k=nb)[1]
        self.fin_seq.copy_(_take(m_seq, best))
        self.fin_score.copy_(_take(m_score, best))
        self.fin_done.copy_(_take(m_done, best))
        self.fin_len.copy_(_take(m_len, best))
        if cand_tlp is not None:
            self.fin_tlp.copy_(_take(torch.cat((self.fin_tlp, cand_tlp), dim=1), best))
        self.src_index.copy_((run_src + self.offsets).view(-1))

        # can a running beam still beat the worst finished one?
        best_len = self.best_len if self.best_len is not None else gen_len
        best_running = self._per_len(self.run_score[:, :1], best_len)
        worst_done = torch.where(self.fin_done, torch.min(self.fin_score, dim=1, keepdim=True)[0], _BIG)
        self.can_improve.logical_and_(torch.any(best_running > worst_done, dim=-1, keepdim=True))
        live = self.active
        go = (torch.any(self.can_improve & live) & ~(torch.all(self.fin_done | ~live) & (self.es is True))
              & ~torch.all(ended | ~live))
        self.go_on.copy_(go & ~self.starved)

    def tokens(self, cur: int | torch.Tensor) -> torch.Tensor:
        """The tokens just chosen (position ``cur``), one per row [batch * nb]."""
        if isinstance(cur, torch.Tensor):
            return self.run_seq.index_select(2, cur.view(1)).view(-1)
        return self.run_seq[:, :, cur].reshape(-1)

    def result(self, n: int | None = None):
        """(sequences [active * n, out_len], scores [active * n]) of the n best finished hypotheses of
        the active requests, and their token log-probs [active * n, out_len] when the state tracks them."""
        n = self.gc.num_return_sequences if n is None else n
        a = self.n_active
        seqs = self.fin_seq[:a, :n].reshape(a * n, self.max_len)
        scores = self.fin_score[:a, :n].reshape(a * n)
        out_len = self.prompt + int(self.fin_len[:a, :n].max())
        if self.fin_tlp is None:
            return seqs[:, :out_len], scores
        # a position is written only when its token is chosen, so each row is 0 past its end
        tlp = self.fin_tlp[:a, :n].reshape(a * n, self.max_len)
        return seqs[:, :out_len], scores, tlp[:, :out_len]


def beam_search(runner, gc: GenerationConfig, batch: int, max_len: int, pipeline, generator, device,
                prefix: torch.Tensor, output_scores: bool = False):
    """``prefix`` [batch * nb, P]: the decoder start token (and any decoder prefix), rows repeated per beam.
    Returns (sequences, scores), and with ``output_scores`` each token's log-prob as a third item.

    A runner with a ``beam_search(gc, batch, max_len, pipeline, prefix)`` method (the CUDA-graph
    runner) runs the loop itself when the pipeline can run on device positions (``pipeline.static``),
    nothing is sampled and no token scores are asked for."""
    prompt = prefix.shape[1]
    fused = getattr(runner, "beam_search", None)
    if fused is not None and pipeline.static and not gc.do_sample and not output_scores:
        return fused(gc, batch, max_len, pipeline, prefix)
    st = BeamState(gc, batch, max_len, prompt, device, track_scores=output_scores)
    st.reset(prefix)
    feed_prefix(runner, prefix)  # every beam of a request has the same prefix: no reordering needed
    cur = prompt
    cur_t = torch.full((), prompt, dtype=torch.long, device=device)
    tokens = prefix[:, -1].contiguous()
    while True:
        logits = runner.step(tokens).float()
        logp = torch.log_softmax(logits, dim=-1)
        logp = pipeline(st.run_seq.view(batch * st.nb, max_len)[:, :cur], logp)
        st.update(logp, cur_t, generator)
        runner.reorder(st.src_index)
        tokens = st.tokens(cur)
        cur += 1
        cur_t.fill_(cur)
        if not bool(st.go_on):  # the one host sync per step
            break
    if gc.do_sample and bool(st.starved):
        raise nothing_to_sample(gc, cur - prompt)
    return st.result()
