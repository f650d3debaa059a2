"""Shared by tests/test_parallel*.py (which prepare checkpoints and reference outputs in one
process) and the scripts they launch under mpirun / torchrun (which load rank shards).

Tiny random HF models are built from config classes with fixed seeds: nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("ENCDEC_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)  # many ranks share two cores

MPIRUN_ARGS = ["--allow-run-as-root", "--oversubscribe"]
MAPPINGS = {1: [(1, 1)], 2: [(2, 1), (1, 2)], 4: [(2, 2)]}  # world size -> (tp, pp) runs of one launch
BATCH = [[5, 17, 9, 33, 2, 41, 1], [7, 3, 22, 1, 0, 0, 0]]  # second row padded (pad 0, eos 1)
GREEDY_NEW = 8
BEAMS = 3


def hf_models() -> dict:
    """name -> (HF model class, config) for the families whose plugins import."""
    from transformers import T5Config, T5ForConditionalGeneration

    out = {
        # v1.0 style: tied lm_head (output scale), relu; vocab 67 is not a multiple of tp (padding)
        "t5": (T5ForConditionalGeneration, T5Config(
            vocab_size=67, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="relu",
            dropout_rate=0.0, tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0,
            eos_token_id=1)),
        # flan style: gated-gelu, untied vocab-parallel lm_head, fewer decoder layers than encoder
        "flan-t5": (T5ForConditionalGeneration, T5Config(
            vocab_size=70, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20,
            feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
    }
    try:
        import encdec_bart.plugin  # noqa: F401
    except ImportError:
        return out
    from transformers import BartConfig, BartForConditionalGeneration

    out["bart"] = (BartForConditionalGeneration, BartConfig(
        vocab_size=69, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=2,
        eos_token_id=1, decoder_start_token_id=1, forced_eos_token_id=1, scale_embedding=True))
    return out


def _saved_tensor_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def plugin_modules() -> list[str]:
    mods = ["encdec_t5.plugin"]
    try:
        import encdec_bart.plugin  # noqa: F401

        mods.append("encdec_bart.plugin")
    except ImportError:
        pass
    return mods


def ckpt_name(model: str, tp: int, pp: int) -> str:
    return f"{model}-tp{tp}pp{pp}"


def prepare(root: Path, mappings=((1, 1), (2, 1), (1, 2), (2, 2)), other: bool = True,
            only: tuple | None = None) -> list[str]:
    """Save each tiny HF model under root/hf/<name> and convert it for every mapping.

    other: also convert a second T5 of the same shape but other weights ("t5-other", tp=2), whose
    shards stand for "shards from another conversion" in the wrong-launch tests."""
    import importlib

    from encdec_core.convert import convert
    from encdec_core.registry import Registry

    reg = Registry()
    for m in plugin_modules():
        reg.register_plugin(importlib.import_module(m), name=m)
    names = []
    for i, (name, (cls, cfg)) in enumerate(hf_models().items()):
        if only is not None and name not in only:
            continue
        torch.manual_seed(1234 + i)
        model = cls(cfg).eval()
        untie = not cfg.tie_word_embeddings or name == "flan-t5"
        if untie and model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
            # transformers 5.24's T5Config ties whatever it is told: an own lm_head, as a real flan-t5
            # checkpoint has (the recipe of tests/test_t5_parity.py)
            model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
            tied = dict(model.all_tied_weights_keys)
            tied.pop("lm_head.weight", None)
            model.all_tied_weights_keys = tied
        with torch.no_grad():  # larger-than-init weights: logits far from ties, so argmax is stable
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.15)
            if hasattr(model, "final_logits_bias"):  # BART: a bias on every vocabulary slice's logits
                model.final_logits_bias.normal_(0.0, 0.5)
        hf = root / "hf" / name
        model.save_pretrained(hf)
        if untie:
            data = json.loads((hf / "config.json").read_text())
            data["tie_word_embeddings"] = False
            data.pop("scale_decoder_outputs", None)  # real (v4-era) checkpoints do not have it
            (hf / "config.json").write_text(json.dumps(data, indent=2))
            assert "lm_head.weight" in _saved_tensor_names(hf), f"{name}: no lm_head of its own"
        for tp, pp in mappings:
            convert(hf, root / ckpt_name(name, tp, pp), tp=tp, pp=pp, reg=reg)
        names.append(name)
        if other and name == "t5":
            torch.manual_seed(4321)
            cls(cfg).save_pretrained(root / "hf" / "t5-other")
            convert(root / "hf" / "t5-other", root / ckpt_name("t5-other", 2, 1), tp=2, pp=1, reg=reg)
    (root / "models.json").write_text(json.dumps(names))
    return names


def inputs(device="cpu"):
    ids = torch.tensor(BATCH, dtype=torch.long, device=device)
    return ids, (ids != 0).long()


def teacher_forced(model, ids, mask) -> torch.Tensor:
    torch.manual_seed(99)
    dec = torch.randint(2, model.cfg.vocab_size, (ids.shape[0], 5), device=ids.device)
    dec[:, 0] = model.cfg.decoder_start_token_id
    with torch.no_grad():
        return model(ids, mask, dec)


def greedy_loop(model, ids, mask, steps: int = GREEDY_NEW) -> tuple[torch.Tensor, torch.Tensor]:
    """Incremental decoding with the KV cache; returns (tokens [B, steps], per-step logits)."""
    with torch.no_grad():
        enc = model.encode(ids, mask)
        state = model.init_state(enc, mask, steps + 1)
        tok = torch.full((ids.shape[0], 1), model.cfg.decoder_start_token_id, dtype=torch.long, device=ids.device)
        toks, logits = [], []
        for _ in range(steps):
            lg = model.decode(tok, state)[:, -1]
            tok = lg.argmax(-1, keepdim=True)
            toks.append(tok)
            logits.append(lg)
        return torch.cat(toks, 1), torch.stack(logits, 1)


def have_generation() -> bool:
    try:
        from encdec_core.runtime.generation import GenerationConfig, generate  # noqa: F401
    except ImportError:
        return False
    return True


def generate_ids(model, ids, mask, num_beams: int, runner=None, **kw) -> torch.Tensor:
    from encdec_core.runtime.generation import GenerationConfig, generate

    gc = GenerationConfig.from_model(model.cfg, None, max_new_tokens=GREEDY_NEW, num_beams=num_beams, **kw)
    with torch.no_grad():
        out = generate(model, ids, mask, gc, runner=runner)
    return out.sequences


STATIC_KEYS = ("static_greedy_ids", "static_beam_ids", "static_fused_greedy_ids",
               "triton_step_logits", "triton_greedy_ids")
TRITON_NEW = 3  # the Triton step runs interpreted on a CPU: a few steps


def static_runner(model, kernels: str = "inductor"):
    """The CUDA graph runner's static step (graphs on CUDA; on a CPU the same step run directly,
    uncompiled; kernels="triton": the Triton step, interpreted on a CPU): it serves tensor
    parallelism, not pipeline parallelism."""
    from encdec_core.runtime.cuda import CudaGraphRunner

    cuda = model.device.type == "cuda"
    return CudaGraphRunner(model, ids_shape()[0] * BEAMS, GREEDY_NEW + 1, ids_shape()[1], compile=False,
                           use_graphs=cuda, kernels=kernels)


def ids_shape() -> tuple[int, int]:
    return len(BATCH), len(BATCH[0])


def run_all(model) -> dict:
    """Everything compared between single rank and parallel runs; with pipeline size 1 also the
    static (CUDA graph runner) step's greedy, beam and fused greedy ids."""
    ids, mask = inputs(model.device)
    res = {"tf_logits": teacher_forced(model, ids, mask).cpu()}
    # the lm_head through a copy of the (rank's) output embedding padded with rows (the CUDA runner's
    # aligned GEMM): each rank's padding columns must go before the gather
    w = model.output_embedding.weight
    pad = torch.cat([w, torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(3)).to(w)], 0)
    h = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(4)).to(w)
    with torch.no_grad():
        res["padded_lm_logits"] = model.logits(h, weight=pad).cpu()
    toks, step_logits = greedy_loop(model, ids, mask)
    res["loop_ids"], res["loop_logits"] = toks.cpu(), step_logits.cpu()
    if have_generation():
        res["greedy_ids"] = generate_ids(model, ids, mask, 1).cpu()
        res["beam_ids"] = generate_ids(model, ids, mask, BEAMS).cpu()
        res["sample_ids"] = generate_ids(model, ids, mask, 1, do_sample=True, seed=7, top_k=0).cpu()
        if model.ctx.pp_size == 1:
            runner = static_runner(model)
            res["static_greedy_ids"] = generate_ids(model, ids, mask, 1, runner=runner).cpu()
            res["static_beam_ids"] = generate_ids(model, ids, mask, BEAMS, runner=runner).cpu()
            res["static_fused_greedy_ids"] = runner.greedy(ids, mask, max_new_tokens=GREEDY_NEW).cpu()
            # the Triton step (under TP: fp32 partial products, all-reduce, one residual rounding)
            runner = static_runner(model, "triton")
            runner.prefill(ids, mask)
            start = torch.full((ids.shape[0],), model.cfg.decoder_start_token_id, dtype=torch.long,
                               device=ids.device)
            res["triton_step_logits"] = runner.step(start).clone().cpu()
            res["triton_greedy_ids"] = runner.greedy(ids, mask, max_new_tokens=TRITON_NEW).cpu()
    return res


