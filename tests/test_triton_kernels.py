"""Triton decode-step kernels (fused linear, decode attention) against plain PyTorch.

Without CUDA the kernels run in the Triton interpreter on CPU. TRITON_INTERPRET=1 must be set before
triton is first imported (triton's own library functions are decorated at its import), and a process
that imported triton that way cannot compile GPU kernels any more; so the variable is set only when
no GPU is present, and with a GPU the same tests run compiled on CUDA (plus bfloat16, which the
Triton 3.6 interpreter mishandles: on CPU only float32 and float16 are checked).
"""
import os
import sys

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
if DEV == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton / the kernels module is imported

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

_TRITON_PREIMPORTED = "triton" in sys.modules
triton = pytest.importorskip("triton")

import encdec_core.runtime.cuda.triton_kernels as tk  # noqa: E402

if DEV == "cpu" and not tk._interpreted(tk._fused_linear_kernel):
    if _TRITON_PREIMPORTED:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set: no interpreter",
                    allow_module_level=True)
    tk = importlib.reload(tk)  # the kernels module alone was imported earlier


def _restore_env():
    if _OLD_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET


# Keep the variable out of the rest of the session; set it again only while this module's tests run.
_restore_env()


@pytest.fixture(autouse=True, scope="module")
def _interpret_env():
    if DEV == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_env()


from encdec_core.layers.ffn import ACT  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def _norm_ref(x, norm):
    """encdec_core.layers.norm.Norm.forward, written out."""
    kind, w, b, eps = norm
    if kind == "rms":
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return w * y.to(w.dtype)
    return F.layer_norm(x.float(), (x.shape[-1],), w.float(), b.float() if b is not None else None,
                        eps).to(w.dtype)


def _linear_ref(x, weight, bias=None, *, norm=None, act=None, gated=False, residual=None,
                residual_norm=None, out_dtype=None):
    h = _norm_ref(x, norm) if norm is not None else x
    h = h.to(weight.dtype).double()
    y = h @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    fn = ACT[act] if act is not None else (lambda t: t)
    if gated:
        g, u = y.chunk(2, dim=-1)
        y = fn(g) * u
    else:
        y = fn(y)
    if residual is not None:
        r = _norm_ref(residual, residual_norm) if residual_norm is not None else residual
        y = r.double() + y
    return y.to(out_dtype or x.dtype)


def _check(out, ref, dtype):
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def _rand(*shape, dtype=torch.float32, scale=1.0, gen=None):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEV)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _norm_params(kind, n, dtype, g, bias=True):
    w = (1.0 + 0.3 * torch.randn(n, generator=g)).to(dtype)
    b = (0.1 * torch.randn(n, generator=g)).to(dtype) if (kind == "layer" and bias) else None
    w = w.to(DEV)
    b = b.to(DEV) if b is not None else None
    return (kind, w, b, 1e-6 if kind == "rms" else 1e-5)


