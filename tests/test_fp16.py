"""fp16 safety (issue 2 item 10): T5 in float16 must not overflow to inf/NaN.

T5 v1.1's FFN output (wo) and its pre-norm residual stream grow past fp16's max (65504). The
core keeps a pre-norm residual stream in fp32 (Stack.residual_dtype), scales RowLinear's input by
2**-8 before the fp16 matmul and returns its output in fp32 (layers/linear.py). Here a tiny T5 v1.1
has its wo weights scaled up so that, in fp32, the FFN outputs and the residual reach ~8e4: a naive
fp16 path overflows, ours stays finite and close to fp32.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from encdec_core.convert import load_source_model  # noqa: E402
from encdec_core.layers import linear as linear_mod  # noqa: E402
from encdec_core.model import Stack  # noqa: E402
from encdec_core.parallel.context import ParallelContext  # noqa: E402

FP16_MAX = 65504.0
WO_SCALE = 30000.0  # weights still fit fp16 (max |w| ~ 2e4); activations do not


@pytest.fixture(scope="module")
def overflowing_t5(tmp_path_factory):
    """A T5 v1.1 (gated-gelu, untied lm_head, real layout) whose FFN outputs exceed fp16's range."""
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                relative_attention_num_buckets=8, relative_attention_max_distance=16)
    torch.manual_seed(0)
    m = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("DenseReluDense.wo.weight"):
                p.mul_(WO_SCALE)
        m.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model) * 0.3)
    tied = dict(m.all_tied_weights_keys)
    tied.pop("lm_head.weight", None)
    m.all_tied_weights_keys = tied
    d = tmp_path_factory.mktemp("t5_fp16")
    m.save_pretrained(d)
    data = json.loads((d / "config.json").read_text())
    data["tie_word_embeddings"] = False
    data.pop("scale_decoder_outputs", None)
    (d / "config.json").write_text(json.dumps(data))
    from conftest import make_registry

    reg = make_registry("encdec_t5.plugin")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    dec = torch.randint(3, 64, (2, 6), generator=g)
    dec[:, 0] = 0
    ref = transformers.AutoModelForSeq2SeqLM.from_pretrained(d, dtype=torch.float32).eval()
    return d, reg, ref, (ids, mask, dec)


def _hf(ref, ids, mask, dec, **kw):
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, **kw)


def test_premise_fp32_activations_exceed_fp16_range(overflowing_t5):
    d, reg, ref, (ids, mask, dec) = overflowing_t5
    out = _hf(ref, ids, mask, dec, output_hidden_states=True)
    enc_max = max(h.abs().max().item() for h in out.encoder_hidden_states[:-1])
    dec_max = max(h.abs().max().item() for h in out.decoder_hidden_states[:-1])
    assert enc_max > FP16_MAX, enc_max
    assert dec_max > 0.5 * FP16_MAX, dec_max
    w = max(p.abs().max().item() for n, p in ref.named_parameters())
    assert w < FP16_MAX / 2  # the weights themselves are representable: only activations overflow


def test_ours_fp16_finite_and_close_to_fp32(overflowing_t5):
    d, reg, ref, (ids, mask, dec) = overflowing_t5
    want = _hf(ref, ids, mask, dec).logits
    ours16, _, _ = load_source_model(d, dtype=torch.float16, reg=reg)
    with torch.no_grad():
        got = ours16(ids, mask, dec)
    assert torch.isfinite(got).all()
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= 1e-2 * scale, f"fp16 max|diff| {err:.3g} vs logits scale {scale:.3g}"
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # incremental decoding in fp16 stays finite too (the KV cache is fp16; the residual is not)
    with torch.no_grad():
        enc = ours16.encode(ids, mask)
        assert enc.dtype == torch.float16 and torch.isfinite(enc).all()
        state = ours16.init_state(enc, mask, dec.shape[1])
        steps = torch.cat([ours16.decode(dec[:, t:t + 1], state) for t in range(dec.shape[1])], 1)
    assert torch.isfinite(steps).all()
    assert (steps - got).abs().max().item() <= 1e-2 * scale


def test_naive_fp16_paths_overflow(overflowing_t5, monkeypatch):
    """The same model with the two safety measures switched off goes inf/NaN; HF's half() model,
    which clamps overflowing hidden states to finfo.max - 1000, stays finite but is far less
    accurate than ours."""
    d, reg, ref, (ids, mask, dec) = overflowing_t5
    want = _hf(ref, ids, mask, dec).logits
    scale = want.abs().max().item()

    def naive_row(self, x):  # a plain fp16 matmul, result kept in fp16
        y = F.linear(x, self.weight)
        return y if self.bias is None else y + self.bias

    with monkeypatch.context() as mp:
        mp.setattr(linear_mod.RowLinear, "forward", naive_row)
        mp.setattr(Stack, "residual_dtype", property(lambda self: self.dtype))
        naive, _, _ = load_source_model(d, dtype=torch.float16, reg=reg)
        with torch.no_grad():
            bad = naive(ids, mask, dec)
    assert not torch.isfinite(bad).all(), "a naive fp16 path was expected to overflow"

    hf16 = transformers.AutoModelForSeq2SeqLM.from_pretrained(d, dtype=torch.float32).eval().half()
    hf_err = (_hf(hf16, ids, mask, dec).logits.float() - want).abs().max().item()
    ours16, _, _ = load_source_model(d, dtype=torch.float16, reg=reg)
    with torch.no_grad():
        our_err = (ours16(ids, mask, dec) - want).abs().max().item()
    assert our_err * 5 < hf_err, f"ours {our_err:.3g} vs HF half() {hf_err:.3g} (scale {scale:.3g})"


def test_bf16_close_to_fp32(overflowing_t5):
    d, reg, ref, (ids, mask, dec) = overflowing_t5
    want = _hf(ref, ids, mask, dec).logits
    ours, _, _ = load_source_model(d, dtype=torch.bfloat16, reg=reg)
    with torch.no_grad():
        got = ours(ids, mask, dec)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= 6e-2 * want.abs().max().item()


def test_row_linear_scales_fp16_input():
    """RowLinear: a product that overflows a plain fp16 matmul comes back finite, in fp32, exact
    up to fp16 rounding; bf16/fp32 inputs take the plain path."""
    torch.manual_seed(0)
    layer = linear_mod.RowLinear(64, 8, True, ParallelContext()).half()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(8, 64) * 60 + 20)  # all positive, up to 80
        layer.bias.copy_(torch.randn(8))
    x = (torch.rand(3, 64) * 30 + 20).half()  # row sums ~ 64 * 40 * 50 = 1.3e5 > 65504
    ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert ref.abs().max() > FP16_MAX
    assert not torch.isfinite(F.linear(x, layer.weight, layer.bias)).all()  # the naive product overflows
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert ((y - ref).abs() / ref.abs()).max().item() < 2e-3
    assert linear_mod._FP16_SCALE == 2.0 ** -8