def add_src_to_path() -> None:
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)


# ------------------------------------------------------------------------ run-time LoRA across ranks
LORA_MODELS = ("flan-t5", "bart")
LORA_UIDS = ([1, 0], [-1, 1])  # per BATCH row: two mixes (-1: the base model)
LORA_MAPPINGS = ((1, 1), (2, 1), (1, 2))


def prepare_lora(root: Path) -> list[str]:
    """Each LORA_MODELS model (as ``prepare`` makes it) with two peft adapters on every kind of layer
    (column- and row-parallel, attention and FFN), converted with --lora-mode runtime for every
    LORA_MAPPINGS mapping (the base weights sharded, the factors whole under lora/)."""
    import copy
    import importlib

    import peft

    from encdec_core.convert import convert
    from encdec_core.registry import Registry

    reg = Registry()
    for m in [*plugin_modules(), "encdec_lora.plugin"]:
        reg.register_plugin(importlib.import_module(m), name=m)
    names = [n for n in LORA_MODELS if n in hf_models()]
    prepare(root, mappings=(), other=False, only=tuple(names))  # the HF models under root/hf
    targets = {"flan-t5": (["q", "v", "wo"], ["k", "o", "wi_0", "EncDecAttention.q"]),
               "bart": (["q_proj", "v_proj", "fc2"], ["k_proj", "out_proj", "fc1"])}
    for name in names:
        cls = hf_models()[name][0]
        base = cls.from_pretrained(root / "hf" / name).eval()
        dirs = []
        for i, mods in enumerate(targets[name]):
            torch.manual_seed(50 + i)
            pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
                task_type="SEQ_2_SEQ_LM", init_lora_weights=False, lora_dropout=0.0, r=2 + i, lora_alpha=4,
                target_modules=mods))
            with torch.no_grad():  # updates as large as the weights' spread: tokens change with the uid
                for n_, p in pm.named_parameters():
                    if "lora_" in n_:
                        p.normal_(0.0, 0.3)
            d = root / "lora" / name / f"a{i}"
            pm.save_pretrained(d)
            dirs.append(d)
        for tp, pp in LORA_MAPPINGS:
            convert(root / "hf" / name, root / f"lora-{ckpt_name(name, tp, pp)}", tp=tp, pp=pp, reg=reg,
                    adapters=dirs, adapter_mode="runtime")
    (root / "lora_models.json").write_text(json.dumps(names))
    return names


