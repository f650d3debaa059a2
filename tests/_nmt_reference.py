"""An independent, deliberately plain reference of a fairseq transformer's forward pass.

Written from fairseq's documented semantics (fairseq/models/transformer, modules/transformer_layer,
multihead_attention, sinusoidal/learned positional embedding), reading the fairseq state dict by
its own key names. It shares no code with encdec: its own sinusoid, positions, attention, layer
order. Sources are LEFT-padded here, as fairseq batches them (encdec right-pads).

    x = embed_scale * E[tokens] + P[positions]      positions: cumsum(tok != pad) * (tok != pad) + pad
    x = layernorm_embedding(x)                      if layernorm_embedding
    each sub-layer:  pre-LN:  x = x + f(LN(x))      post-LN: x = LN(x + f(x))
    attention: q = (x Wq + bq) * head_dim**-0.5; softmax(q k^T + mask) v; out_proj
    final LN after the stack                        if normalize_before (and a version >= 2/3 stack)
    logits = x W_out^T
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PAD = 1


def ref_sinusoid(num: int, dim: int, pad: int) -> torch.Tensor:
    half = dim // 2
    step = math.log(10000.0) / (half - 1)
    inv = torch.exp(-step * torch.arange(half, dtype=torch.float64))
    ang = torch.arange(num, dtype=torch.float64)[:, None] * inv[None, :]
    t = torch.cat([ang.sin(), ang.cos()], dim=1)
    if dim % 2:
        t = torch.cat([t, torch.zeros(num, 1, dtype=torch.float64)], dim=1)
    t[pad] = 0.0
    return t.float()


def ref_positions(tokens: torch.Tensor) -> torch.Tensor:
    nonpad = (tokens != PAD).long()
    return torch.cumsum(nonpad, 1) * nonpad + PAD


def _ln(st, prefix, x):
    return F.layer_norm(x, (x.shape[-1],), st[f"{prefix}.weight"], st[f"{prefix}.bias"], 1e-5)


def _lin(st, prefix, x):
    return x @ st[f"{prefix}.weight"].t() + st[f"{prefix}.bias"]


def _act(name):
    return {"relu": F.relu, "gelu": F.gelu, "gelu_accurate": lambda x: F.gelu(x, approximate="tanh"),
            "gelu_fast": lambda x: F.gelu(x, approximate="tanh"), "tanh": torch.tanh}[name]


def _mha(st, prefix, x, mem, heads, key_pad=None, causal=False):
    b, tq, d = x.shape
    tk = mem.shape[1]
    hd = d // heads
    q = _lin(st, f"{prefix}.q_proj", x) * hd ** -0.5
    k = _lin(st, f"{prefix}.k_proj", mem)
    v = _lin(st, f"{prefix}.v_proj", mem)
    q = q.view(b, tq, heads, hd).transpose(1, 2)
    k = k.view(b, tk, heads, hd).transpose(1, 2)
    v = v.view(b, tk, heads, hd).transpose(1, 2)
    s = q @ k.transpose(-1, -2)
    if key_pad is not None:
        s = s.masked_fill(key_pad[:, None, None, :], float("-inf"))
    if causal:
        s = s.masked_fill(torch.ones(tq, tk, dtype=torch.bool).triu(1), float("-inf"))
    a = torch.softmax(s, dim=-1) @ v
    return _lin(st, f"{prefix}.out_proj", a.transpose(1, 2).reshape(b, tq, d))


def _sub(st, x, ln_prefix, pre, f):
    if pre:
        return x + f(_ln(st, ln_prefix, x))
    return _ln(st, ln_prefix, x + f(x))


def _embed(st, o, side, tokens):
    d = o["encoder_embed_dim"]
    scale = 1.0 if o.get("no_scale_embedding") else math.sqrt(d)
    x = scale * st[f"{side}.embed_tokens.weight"][tokens]
    pos = ref_positions(tokens)
    if o.get("encoder_learned_pos"):
        x = x + st[f"{side}.embed_positions.weight"][pos]
    else:
        x = x + ref_sinusoid(int(pos.max()) + 1, d, PAD)[pos]
    if o.get("layernorm_embedding"):
        x = _ln(st, f"{side}.layernorm_embedding", x)
    return x


@torch.no_grad()
def ref_forward(st: dict, o: dict, src_tokens: torch.Tensor, prev_output_tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits [B, T, V]; ``src_tokens`` left-padded with PAD."""
    act = _act(o["activation_fn"])
    enc_pad = src_tokens == PAD
    x = _embed(st, o, "encoder", src_tokens)
    pre = bool(o.get("encoder_normalize_before"))
    for i in range(o["encoder_layers"]):
        p = f"encoder.layers.{i}"
        x = _sub(st, x, f"{p}.self_attn_layer_norm", pre,
                 lambda h: _mha(st, f"{p}.self_attn", h, h, o["encoder_attention_heads"], enc_pad))
        x = _sub(st, x, f"{p}.final_layer_norm", pre,
                 lambda h: _lin(st, f"{p}.fc2", act(_lin(st, f"{p}.fc1", h))))
    if "encoder.layer_norm.weight" in st:
        x = _ln(st, "encoder.layer_norm", x)
    enc = x
    y = _embed(st, o, "decoder", prev_output_tokens)
    pre = bool(o.get("decoder_normalize_before"))
    for i in range(o["decoder_layers"]):
        p = f"decoder.layers.{i}"
        y = _sub(st, y, f"{p}.self_attn_layer_norm", pre,
                 lambda h: _mha(st, f"{p}.self_attn", h, h, o["decoder_attention_heads"], causal=True))
        y = _sub(st, y, f"{p}.encoder_attn_layer_norm", pre,
                 lambda h: _mha(st, f"{p}.encoder_attn", h, enc, o["decoder_attention_heads"], enc_pad))
        y = _sub(st, y, f"{p}.final_layer_norm", pre,
                 lambda h: _lin(st, f"{p}.fc2", act(_lin(st, f"{p}.fc1", h))))
    if "decoder.layer_norm.weight" in st:
        y = _ln(st, "decoder.layer_norm", y)
    return y @ st["decoder.output_projection.weight"].t()


def left_pad(seqs: list[list[int]]) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    return torch.tensor([[PAD] * (n - len(s)) + list(s) for s in seqs])


def right_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.tensor([list(s) + [PAD] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    return ids, mask