# --------------------------------------------------------------------------------------------
# fused_linear
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 8])
def test_linear_plain_and_bias(dtype, M):
    g = _gen(M)
    K, N = 96, 100  # neither a multiple of the block sizes
    x = _rand(M, K, dtype=dtype, gen=g)
    w = _rand(N, K, dtype=dtype, scale=K ** -0.5, gen=g)
    b = _rand(N, dtype=dtype, gen=g)
    _check(tk.fused_linear(x, w), _linear_ref(x, w), dtype)
    _check(tk.fused_linear(x, w, b), _linear_ref(x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_linear_norm_prologue(dtype, kind, M):
    g = _gen(10 + M)
    K, N = 128, 64
    # fp32 residual stream (x) feeding half weights: the model's fp16 setup; x is a column slice
    big = _rand(M, K + 32, dtype=torch.float32, scale=3.0, gen=g) + 0.5
    x = big[:, 16:16 + K]
    assert x.stride(0) != K
    w = _rand(N, K, dtype=dtype, scale=K ** -0.5, gen=g)
    b = _rand(N, dtype=dtype, gen=g)
    norm = _norm_params(kind, K, dtype, g)
    out = tk.fused_linear(x, w, b, norm=norm, out_dtype=dtype)
    _check(out, _linear_ref(x, w, b, norm=norm, out_dtype=dtype), dtype)


def test_linear_layer_norm_without_bias_and_fp32_norm_weight():
    g = _gen(3)
    M, K, N = 3, 64, 48
    x = _rand(M, K, dtype=torch.float16, gen=g)
    w = _rand(N, K, dtype=torch.float16, scale=K ** -0.5, gen=g)
    norm = _norm_params("layer", K, torch.float32, g, bias=False)
    out = tk.fused_linear(x, w, norm=norm)
    _check(out, _linear_ref(x, w, norm=norm), torch.float16)


@pytest.mark.parametrize("act", sorted(a for a in tk.ACTIVATIONS if a is not None))
@pytest.mark.parametrize("gated", [False, True])
def test_linear_activations(act, gated):
    g = _gen(hash(act) % 1000 + gated)
    M, K, N = 3, 64, 40
    x = _rand(M, K, gen=g)
    w = _rand(2 * N if gated else N, K, scale=2.0 * K ** -0.5, gen=g)
    b = _rand(2 * N if gated else N, gen=g)
    out = tk.fused_linear(x, w, b, act=act, gated=gated)
    assert out.shape == (M, N)
    _check(out, _linear_ref(x, w, b, act=act, gated=gated), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 8])
def test_linear_gated_with_norm_fp16(dtype, M):
    g = _gen(20 + M)
    K, N = 64, 72
    x = _rand(M, K, gen=g)
    w = _rand(2 * N, K, dtype=dtype, scale=K ** -0.5, gen=g)
    norm = _norm_params("rms", K, dtype, g)
    out = tk.fused_linear(x, w, norm=norm, act="gelu_new", gated=True, out_dtype=dtype)
    _check(out, _linear_ref(x, w, norm=norm, act="gelu_new", gated=True, out_dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("res_kind", [None, "rms", "layer"])
@pytest.mark.parametrize("M", [1, 3])
def test_linear_residual(dtype, res_kind, M):
    g = _gen(30 + M)
    K, N = 64, 40
    x = _rand(M, K, dtype=dtype, gen=g)
    w = _rand(N, K, dtype=dtype, scale=K ** -0.5, gen=g)
    b = _rand(N, dtype=dtype, gen=g)
    residual = _rand(M, N, scale=2.0, gen=g) + 0.3  # fp32 residual stream
    rnorm = _norm_params(res_kind, N, dtype, g) if res_kind else None
    out = tk.fused_linear(x, w, b, residual=residual, residual_norm=rnorm, out_dtype=torch.float32)
    ref = _linear_ref(x, w, b, residual=residual, residual_norm=rnorm, out_dtype=torch.float32)
    _check(out, ref, dtype)
    # half residual, half output
    res_h = residual.to(dtype)
    out = tk.fused_linear(x, w, b, residual=res_h, residual_norm=rnorm)
    _check(out, _linear_ref(x, w, b, residual=res_h, residual_norm=rnorm), dtype)


def test_linear_full_lazy_post_ln_chain_into_strided_out():
    """Norm prologue + residual-norm epilogue together, written into a column slice of a buffer."""
    g = _gen(40)
    M, K = 3, 64
    dtype = torch.float16
    h = _rand(M, K, scale=2.0, gen=g)  # un-normalised post-LN stream (fp32)
    ln = _norm_params("layer", K, dtype, g)
    w = _rand(K, K, dtype=dtype, scale=K ** -0.5, gen=g)
    b = _rand(K, dtype=dtype, gen=g)
    buf = torch.full((M, 3 * K), 7.0, device=DEV)
    out = buf[:, K:2 * K]
    ret = tk.fused_linear(h, w, b, norm=ln, residual=h, residual_norm=ln, out=out)
    assert ret.data_ptr() == out.data_ptr()
    ref = _linear_ref(h, w, b, norm=ln, residual=h, residual_norm=ln, out_dtype=torch.float32)
    _check(out, ref, dtype)
    assert torch.all(buf[:, :K] == 7.0) and torch.all(buf[:, 2 * K:] == 7.0)


def test_linear_residual_in_place():
    g = _gen(41)
    M, K, N = 2, 32, 48
    x = _rand(M, K, gen=g)
    w = _rand(N, K, scale=K ** -0.5, gen=g)
    res = _rand(M, N, gen=g)
    ref = _linear_ref(x, w, residual=res)
    tk.fused_linear(x, w, residual=res, out=res)
    _check(res, ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_many_rows_dot_path(dtype):
    """M > 16: the tiled kernel (row tiles over a second grid axis, tl.dot)."""
    g = _gen(50)
    M, K, N = 20, 64, 48
    x = _rand(M, K, gen=g)
    w = _rand(N, K, dtype=dtype, scale=K ** -0.5, gen=g)
    b = _rand(N, dtype=dtype, gen=g)
    norm = _norm_params("rms", K, dtype, g)
    assert tk.linear_config(M, N, K)["USE_DOT"]
    out = tk.fused_linear(x, w, b, norm=norm, act="silu", residual=x[:, :N], out_dtype=dtype)
    ref = _linear_ref(x, w, b, norm=norm, act="silu", residual=x[:, :N], out_dtype=dtype)
    _check(out, ref, dtype)


@pytest.mark.parametrize("config,M", [
    (dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32), 3),  # tl.dot with M padded to 16
    (dict(BLOCK_N=4, BLOCK_K=16, UNROLL=False), 3),  # rolled K loop, several K chunks
    (dict(BLOCK_M=2, BLOCK_N=32, BLOCK_K=64, BLOCK_SK=16, BLOCK_SN=16, num_warps=2), 3),
    # large batches: wide tensor-core tiles, pipelined K loop, a partial last row tile
    (dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, UNROLL=False, num_stages=3), 40),
    (dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32, UNROLL=False, num_stages=2), 40),
])
def test_linear_config_overrides(config, M):
    """Gated layer-norm prologue and a normalised residual (the post-norm FFN) under each tiling."""
    g = _gen(60)
    K, N = 48, 40
    x = _rand(M, K, gen=g)
    w = _rand(2 * N, K, dtype=torch.float16, scale=K ** -0.5, gen=g)
    b = _rand(2 * N, dtype=torch.float16, gen=g)
    norm = _norm_params("layer", K, torch.float16, g)
    res = _rand(M, N, gen=g)
    rnorm = _norm_params("rms" if M < 16 else "layer", N, torch.float16, g)
    kw = dict(norm=norm, act="gelu", gated=True, residual=res, residual_norm=rnorm,
              out_dtype=torch.float32)
    out = tk.fused_linear(x, w, b, config=config, **kw)
    _check(out, _linear_ref(x, w, b, **kw), torch.float16)


def test_linear_default_config_heuristic():
    for N in (1024, 2048, 4096):
        cfg = tk.linear_config(1, N, 1024)
        assert -(-N // cfg["BLOCK_N"]) >= 128 and not cfg["USE_DOT"]
    for M in (3, 8, 16):  # tensor cores from three rows on
        cfg = tk.linear_config(M, 1024, 1024)
        assert cfg["USE_DOT"] and cfg["BLOCK_M"] == 16 and cfg["BLOCK_N"] == 16
    for M, bm in ((17, 32), (40, 64), (64, 64), (256, 64)):  # large batches: wide tiles, pipelined K loop
        cfg = tk.linear_config(M, 1024, 4096)
        assert cfg["USE_DOT"] and cfg["BLOCK_M"] == bm and cfg["BLOCK_N"] == 64 and cfg["BLOCK_K"] == 128
        assert not cfg["UNROLL"] and cfg["num_stages"] == 3 and cfg["BIG"]
    # with PDL a batch-1 program's whole weight slice is one chunk, <= 64 elements per thread
    for N, K, gated in ((3072, 1024, False), (1024, 4096, False), (2816, 1024, True), (50265, 1024, False)):
        cfg = tk.linear_config(1, N, K, gated, 2, pdl=True)
        assert cfg["BLOCK_K"] >= K and cfg["UNROLL"] and not cfg["USE_DOT"]
        assert cfg["BLOCK_N"] * cfg["BLOCK_K"] * (2 if gated else 1) <= 64 * 32 * cfg["num_warps"]
        assert tk.linear_config(1, N, K, gated, 2)["BLOCK_K"] == 512  # without PDL: 512-wide chunks


# the tiled kernel for many rows: split-K and producer-written norm statistics

_BIG = [dict(BIG=True, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1),
        dict(BIG=True, BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, SPLIT_K=4, num_stages=2),
        dict(BIG=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, SPLIT_K=2),
        dict(BIG=True, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8)]  # the lm_head's tiles


def _merge_stats(st, L):
    """Mean and variance of each row from fused_linear's partial statistics [M, tiles, 2]."""
    nt = st.shape[1]
    tile = 1
    while -(-L // tile) > nt:
        tile *= 2
    cnt = torch.tensor([min(tile, L - t * tile) for t in range(nt)], dtype=torch.float64, device=st.device)
    s, m2 = st[..., 0].double(), st[..., 1].double()
    mean = s.sum(1) / L
    var = (m2 + cnt * (s / cnt - mean[:, None]) ** 2).sum(1) / L
    return mean, var


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ci", range(len(_BIG)))
def test_big_linear_chain_with_split_k_and_stats(dtype, ci):
    """A post-norm chain on the tiled kernel: a residual producer returns its rows' partial norm
    statistics; the next GEMM's layer-norm prologue and the next residual norm merge them. Each
    result equals the reference, the statistics equal the output rows' mean / variance, and equal
    results come from the same kernels recomputing the statistics from the rows."""
    cfg = _BIG[ci]
    g = _gen(70 + ci)
    M, K, N = 40, 96, 100  # partial row tile, partial column tiles
    x = _rand(M, K, gen=g)
    h0 = _rand(M, N, scale=2.0, gen=g) + 0.4
    w1 = _rand(N, K, dtype=dtype, scale=K ** -0.5, gen=g)
    b1 = _rand(N, dtype=dtype, gen=g)
    ln = _norm_params("layer", N, dtype, g)
    w2 = _rand(2 * 72, N, dtype=dtype, scale=N ** -0.5, gen=g)
    w3 = _rand(N, 72, dtype=dtype, scale=72 ** -0.5, gen=g)
    counters = torch.zeros(64, dtype=torch.int32, device=DEV)
    # producer: out-projection + residual (fp32 stream), statistics of the stored rows
    h1, st = tk.fused_linear(x, w1, b1, residual=h0, out_dtype=torch.float32, config=cfg,
                             return_stats=True, counters=counters)
    _check(h1, _linear_ref(x, w1, b1, residual=h0, out_dtype=torch.float32), dtype)
    assert st.shape == (M, -(-N // cfg["BLOCK_N"]), 2) and st.dtype == torch.float32
    mean, var = _merge_stats(st, N)
    torch.testing.assert_close(mean, h1.double().mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, h1.double().var(1, unbiased=False), rtol=1e-5, atol=1e-5)
    # consumer: layer norm (from the statistics) + gated FFN-in
    f = tk.fused_linear(h1, w2, norm=ln, norm_stats=st, act="gelu_new", gated=True, out_dtype=dtype,
                        config=cfg, counters=counters)
    _check(f, _linear_ref(h1, w2, norm=ln, act="gelu_new", gated=True, out_dtype=dtype), dtype)
    f2 = tk.fused_linear(h1, w2, norm=ln, act="gelu_new", gated=True, out_dtype=dtype, config=cfg)
    torch.testing.assert_close(f.float(), f2.float(), **TOL[dtype])
    # FFN-out + the residual normalised with the producer's statistics, new statistics out
    h2, st2 = tk.fused_linear(f, w3, residual=h1, residual_norm=ln, residual_stats=st, out_dtype=torch.float32,
                              config=cfg, return_stats=True, counters=counters)
    _check(h2, _linear_ref(f, w3, residual=h1, residual_norm=ln, out_dtype=torch.float32), dtype)
    torch.testing.assert_close(_merge_stats(st2, N)[1], h2.double().var(1, unbiased=False), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(counters) == 0  # split-K leaves its counters zero for the next call


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [1, 2])
def test_big_linear_weight_tiles_by_tma(dtype, split):
    """W_TMA: the weight tiles through a tensor descriptor (zeros past K; a gated first half's tile
    past N reads gate rows, whose columns are masked): the same results as the pointer loads."""
    g = _gen(90 + split)
    M, K, N = 40, 88, 100  # K: 16-byte rows in every dtype; N and K not multiples of the tiles
    x = _rand(M, K, gen=g)
    w = _rand(2 * N, K, dtype=dtype, scale=K ** -0.5, gen=g)
    b = _rand(2 * N, dtype=dtype, gen=g)
    norm = _norm_params("layer", K, dtype, g)
    res = _rand(M, N, gen=g)
    cfg = dict(BIG=True, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, SPLIT_K=split, W_TMA=True)
    kw = dict(norm=norm, act="gelu", gated=True, residual=res, out_dtype=torch.float32)
    out = tk.fused_linear(x, w, b, config=cfg, **kw)
    _check(out, _linear_ref(x, w, b, **kw), dtype)
    plain = tk.fused_linear(x, w[:N].contiguous(), b[:N], config=cfg, out_dtype=torch.float32)
    _check(plain, _linear_ref(x, w[:N], b[:N], out_dtype=torch.float32), dtype)
    with pytest.raises(ValueError, match="W_TMA"):  # 90 half weights a row: 180 bytes
        tk.fused_linear(_rand(M, 90, gen=g), _rand(8, 90, dtype=torch.float16, gen=g), config=cfg)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_big_linear_rms_stats_and_bf16_stream(kind):
    """RMS statistics from the partials (the mean of squares), of a half-precision stream."""
    g = _gen(80)
    M, K, N = 24, 64, 64
    dtype = torch.float16
    x = _rand(M, K, dtype=dtype, gen=g)
    w = _rand(N, K, dtype=dtype, scale=K ** -0.5, gen=g)
    res = _rand(M, N, dtype=dtype, scale=3.0, gen=g)
    cfg = dict(BIG=True, BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, SPLIT_K=2)
    h, st = tk.fused_linear(x, w, residual=res, config=cfg, return_stats=True)
    norm = _norm_params(kind, N, dtype, g)
    w2 = _rand(48, N, dtype=dtype, scale=N ** -0.5, gen=g)
    out = tk.fused_linear(h, w2, norm=norm, norm_stats=st, config=cfg)
    _check(out, _linear_ref(h, w2, norm=norm), dtype)


def test_big_linear_default_config_and_small_path_stats():
    # bart-large at 64 rows: about 256 programs, splits of at least 128 columns
    for N, K, split in ((3072, 1024, 4), (1024, 1024, 8), (4096, 1024, 4), (1024, 4096, 8), (50265, 1024, 1)):
        cfg = tk.linear_config(64, N, K)
        assert cfg["BIG"] and cfg["SPLIT_K"] == split, (N, K, cfg)
    assert tk.linear_config(256, 1024, 4096)["SPLIT_K"] == 4
    assert tk.linear_config(64, 50265, 1024)["BLOCK_N"] == 128  # the lm_head: wide tiles, 8 warps
    assert tk.linear_config(256, 3072, 1024)["SPLIT_K"] == 1
    assert "BIG" not in tk.linear_config(16, 1024, 1024)
    # below 17 rows the small-batch kernel runs: no statistics, and given ones are ignored
    g = _gen(81)
    x = _rand(4, 32, gen=g)
    w = _rand(32, 32, scale=32 ** -0.5, gen=g)
    out, st = tk.fused_linear(x, w, residual=x, return_stats=True)
    assert st is None
    norm = _norm_params("rms", 32, torch.float32, g)
    bogus = torch.zeros(4, 2, 2, device=DEV)  # well formed, wrong values: must not be used
    _check(tk.fused_linear(out, w, norm=norm, norm_stats=bogus), _linear_ref(out, w, norm=norm), torch.float32)


def test_big_linear_rejects_bad_stats_and_counters():
    g = _gen(82)
    x = _rand(20, 32, gen=g)
    w = _rand(32, 32, scale=32 ** -0.5, gen=g)
    norm = _norm_params("rms", 32, torch.float32, g)
    cfg = dict(BIG=True, BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, SPLIT_K=2)
    with pytest.raises(ValueError, match="norm_stats"):
        tk.fused_linear(x, w, norm=norm, norm_stats=torch.zeros(20, 3, 2, device=DEV), config=cfg)
    with pytest.raises(ValueError, match="norm_stats"):
        tk.fused_linear(x, w, norm=norm, norm_stats=torch.zeros(20, 2, 2, dtype=torch.float64, device=DEV),
                        config=cfg)
    with pytest.raises(ValueError, match="counters"):
        tk.fused_linear(x, w, config=cfg, counters=torch.zeros(1, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="SPLIT_K"):
        tk.fused_linear(x, w, config=dict(cfg, SPLIT_K=3))


def test_linear_rejects_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError):
        tk.fused_linear(x, torch.randn(4, 9))
    with pytest.raises(ValueError):
        tk.fused_linear(x, torch.randn(4, 8), act="nope")
    with pytest.raises(ValueError):
        tk.fused_linear(x, torch.randn(4, 8), config=dict(BLOCK_Q=1))
    with pytest.raises(ValueError):
        tk.fused_linear(x.t(), torch.randn(4, 2))


# --------------------------------------------------------------------------------------------
# decode_attention
# --------------------------------------------------------------------------------------------


def _attn_ref(q, k, v, scale, bias=None):
    """q [B,H,D], k/v [B,H,T,D], bias broadcastable to [B,H,T]: fp32 softmax attention."""
    s = torch.einsum("bhd,bhtd->bht", q.float(), k.float()) * scale
    if bias is not None:
        s = s + bias.float()
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bht,bhtd->bhd", p, v.float()).to(q.dtype)


def _causal_table(Hb, T, g):
    rel = 0.5 * torch.randn(Hb, T, T, generator=g)
    causal = torch.triu(torch.full((T, T), torch.finfo(torch.float32).min), diagonal=1)
    return (rel + causal).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_val", [0, 5, 23])
@pytest.mark.parametrize("Hb", [None, 1, 3])
def test_self_attention(dtype, pos_val, Hb):
    g = _gen(70 + pos_val)
    B, H, T, D = 2, 3, 24, 16
    scale = D ** -0.5
    k_cache = _rand(B, H, T, D, dtype=dtype, gen=g)
    v_cache = _rand(B, H, T, D, dtype=dtype, gen=g)
    # q / k_new / v_new as strided views of a fused QKV projection output [B, 3*H*D]
    qkv = _rand(B, 3 * H * D, dtype=dtype, gen=g)
    q, k_new, v_new = (t.view(B, H, D) for t in qkv.split(H * D, dim=-1))
    table = _causal_table(Hb, T, g).to(dtype) if Hb else None
    pos = torch.tensor(pos_val, device=DEV)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_ref[:, :, pos_val] = k_new
    v_ref[:, :, pos_val] = v_new
    n = pos_val + 1
    bias = table[:, pos_val, :n].unsqueeze(0) if Hb else None
    ref = _attn_ref(q, k_ref[:, :, :n], v_ref[:, :, :n], scale, bias)

    out = tk.decode_attention(q, k_cache, v_cache, scale, pos=pos, k_new=k_new, v_new=v_new,
                              bias_table=table)
    assert out.shape == (B, H, D) and out.dtype == dtype
    _check(out, ref, dtype)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)  # row pos written, rest kept


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_self_attention_row_index(idx_dtype):
    """Cache indirection (beam search): key position t of query row b comes from cache row
    row_index[b, t]; the new K/V row is still written at row b, position pos."""
    g = _gen(75)
    B, H, T, D, pos_val = 3, 2, 20, 16, 13
    k_cache = _rand(B, H, T, D, gen=g)
    v_cache = _rand(B, H, T, D, gen=g)
    q, k_new, v_new = (_rand(B, H, D, gen=g) for _ in range(3))
    table = _causal_table(H, T, g)
    idx = torch.randint(0, B, (B, T + 4), generator=g).to(device=DEV, dtype=idx_dtype)  # wider than T
    pos = torch.tensor(pos_val, device=DEV)
    n = pos_val + 1
    rows = idx[:, :pos_val].long()  # [B, pos]
    t = torch.arange(pos_val, device=DEV)
    k_g = k_cache[rows, :, t].permute(0, 2, 1, 3)  # [B, H, pos, D]: k_cache[idx[b, t], :, t]
    v_g = v_cache[rows, :, t].permute(0, 2, 1, 3)
    k_ref = torch.cat([k_g, k_new.unsqueeze(2)], 2)
    v_ref = torch.cat([v_g, v_new.unsqueeze(2)], 2)
    ref = _attn_ref(q, k_ref, v_ref, D ** -0.5, table[:, pos_val, :n].unsqueeze(0))
    k_want = k_cache.clone()
    k_want[:, :, pos_val] = k_new
    out = tk.decode_attention(q, k_cache, v_cache, D ** -0.5, pos=pos, k_new=k_new, v_new=v_new,
                              bias_table=table, row_index=idx)
    _check(out, ref, torch.float32)
    assert torch.equal(k_cache, k_want)
    with pytest.raises(ValueError, match="row_index"):
        tk.decode_attention(q, k_cache, v_cache, 0.25, pos=pos, k_new=k_new, v_new=v_new,
                            row_index=idx[:, :4])
    with pytest.raises(ValueError, match="row_index"):
        tk.decode_attention(q, k_cache, v_cache, 0.25, row_index=idx)  # cross-attention


def test_self_attention_ignores_stale_rows_and_writes_into_out():
    g = _gen(80)
    B, H, T, D = 1, 2, 40, 32
    k_cache = _rand(B, H, T, D, gen=g)
    v_cache = _rand(B, H, T, D, gen=g)
    k_cache[:, :, 10:] = float("nan")  # rows after pos must never be touched by the softmax
    v_cache[:, :, 10:] = float("nan")
    q, k_new, v_new = (_rand(B, H, D, gen=g) for _ in range(3))
    out_buf = torch.zeros(B, 2 * H, D, device=DEV)
    out = out_buf[:, ::2]
    pos = torch.tensor(9, device=DEV)
    ref_k, ref_v = k_cache[:, :, :10].clone(), v_cache[:, :, :10].clone()
    ref_k[:, :, 9], ref_v[:, :, 9] = k_new, v_new
    ref = _attn_ref(q, ref_k, ref_v, 0.3)
    tk.decode_attention(q, k_cache, v_cache, 0.3, pos=pos, k_new=k_new, v_new=v_new, out=out)
    _check(out, ref, torch.float32)
    assert torch.all(out_buf[:, 1::2] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 24])
def test_cross_attention_key_bias(dtype, D):
    g = _gen(90 + D)
    B, H, T = 3, 2, 20
    scale = 1.0
    q = _rand(B, H, D, dtype=dtype, scale=0.3, gen=g)
    k = _rand(B, H, T, D, dtype=dtype, gen=g)
    v = _rand(B, H, T, D, dtype=dtype, gen=g)
    lo = torch.finfo(dtype).min
    key_bias = torch.zeros(B, T, dtype=dtype, device=DEV)
    key_bias[1, 13:] = lo  # padding
    key_bias[2, :] = lo  # fully masked row: torch gives uniform weights
    out = tk.decode_attention(q, k, v, scale, key_bias=key_bias)
    ref = _attn_ref(q, k, v, scale, key_bias[:, None, :])
    assert torch.isfinite(out.float()).all()
    _check(out, ref, dtype)
    # and without any bias
    _check(tk.decode_attention(q, k, v, scale), _attn_ref(q, k, v, scale), dtype)


@pytest.mark.parametrize("B,G", [(8, 4), (7, 3)])
def test_cross_attention_shared_by_groups(B, G):
    """kv_group: query row b reads cache and key-bias row b // G (a request's beams share one
    copy of its cross K/V), also when G does not divide B (the last group is partial)."""
    g = _gen(95 + G)
    H, T, D = 2, 20, 16
    rows = -(-B // G)
    q = _rand(B, H, D, gen=g)
    k = _rand(rows, H, T, D, gen=g)
    v = _rand(rows, H, T, D, gen=g)
    key_bias = torch.zeros(rows, T, device=DEV)
    key_bias[1, 11:] = float("-inf")
    src = torch.arange(B, device=DEV) // G
    ref = _attn_ref(q, k[src], v[src], 0.5, key_bias[src][:, None, :])
    _check(tk.decode_attention(q, k, v, 0.5, key_bias=key_bias, kv_group=G), ref, torch.float32)
    with pytest.raises(ValueError, match="kv_group"):
        tk.decode_attention(q, k[: rows - 1], v[: rows - 1], 0.5, kv_group=G)  # too few cache rows
    with pytest.raises(ValueError, match="kv_group"):
        tk.decode_attention(q, k, v, 0.5, kv_group=0)
    pos = torch.tensor(3, device=DEV)
    with pytest.raises(ValueError, match="kv_group"):  # self-attention rows are never shared
        tk.decode_attention(q, k, v, 0.5, pos=pos, k_new=q, v_new=q, kv_group=G)


def test_attention_default_config_by_batch():
    """2 warps above 16 query rows (more programs resident), 4 up to 16; key tiles unchanged."""
    small, big = tk.attention_config(64, 128, False, batch=16), tk.attention_config(64, 128, False, batch=64)
    assert small["num_warps"] == 4 and big["num_warps"] == 2 and small["BLOCK_T"] == big["BLOCK_T"] == 128
    assert tk.attention_config(64, None, True)["num_warps"] == 4
    # above 64 rows: 1 warp, 16-key self-attention tiles, 32-key cross tiles (16 for a short source)
    assert tk.ATTN_SMALL_TILE_ROWS == 64
    # self-attention above 32 rows: 32-key tiles, 1 warp (cross-attention keeps its one 128-key tile)
    assert tk.ATTN_SELF_MID_ROWS == 32
    assert tk.attention_config(64, 80, True, batch=32) == dict(BLOCK_T=64, num_warps=2)
    assert tk.attention_config(64, 80, True, batch=64) == dict(BLOCK_T=32, num_warps=1)
    assert tk.attention_config(64, 128, False, batch=64) == dict(BLOCK_T=128, num_warps=2)
    assert tk.attention_config(64, 80, True, batch=65) == dict(BLOCK_T=16, num_warps=1)
    assert tk.attention_config(64, 128, False, batch=256) == dict(BLOCK_T=32, num_warps=1)
    assert tk.attention_config(64, 9, False, batch=256) == dict(BLOCK_T=16, num_warps=1)


@pytest.mark.parametrize("B", [40, 65])
def test_attention_default_config_above_64_rows_is_exact(B):
    """The defaults above 32 / 64 rows (several key tiles per program) against the fp32 reference:
    self-attention with a bias table at a position past the first tile, cross-attention with a
    source that is not a multiple of the tile and a key bias."""
    g = _gen(101)
    H, T, D, pos_val, S = 2, 40, 16, 37, 45
    scale = D ** -0.5
    k_cache, v_cache = _rand(B, H, T, D, gen=g), _rand(B, H, T, D, gen=g)
    q, k_new, v_new = (_rand(B, H, D, gen=g) for _ in range(3))
    table = _causal_table(H, T, g)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_ref[:, :, pos_val], v_ref[:, :, pos_val] = k_new, v_new
    n = pos_val + 1
    ref = _attn_ref(q, k_ref[:, :, :n], v_ref[:, :, :n], scale, table[:, pos_val, :n].unsqueeze(0))
    out = tk.decode_attention(q, k_cache, v_cache, scale, pos=torch.tensor(pos_val, device=DEV),
                              k_new=k_new, v_new=v_new, bias_table=table)
    _check(out, ref, torch.float32)
    kc, vc = _rand(B, H, S, D, gen=g), _rand(B, H, S, D, gen=g)
    kb = torch.where(torch.rand(B, S, generator=g) < 0.2, -1e9, 0.0).to(DEV)
    kb[:, 0] = 0.0
    _check(tk.decode_attention(q, kc, vc, scale, key_bias=kb), _attn_ref(q, kc, vc, scale, kb[:, None, :]),
           torch.float32)


def test_attention_block_t_override_and_all_minus_inf_is_finite():
    g = _gen(100)
    B, H, T, D = 1, 2, 37, 16
    q = _rand(B, H, D, gen=g)
    k = _rand(B, H, T, D, gen=g)
    v = _rand(B, H, T, D, gen=g)
    out = tk.decode_attention(q, k, v, 0.25, config=dict(BLOCK_T=16, num_warps=2))
    _check(out, _attn_ref(q, k, v, 0.25), torch.float32)
    kb = torch.full((B, T), float("-inf"), device=DEV)
    out = tk.decode_attention(q, k, v, 0.25, key_bias=kb)
    assert torch.isfinite(out).all()


def test_attention_rejects_bad_input():
    q = torch.randn(1, 2, 8)
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError):
        tk.decode_attention(q, k, k, 1.0, pos=torch.tensor(1))  # no k_new / v_new
    with pytest.raises(ValueError):
        tk.decode_attention(q, k, k, 1.0, bias_table=torch.zeros(1, 4, 4))  # table needs pos
    with pytest.raises(ValueError):
        tk.decode_attention(q, torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), 1.0)


# --------------------------------------------------------------------------------------------
# row_topk (beam search's candidates)
# --------------------------------------------------------------------------------------------


def _topk_ref(x, k):
    """The k largest per row, equal values lowest index first (a stable descending sort)."""
    v, i = torch.sort(x.float(), dim=1, descending=True, stable=True)
    return v[:, :k].to(x.dtype), i[:, :k]


@pytest.mark.parametrize("R,N,k,chunk", [(3, 1000, 8, 256), (2, 5000, 8, None), (4, 37, 5, None), (2, 9, 9, 16),
                                         (1, 700, 1, 64)])
def test_row_topk_matches_a_stable_sort(R, N, k, chunk):
    """Values and indices of torch.topk, ties broken towards the lower index, through -inf columns
    and across chunks (a partial last chunk included)."""
    g = _gen(200 + N)
    x = _rand(R, N, gen=g)
    x[0, ::7] = -float("inf")
    if R > 1:
        x[1, 3] = x[1, N // 2] = 10.0  # a tie at the top, in two chunks
        x[1, 4] = x[1, N - 1] = -3.5  # a tie further down
    v, i = tk.row_topk(x, k, chunk)
    rv, ri = _topk_ref(x, k)
    assert v.dtype == x.dtype and i.dtype == torch.int64
    assert torch.equal(v, rv) and torch.equal(i, ri)
    if DEV == "cuda":  # where values are distinct, exactly torch.topk's answer
        y = torch.randn(R, N, device=DEV)
        tv, ti = torch.topk(y, k)
        mv, mi = tk.row_topk(y, k, chunk)
        assert torch.equal(mv, tv) and torch.equal(mi, ti)


def test_row_topk_all_minus_inf_and_half_input():
    x = torch.full((2, 300), -float("inf"), device=DEV)
    x[0, 5] = 1.0
    v, i = tk.row_topk(x, 4, 64)  # -inf columns are real candidates, in index order
    assert i.tolist() == [[5, 0, 1, 2], [0, 1, 2, 3]]
    assert v[0, 0].item() == 1.0 and torch.isinf(v[:, 1:]).all()
    h = _rand(3, 130, dtype=torch.float16, gen=_gen(210))
    hv, hi = tk.row_topk(h, 6)
    rv, ri = _topk_ref(h, 6)
    assert hv.dtype == torch.float16 and torch.equal(hv, rv) and torch.equal(hi, ri)


def test_row_topk_rejects_bad_input():
    x = torch.randn(2, 10, device=DEV)
    with pytest.raises(ValueError, match="k=11"):
        tk.row_topk(x, 11)
    with pytest.raises(ValueError, match="chunk"):
        tk.row_topk(x, 4, chunk=24)
    with pytest.raises(ValueError, match="last-dim stride"):
        tk.row_topk(x.t(), 1)


def test_beam_update_with_row_topk_equals_torch_topk():
    """BeamState.update with the Triton top-k (beam search's hook) keeps the same beams, scores and
    finished hypotheses as with torch.topk over several steps (EOS ends some)."""
    from types import SimpleNamespace

    from encdec_core.runtime.beam import BeamState
    from encdec_core.runtime.generation import GenerationConfig

    cfg = SimpleNamespace(decoder_start_token_id=0, eos_token_id=2, pad_token_id=1, bos_token_id=None,
                          forced_bos_token_id=None, forced_eos_token_id=None)
    gc = GenerationConfig.from_model(cfg, None, num_beams=4, max_new_tokens=6)
    b, nb, V = 3, 4, 300
    states = []
    for topk in (torch.topk, tk.row_topk):
        st = BeamState(gc, b, 8, 1, DEV)
        st.topk = topk
        st.reset(torch.zeros(b * nb, 1, dtype=torch.long, device=DEV))
        states.append(st)
    g = _gen(220)
    for step in range(5):
        logp = torch.log_softmax(torch.randn(b * nb, V, generator=g) * 3, dim=-1).to(DEV)
        logp[:, 2] += 8.0 if step >= 2 else 0.0  # EOS likely from step 2: hypotheses finish
        cur = torch.tensor(step + 1, device=DEV)
        for st in states:
            st.update(logp, cur)
        a, c = states
        for name in ("run_seq", "run_score", "fin_seq", "fin_score", "fin_done", "fin_len", "src_index"):
            assert torch.equal(getattr(a, name), getattr(c, name)), (step, name)
    assert states[0].fin_done.any()  # the comparison covered finished hypotheses


# --------------------------------------------------------------------------------------------
# programmatic dependent launch
# --------------------------------------------------------------------------------------------


def _pdl_chain(pdl, M, dtype, layers, g_seed=120, graph=False):
    """A decoder-like chain in which every kernel reads what the kernel just before it wrote:
    norm+QKV GEMV -> self-attention (writes its cache row) -> out-proj + residual (in place) ->
    norm+gated FFN -> FFN-out + residual. Returns the final stream and the caches. Above 16 rows
    the GEMMs are the tiled kernel with split-K and the norms read the producers' statistics."""
    g = _gen(g_seed)
    H, D = 4, 32
    K = H * D
    F_ = 3 * K
    T = 16
    ws = []
    for _ in range(layers):
        ws.append(dict(
            qkv=_rand(3 * K, K, dtype=dtype, scale=K ** -0.5, gen=g),
            o=_rand(K, K, dtype=dtype, scale=K ** -0.5, gen=g),
            wi=_rand(2 * F_, K, dtype=dtype, scale=K ** -0.5, gen=g),
            wo=_rand(K, F_, dtype=dtype, scale=F_ ** -0.5, gen=g),
            norm=_norm_params("rms", K, dtype, g)))
    x0 = _rand(M, K, gen=g)
    kc0 = _rand(layers, M, H, T, D, dtype=dtype, gen=g)
    vc0 = _rand(layers, M, H, T, D, dtype=dtype, gen=g)
    x, kc, vc = x0.clone(), kc0.clone(), vc0.clone()
    pos = torch.tensor(5, device=DEV)
    # many rows: the tiled kernel with split-K, the norms from the producers' statistics
    cfg = dict(BIG=True, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2) if M > 16 else None

    def run():
        x.copy_(x0)
        kc.copy_(kc0)
        vc.copy_(vc0)
        st = None
        for li, w in enumerate(ws):
            qkv = tk.fused_linear(x, w["qkv"], norm=w["norm"], norm_stats=st, out_dtype=dtype, pdl=pdl, config=cfg)
            q, kn, vn = (t.view(M, H, D) for t in qkv.split(K, dim=-1))
            o = tk.decode_attention(q, kc[li], vc[li], D ** -0.5, pos=pos, k_new=kn, v_new=vn, pdl=pdl)
            # x was written three kernels back: its read may go before the wait (residual_ready);
            # the FFN-out below reads its residual after the wait (the default)
            _, st = tk.fused_linear(o.view(M, K), w["o"], residual=x, out=x, pdl=pdl, residual_ready=True,
                                    config=cfg, return_stats=True)
            h = tk.fused_linear(x, w["wi"], norm=w["norm"], norm_stats=st, act="gelu_new", gated=True,
                                out_dtype=dtype, pdl=pdl, config=cfg)
            _, st = tk.fused_linear(h, w["wo"], residual=x, out=x, pdl=pdl, config=cfg, return_stats=True)

    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run()  # compile outside the capture
        torch.cuda.current_stream().wait_stream(s)
        cg = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cg):
            run()
        x.zero_()
        for _ in range(3):
            cg.replay()
        torch.cuda.synchronize()
    else:
        run()
    return x.clone(), kc.clone(), vc.clone()


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="programmatic dependent launch needs a compiled GPU kernel")
@pytest.mark.parametrize("M", [1, 4, 12, 40])
@pytest.mark.parametrize("graph", [False, True])
def test_pdl_chain_equals_plain_launch(M, graph):
    """With PDL every kernel starts early and waits for its predecessor before reading its output:
    a chain of dependent kernels (eager, and replayed in a CUDA graph) gives bit-identical results."""
    if not tk.pdl_supported(DEV):
        pytest.skip("GPU older than Hopper (or ENCDEC_PDL=0): no programmatic dependent launch")
    for dtype in (torch.float32, torch.bfloat16):
        ref = _pdl_chain(False, M, dtype, layers=3, graph=graph)
        got = _pdl_chain(True, M, dtype, layers=3, graph=graph)
        for a, b in zip(ref, got):
            assert torch.equal(a, b)


def test_pdl_flag_is_ignored_where_unsupported(monkeypatch):
    """pdl=True on CPU (the interpreter), or with ENCDEC_PDL=0, runs the plain launch."""
    monkeypatch.setenv("ENCDEC_PDL", "0")
    assert not tk.pdl_supported(DEV)
    g = _gen(130)
    x = _rand(2, 32, gen=g)
    w = _rand(40, 32, scale=32 ** -0.5, gen=g)
    _check(tk.fused_linear(x, w, pdl=True), _linear_ref(x, w), torch.float32)
    q, k, v = _rand(1, 2, 16, gen=g), _rand(1, 2, 8, 16, gen=g), _rand(1, 2, 8, 16, gen=g)
    _check(tk.decode_attention(q, k, v, 0.25, pdl=True), _attn_ref(q, k, v, 0.25), torch.float32)
    monkeypatch.delenv("ENCDEC_PDL")
    if DEV == "cpu":
        assert not tk.pdl_supported("cpu")