def load_lora_bank(model, ckpt: Path) -> None:
    from encdec_core.runtime.lora import LORA_DIR, LoraBank

    meta = json.loads((ckpt / "config.json").read_text())
    model.lora_bank = LoraBank(model, ckpt / LORA_DIR, len(meta["lora_runtime"]))


def lora_run_all(model) -> dict:
    """Teacher-forced logits and greedy / beam ids for each LORA_UIDS mix (eager runner), and with
    pipeline size 1 the static (CUDA-graph runner) step's greedy, beam and fused greedy ids, also for
    a batch naming no adapter."""
    ids, mask = inputs(model.device)
    res = {}
    bank = model.lora_bank
    for j, uids in enumerate(LORA_UIDS):
        with bank.rows(uids):
            res[f"tf_logits_{j}"] = teacher_forced(model, ids, mask).cpu()
            res[f"greedy_ids_{j}"] = generate_ids(model, ids, mask, 1).cpu()
            res[f"beam_ids_{j}"] = generate_ids(model, ids, mask, BEAMS).cpu()
    if model.ctx.pp_size == 1:
        runner = static_runner(model)
        for j, uids in enumerate(LORA_UIDS):
            with bank.rows(uids):
                res[f"static_greedy_ids_{j}"] = generate_ids(model, ids, mask, 1, runner=runner).cpu()
                res[f"static_beam_ids_{j}"] = generate_ids(model, ids, mask, BEAMS, runner=runner).cpu()
                res[f"static_fused_greedy_ids_{j}"] = runner.greedy(ids, mask, max_new_tokens=GREEDY_NEW).cpu()
        res["static_greedy_ids_base"] = generate_ids(model, ids, mask, 1, runner=runner).cpu()
    return res
