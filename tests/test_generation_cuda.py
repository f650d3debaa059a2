"""The generation loop on CUDA: same tokens as HF generate on the same GPU (greedy, beam, sampling
with the same seed, per-request forced BOS). Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from conftest import make_registry  # noqa: E402
from test_generation import _tiny_t5, assert_same, hf_generate, hf_tokens, ours_generate  # noqa: E402

from encdec_core.convert import load_source_model  # noqa: E402


@pytest.fixture(scope="module")
def cuda_models(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5gen_cuda")
    hf = _tiny_t5(path).to("cuda")
    ours, src, _ = load_source_model(path, device="cuda", reg=make_registry("encdec_t5.plugin"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 101, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    return hf, ours, src, ids.masked_fill(mask == 0, 0).cuda(), mask.cuda()


@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=15),
    dict(max_new_tokens=12, num_beams=4, num_return_sequences=2, length_penalty=1.7),
    dict(max_new_tokens=12, num_beams=4, num_return_sequences=3, length_penalty=2.0, early_stopping="never",
         no_repeat_ngram_size=3, repetition_penalty=1.2),
    dict(max_new_tokens=12, num_beams=3, forced_bos_token_id=7, forced_eos_token_id=1, min_new_tokens=4),
], ids=["greedy", "beam", "beam-never-ngram-rep", "beam-forced-min"])
def test_cuda_matches_hf(cuda_models, kw):
    hf, ours, src, ids, mask = cuda_models
    h = hf_generate(hf, ids, mask, **kw)
    o = ours_generate(ours, src, ids, mask, **kw)
    assert o.sequences.device.type == "cuda"
    assert_same(h, o, beam=kw.get("num_beams", 1) > 1)


@pytest.mark.parametrize("kw", [
    dict(do_sample=True, top_k=10, top_p=0.9, temperature=0.8, num_return_sequences=2),
    dict(do_sample=True, num_beams=3, top_k=10),
], ids=["sample", "beam-sample"])
def test_cuda_sampling(cuda_models, kw):
    """A CUDA generator seeded like torch.manual_seed draws the same numbers as HF's global one."""
    hf, ours, src, ids, mask = cuda_models
    a = ours_generate(ours, src, ids, mask, seed=11, max_new_tokens=10, **kw)
    b = ours_generate(ours, src, ids, mask, seed=11, max_new_tokens=10, **kw)
    assert torch.equal(a.sequences, b.sequences)
    h = hf_generate(hf, ids, mask, seed=11, max_new_tokens=10, **kw)
    assert_same(h, a, beam=kw.get("num_beams", 1) > 1)


def test_cuda_per_request_forced_bos(cuda_models):
    hf, ours, src, ids, mask = cuda_models
    out = ours_generate(ours, src, ids, mask, forced_bos_token_ids=[7, None, 9], num_beams=3, max_new_tokens=8)
    for b, want in enumerate([7, None, 9]):
        n = int(mask[b].sum())
        extra = {} if want is None else {"forced_bos_token_id": want}
        h = hf_generate(hf, ids[b:b + 1, :n], mask[b:b + 1, :n], num_beams=3, max_new_tokens=8, **extra)
        assert out.tokens(b) == hf_tokens(h.sequences, 0)


@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=12),
    dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, length_penalty=1.3),
    dict(max_new_tokens=10, bad_words_ids=[[25, 70]], suppress_tokens=[4], begin_suppress_tokens=[96]),
], ids=["greedy", "beam", "greedy-bad-suppress"])
def test_cuda_token_scores_and_processors_match_hf(cuda_models, kw):
    """On CUDA: output_scores equal HF's compute_transition_scores, the new processors HF's tokens."""
    from encdec_core.runtime.generation import GenerationConfig, generate

    hf, ours, src, ids, mask = cuda_models
    beam = kw.get("num_beams", 1) > 1
    h = hf_generate(hf, ids, mask, **kw)
    gc = GenerationConfig.from_model(ours.cfg, src.generation_config, **kw)
    o = generate(ours, ids, mask, gc, output_scores=True)
    assert_same(h, o, beam=beam)
    if beam:
        ref = hf.compute_transition_scores(h.sequences, h.scores, h.beam_indices, normalize_logits=False)
    else:
        ref = hf.compute_transition_scores(h.sequences, h.scores, normalize_logits=True)
    for i in range(len(o)):
        lps = o.token_logprobs(i)
        torch.testing.assert_close(torch.tensor(lps), ref[i, : len(lps)].cpu(), atol=1e-4, rtol=1e-4)
