"""The Triton decoder step (FusedStep: 8 kernels per layer) against the model's own static step.

fp32, tiny T5 (gated GELU, relative bias, tied output scale) and BART (post-LN done lazily,
learned positions, biases, final logits bias) models: logits within 1e-4 step by step, and the
same greedy and beam tokens through the runner. Without a GPU the kernels run in Triton's
interpreter (conftest sets TRITON_INTERPRET=1); with one, compiled, inside CUDA graphs.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_cuda_runner import _gc, _inputs, _ragged  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _model(family: str):
    import importlib

    from encdec_core.benchmark import init_random
    from encdec_core.model import build_model

    mod = importlib.import_module(f"encdec_{family}.plugin")
    fam = getattr(mod, {"t5": "T5", "bart": "BART"}[family])
    preset = {"t5": "flan-t5-small", "bart": "bart-base"}[family]
    cfg = fam.make_config(dict(fam.presets[preset])).replace(
        encoder_layers=1, decoder_layers=2, vocab_size=300, max_position_embeddings=64, d_model=64, head_dim=16,
        encoder_heads=4, decoder_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96)
    if family == "t5":
        cfg = cfg.replace(output_scale=64 ** -0.5)  # T5's tied-embedding scale, folded into the final norm
    model = build_model(cfg, dtype=torch.float32, device=DEV)
    init_random(model, seed=3, std=0.1)
    if family == "bart":
        with torch.no_grad():
            model.final_logits_bias.normal_(0, 0.5)
    model.init_buffers()
    return model.eval()


def _runner(model, kernels):
    from encdec_core.runtime.cuda import CudaGraphRunner

    on_gpu = DEV == "cuda"
    return CudaGraphRunner(model, 8, 12, 16, compile=False, use_graphs=on_gpu, kernels=kernels)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_fused_step_matches_model_step(family):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _model(family)
    cfg = model.cfg
    assert family != "bart" or cfg.final_logits_bias
    ids, mask = _inputs(cfg, b=2, s=9, device=DEV)
    ref, fused = _runner(model, "inductor"), _runner(model, "triton")
    assert fused._fused is not None and ref._fused is None
    ref.prefill(ids, mask, 1, 6)
    fused.prefill(ids, mask, 1, 6)
    tok = torch.full((2,), cfg.decoder_start_token_id, device=DEV)
    for _ in range(3):
        a, b = ref.step(tok).clone(), fused.step(tok).clone()
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-4
        tok = a.argmax(-1)
    # whole generations: greedy (fused loop) and beam search (in the graph) give the same tokens
    g_ref = ref.greedy(ids, mask, max_new_tokens=5)
    g_fused = fused.greedy(ids, mask, max_new_tokens=5)
    assert torch.equal(g_ref, g_fused)
    from encdec_core.runtime.generation import generate

    gc = _gc(cfg, num_beams=2, max_new_tokens=4)
    assert torch.equal(generate(model, ids, mask, gc, runner=fused).sequences,
                       generate(model, ids, mask, gc, runner=ref).sequences)


# In Triton's interpreter (a CPU) each of the two heavy tests below takes 20-25 s per family:
# the default run keeps one family of each (BART here, T5 there; both families run the fused step in
# test_fused_step_matches_model_step), `make test-all` both; on a GPU both always run.
_INTERP_SLOW = [pytest.mark.slow] if DEV != "cuda" else []


@pytest.mark.parametrize("family", [pytest.param("t5", marks=_INTERP_SLOW), "bart"])
def test_fused_step_many_rows_on_the_tiled_kernel(family):
    """Above 16 rows the Triton step's GEMMs are the tiled kernel (split-K where the shapes allow,
    norm statistics written by the residual producers and merged by the next norm): logits within
    1e-4 of the model's own step, the same greedy tokens, and each row equal to its own batch-1 run
    (fp32; the interpreter on CPU, compiled with CUDA graphs on a GPU)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.cuda import triton_kernels as tk

    model = _model(family)
    cfg = model.cfg
    B = 17
    assert tk.linear_config(B, cfg.d_model, cfg.d_model).get("BIG")
    ids, mask = _ragged(cfg, B, 9, seed=5, device=DEV)  # lengths 9 down to 2
    kw = dict(compile=False, use_graphs=DEV == "cuda")
    # a runner limit of B rows: the bucket is the batch itself (not 32), so the kernels also mask a
    # row count that is not a power of two (and the interpreter runs 17 rows' programs, not 32)
    ref = CudaGraphRunner(model, B, 12, 16, kernels="inductor", **kw)
    fused = CudaGraphRunner(model, B, 12, 16, kernels="triton", fused_max_batch=B, **kw)
    ref.prefill(ids, mask, 1, 6)
    fused.prefill(ids, mask, 1, 6)
    assert fused._cur[0] == B and fused._step_fn(B) is fused._fused
    tok = torch.full((B,), cfg.decoder_start_token_id, device=DEV)
    for _ in range(2):
        a, b = ref.step(tok).clone(), fused.step(tok).clone()
        assert (a - b).abs().max().item() <= 1e-4
        tok = a.argmax(-1)
    # the fused loop over the positions the steps above compared (2 tokens: CI's time)
    g = fused.greedy(ids, mask, max_new_tokens=2)
    assert torch.equal(g, ref.greedy(ids, mask, max_new_tokens=2))
    one = _runner(model, "triton")  # batch 1: the small-batch kernels
    for r in (1, B - 1):
        alone = one.greedy(ids[r:r + 1], mask[r:r + 1], max_new_tokens=2)[0]
        n = alone.shape[0]  # stops at EOS alone; padded in the batch
        assert torch.equal(alone, g[r, :n]) and bool((g[r, n:] == cfg.pad_token_id).all())


