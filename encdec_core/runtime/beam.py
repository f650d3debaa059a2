"""Beam search (and beam sampling) with HF transformers' (v5) rules, vectorised over the batch.

State per request b and beam slot j, all tensors on the device:
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
"""
from __future__ import annotations

import torch

from .generation import GenerationConfig, feed_prefix

_BIG = -1.0e9


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` [B, k] of the beam dimension of ``t`` [B, n, ...]."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def beam_search(runner, gc: GenerationConfig, batch: int, max_len: int, pipeline, generator, device,
                prefix: torch.Tensor):
    """``prefix`` [batch * nb, P]: the decoder start token (and any decoder prefix), rows repeated per beam."""
    nb = gc.num_beams
    eos = gc.eos_token_ids
    lp = gc.length_penalty
    es = gc.early_stopping
    keep = max(2, 1 + len(eos)) * nb
    prompt = prefix.shape[1]
    # HF fills unused positions with pad, or with the first EOS when pad is 0 / unset, or -1 without EOS
    pad = gc.pad_token_id
    fill = (pad if pad else eos[0]) if eos else -1

    run_seq = torch.full((batch, nb, max_len), fill, dtype=torch.long, device=device)
    run_seq[:, :, :prompt] = prefix.view(batch, nb, prompt)
    fin_seq = run_seq.clone()
    run_score = torch.zeros((batch, nb), dtype=torch.float32, device=device)
    run_score[:, 1:] = _BIG
    fin_score = torch.full((batch, nb), _BIG, dtype=torch.float32, device=device)
    fin_done = torch.zeros((batch, nb), dtype=torch.bool, device=device)
    fin_len = torch.zeros((batch, nb), dtype=torch.long, device=device)
    can_improve = torch.ones((batch, 1), dtype=torch.bool, device=device)
    top_nb = torch.zeros(keep, dtype=torch.bool, device=device)
    top_nb[:nb] = True
    eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    offsets = (torch.arange(batch, device=device) * nb).view(-1, 1)

    feed_prefix(runner, prefix)  # every beam of a request has the same prefix: no reordering needed
    cur = prompt
    tokens = prefix[:, -1].contiguous()
    while True:
        logits = runner.step(tokens).float()
        logp = torch.log_softmax(logits, dim=-1)
        logp = pipeline(run_seq.view(batch * nb, max_len)[:, :cur], logp)
        vocab = logp.shape[-1]
        acc = (logp.view(batch, nb, vocab) + run_score[:, :, None]).view(batch, nb * vocab)

        # best `keep` continuations over all beams of each request (or `keep` samples)
        if gc.do_sample:
            idx = torch.multinomial(torch.softmax(acc, dim=-1), num_samples=keep, generator=generator)
            cand_score = torch.gather(acc, 1, idx)
            cand_score, order = cand_score.sort(dim=-1, descending=True)
            idx = idx.gather(-1, order)
        else:
            cand_score, idx = torch.topk(acc, k=keep)
        src = idx // vocab
        tok = idx % vocab
        cand_seq = _take(run_seq, src)
        cand_seq[:, :, cur] = tok

        ended = torch.full((batch, keep), cur + 1 >= max_len, dtype=torch.bool, device=device)
        if eos_t is not None:
            ended = ended | torch.isin(tok, eos_t)

        # the nb best continuations that go on
        live_score = cand_score + ended.to(torch.float32) * _BIG
        pick = torch.topk(live_score, k=nb)[1]
        run_seq = _take(cand_seq, pick)
        run_score = _take(live_score, pick)
        run_src = _take(src, pick)

        # finished hypotheses: merge the new ones (top nb only) into the nb slots
        new_done = ended & top_nb[None, :]
        norm = cand_score / ((cur + 1 - prompt) ** lp)
        full = fin_done.all(dim=-1, keepdim=True) & (es is True)
        norm = norm + full.to(torch.float32) * _BIG
        norm = norm + (~can_improve).to(torch.float32) * _BIG
        norm = norm + (~new_done) * _BIG
        m_seq = torch.cat((fin_seq, cand_seq), dim=1)
        m_score = torch.cat((fin_score, norm), dim=1)
        m_done = torch.cat((fin_done, new_done), dim=1)
        m_len = torch.cat((fin_len, torch.full((batch, keep), cur + 1 - prompt, dtype=torch.long, device=device)),
                          dim=1)
        best = torch.topk(m_score, k=nb)[1]
        fin_seq, fin_score = _take(m_seq, best), _take(m_score, best)
        fin_done, fin_len = _take(m_done, best), _take(m_len, best)

        runner.reorder((run_src + offsets).view(-1))
        cur += 1

        # can a running beam still beat the worst finished one?
        if es == "never" and lp > 0.0:
            best_len = max_len - prompt
        else:
            best_len = cur - prompt
        best_running = run_score[:, :1] / (best_len ** lp)
        worst_done = torch.where(fin_done, torch.min(fin_score, dim=1, keepdim=True)[0], _BIG)
        can_improve = can_improve & torch.any(best_running > worst_done, dim=-1, keepdim=True)

        go_on = torch.any(can_improve) & ~(torch.all(fin_done) & (es is True)) & ~torch.all(ended)
        if not bool(go_on):  # the one host sync per step
            break
        tokens = run_seq[:, :, cur - 1].reshape(-1)

    n = gc.num_return_sequences
    seqs = fin_seq[:, :n].reshape(batch * n, max_len)
    scores = fin_score[:, :n].reshape(batch * n)
    out_len = prompt + int(fin_len[:, :n].max())
    return seqs[:, :out_len], scores
