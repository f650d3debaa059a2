"""fp32 CPU inference with oneDNN-packed weights: used by generation, same results, never stale."""
from __future__ import annotations

import pytest
import torch

from test_cuda_runner import _gc, _inputs, _tiny


def _packed_layers(model):
    from encdec_core.layers.linear import ColumnLinear, RowLinear

    mods = [m for m in model.modules() if isinstance(m, (ColumnLinear, RowLinear))] + [model.output_embedding]
    return [m for m in mods if m._packed is not None]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_generation_packs_weights_and_matches_unpacked(monkeypatch):
    from encdec_core.runtime.generation import generate

    model = _tiny("t5", "cpu")
    ids, mask = _inputs(model.cfg, device="cpu")
    gc = _gc(model.cfg, max_new_tokens=12, num_beams=3)
    monkeypatch.setenv("ENCDEC_CPU_PACK", "0")
    plain = generate(model, ids, mask, gc)
    assert _packed_layers(model) == []
    monkeypatch.setenv("ENCDEC_CPU_PACK", "1")
    packed = generate(model, ids, mask, gc)
    n_linear = sum(1 for _ in _packed_layers(model))
    assert n_linear >= 2 * 6 + 1  # every layer's linears and the lm_head
    assert torch.equal(packed.sequences, plain.sequences)
    torch.testing.assert_close(packed.sequences_scores, plain.sequences_scores, rtol=1e-5, atol=1e-5)
    # the packed product is the linear's product
    lin = model.decoder.layers["0"].ffn.wi
    x = torch.randn(5, lin.weight.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_packed_weight_is_never_stale():
    model = _tiny("bart", "cpu")
    assert model.pack_cpu_weights() > 0
    assert model.pack_cpu_weights() == 0  # idempotent
    lin = model.decoder.layers["0"].self_attn.qkv
    x = torch.randn(2, lin.weight.shape[1])
    with torch.no_grad():
        lin.weight.mul_(2.0)  # changed in place after packing (like load_state_dict)
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert model.pack_cpu_weights() == 1  # re-packs just that one
    with torch.enable_grad():  # training / autograd: the plain path
        y = lin(x.requires_grad_())
        assert y.requires_grad