def test_fused_step_refuses_what_it_cannot_run():
    from encdec_core.runtime.cuda import CudaGraphRunner
    from encdec_core.runtime.cuda.fused import unsupported_reason

    model = _model("t5")
    assert unsupported_reason(model) is None
    model.cfg = model.cfg.replace(decoder_pre_norm=False)  # post-norm with a final norm: not fusable
    assert "final norm" in unsupported_reason(model)
    with pytest.raises(ValueError, match="does not support a post-norm decoder with a final norm"):
        CudaGraphRunner(model, 2, 4, 8, compile=False, use_graphs=False, kernels="triton")
    with pytest.raises(ValueError, match="kernels="):
        CudaGraphRunner(model, 2, 4, 8, compile=False, use_graphs=False, kernels="cutlass")


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, pytest.mark.skipif(
        DEV != "cuda", reason="bf16 needs a GPU: the Triton interpreter computes bf16 wrongly")]),
    torch.float32])
@pytest.mark.parametrize("rows", [3, 20])  # the small-batch kernel and the tiled one
def test_residual_sum_is_the_fused_epilogue(dtype, rows):
    """Tensor parallelism's residual add (fp32 product, all-reduce, ``residual_sum``) against the
    single-rank kernel that adds bias and residual in its epilogue: bit-identical without a residual
    norm (same fp32 sum, one rounding), and to fp32 rounding with a pending post-norm."""
    from encdec_core.runtime.cuda.fused import residual_sum
    from encdec_core.runtime.cuda.triton_kernels import fused_linear

    g = torch.Generator().manual_seed(5)
    a = torch.randn(rows, 48, generator=g).to(DEV, dtype)
    w = (torch.randn(40, 48, generator=g) * 0.2).to(DEV, dtype)
    b = torch.randn(40, generator=g).to(DEV, dtype)
    x = torch.randn(rows, 40, generator=g).to(DEV, dtype)
    one = fused_linear(a, w, b, residual=x, out_dtype=dtype)
    part = fused_linear(a, w, None, out_dtype=torch.float32)
    if dtype == torch.float32 and DEV == "cuda":
        # compiled for the GPU, the two launches' fp32 sums may round differently in the last bit
        # (seen on an H200, 2026-11-30: 1 ulp); the interpreter and bf16 outputs are bit-identical
        torch.testing.assert_close(residual_sum(x, part, b, None, dtype), one, rtol=5e-7, atol=1e-6)
    else:
        assert torch.equal(residual_sum(x, part, b, None, dtype), one)
    ln = ("layer", (1 + 0.1 * torch.randn(40, generator=g)).to(DEV, dtype), torch.randn(40, generator=g).to(DEV, dtype),
          1e-5)
    one = fused_linear(a, w, b, residual=x, residual_norm=ln, out_dtype=dtype)
    got = residual_sum(x, part, b, ln, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7 * one.abs().max().item()
    assert (got.float() - one.float()).abs().max().item() <= tol
    # without the residual the sum differs: the check above can fail
    assert not torch.equal(residual_sum(torch.zeros_like(x), part, b, None, dtype), one)


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="programmatic dependent launch needs a GPU")
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_fused_step_with_pdl_equals_plain_launch(family):
    """The Triton step launched with programmatic dependent launch (Hopper+) inside the CUDA graph:
    the same logits, bit for bit, and the same greedy tokens as the plain launch."""
    from encdec_core.runtime.cuda.triton_kernels import pdl_supported

    if not pdl_supported(DEV):
        pytest.skip("no programmatic dependent launch on this GPU")
    model = _model(family)
    ids, mask = _inputs(model.cfg, b=2, s=9, device=DEV)
    plain, pdl = _runner(model, "triton"), _runner(model, "triton")
    assert pdl._fused.pdl
    plain._fused.pdl = False
    tok = torch.full((2,), model.cfg.decoder_start_token_id, device=DEV)
    plain.prefill(ids, mask, 1, 6)
    pdl.prefill(ids, mask, 1, 6)
    for _ in range(4):
        a, b = plain.step(tok).clone(), pdl.step(tok).clone()
        assert torch.equal(a, b)
        tok = a.argmax(-1)
    assert torch.equal(plain.greedy(ids, mask, max_new_tokens=6), pdl.greedy(ids, mask, max_new_tokens=6))


COMPILE = [False, pytest.param(True, marks=[pytest.mark.gpu,
                                            pytest.mark.skipif(DEV != "cuda", reason="compiled: CUDA only")])]


@pytest.mark.parametrize("compile", COMPILE)
@pytest.mark.parametrize("family", ["t5", pytest.param("bart", marks=_INTERP_SLOW)])
def test_static_step_with_triton_attention_and_padded_lm_head(family, compile):
    """The model-op static step (the path of batch buckets above ``fused_max_batch``) with the Triton
    attention kernel as a custom op (T5: relative bias table; BART: key padding) and the logits from
    the padded lm_head copy (vocabulary 300, not a multiple of 8) equals the plain static step; on
    CUDA also compiled by inductor (the op inside the compiled graph) and replayed from graphs."""
    from encdec_core.runtime.cuda import CudaGraphRunner

    torch.backends.cuda.matmul.allow_tf32 = False
    model = _model(family)
    cfg = model.cfg
    on_gpu = DEV == "cuda"
    kw = dict(compile=compile, use_graphs=on_gpu, kernels="inductor")
    # a limit of 6 rows: the beam searches below (3 requests x 2 beams) fill the bucket exactly (the
    # interpreter runs 6 rows' attention programs, not 8)
    ref = CudaGraphRunner(model, 6, 12, 16, attention="math", **kw)
    tri = CudaGraphRunner(model, 6, 12, 16, attention="triton", **kw)
    assert tri.dec.attention == "triton" and ref.dec.attention == "math"
    tri.dec.pad_lm_head()
    assert tri.dec.lm_weight is not None and tri.dec.lm_weight.shape[0] % 64 == 0
    ids, mask = _inputs(cfg, b=3, s=9, device=DEV)
    ref.prefill(ids, mask, 1, 6)
    tri.prefill(ids, mask, 1, 6)
    tok = torch.full((3,), cfg.decoder_start_token_id, device=DEV)
    for _ in range(3):
        a, b = ref.step(tok).clone(), tri.step(tok).clone()
        assert a.shape == b.shape == (3, cfg.vocab_size)
        assert (a - b).abs().max().item() <= 1e-4
        tok = a.argmax(-1)
    from encdec_core.runtime.generation import generate

    # beam search: the Triton runner moves a cache-row index instead of the caches, in the graph
    # (static processors) and in generate's loop (runner.reorder: repetition penalty)
    # and (Triton) a request's beams share one row of cross K/V and padding bias
    assert tri._indirect(6) and not ref._indirect(6)
    # 5 tokens: 4 reorders after the first step (the interpreter runs each Triton step on a CPU)
    for opts in (dict(num_beams=2, max_new_tokens=5), dict(num_beams=2, max_new_tokens=5, repetition_penalty=1.5)):
        gc = _gc(cfg, **opts)
        assert torch.equal(generate(model, ids, mask, gc, runner=tri).sequences,
                           generate(model, ids, mask, gc, runner=ref).sequences), opts
        assert tri._group == 2 and ref._group == 1
        # the real source positions (9 of the 16-wide bucket): past them a graphed prefill leaves the
        # padding tokens' K/V and an eager one zeros, both masked by the padding bias
        assert tri._cur[0] == ref._cur[0] == 6
        assert torch.equal(tri.dec.views(6, 16).ck[0][:3, :, :9], ref.dec.views(6, 16).ck[0][0:6:2, :, :9])
    copy = CudaGraphRunner(model, 6, 12, 16, attention="triton", beam_reorder="copy", **kw)
    assert not copy._indirect(6)
    assert torch.equal(generate(model, ids, mask, gc, runner=copy).sequences,
                       generate(model, ids, mask, gc, runner=ref).sequences)
    with pytest.raises(ValueError, match="attention="):
        CudaGraphRunner(model, 2, 4, 8, attention="flash", **kw)
    with pytest.raises(ValueError, match="beam_reorder="):
        CudaGraphRunner(model, 2, 4, 8, beam_reorder="swap", **kw)
    with pytest.raises(ValueError, match="needs the Triton attention"):
        CudaGraphRunner(model, 2, 4, 8, attention="math", beam_reorder="index", **kw)._indirect(2)
