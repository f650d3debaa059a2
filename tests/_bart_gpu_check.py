"""GPU check of the BART / mBART families (run by hand on a CUDA machine, not collected by pytest):

    python tests/_bart_gpu_check.py OUT_DIR

Tiny random HF BART (scale_embedding, unequal layers) and mBART (pre-LN, final norms) are mapped
through the family; on CUDA, fp32: teacher-forced logits vs HF, then greedy and beam-4 generate
(no_repeat_ngram 3, min_length, forced BOS/EOS, length_penalty 2; for mBART one target language per
request) with the eager runner and the CUDA-graph runner, each against HF generate (one request at
a time, forced_bos_token_id). bf16: the graph runner's greedy tokens vs fp32 (agreement reported).
Writes OUT_DIR/bart_gpu_check.json and prints it.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ENCDEC_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _bart_helpers import BART_SCALED, MBART_TINY, make_model, pad_batch  # noqa: E402


def main(out_dir: Path) -> None:
    import importlib

    from transformers import AutoModelForSeq2SeqLM
    from transformers import GenerationConfig as HFGen

    from encdec_core.convert import load_source_model
    from encdec_core.registry import Registry
    from encdec_core.runtime.cuda.runner import CudaGraphRunner
    from encdec_core.runtime.generation import GenerationConfig, generate

    reg = Registry()
    reg.register_plugin(importlib.import_module("encdec_bart.plugin"), name="bart")
    cuda = torch.cuda.is_available()  # without CUDA: a dry run of the eager path on the CPU
    dev = torch.device("cuda" if cuda else "cpu")
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    tmp = Path(tempfile.mkdtemp())
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(4, 300, (n,), generator=g).tolist() + [2] for n in (9, 4, 13, 6)]
    for name, kind, shape, vocab in (("bart", "bart", BART_SCALED, 321), ("mbart", "mbart", MBART_TINY, 309)):
        t0 = time.time()
        path = tmp / name
        make_model(path, kind, shape, vocab, seed=3)
        hf = AutoModelForSeq2SeqLM.from_pretrained(str(path)).to(dev).eval()
        model, src, _ = load_source_model(path, reg=reg, device=dev)
        ids, mask = pad_batch(seqs, 1)
        ids, mask = ids.to(dev), mask.to(dev)
        dec = torch.randint(3, vocab, (ids.shape[0], 8), generator=g).to(dev)
        dec[:, 0] = 2
        with torch.no_grad():
            diff = (model(ids, mask, dec) - hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)
        r = {"logits_max_abs_diff": diff.abs().max().item()}
        langs = [300, 301, 302, 303] if kind == "mbart" else None
        base = dict(max_length=16, min_length=6, no_repeat_ngram_size=3, forced_eos_token_id=2)
        if kind == "bart":
            base["forced_bos_token_id"] = 0
        for mode, extra in (("greedy", {}), ("beam4", dict(num_beams=4, length_penalty=2.0, early_stopping=True))):
            opts = {**base, **extra}
            gc = GenerationConfig.from_model(model.cfg, src.generation_config, **opts)
            runners = {"eager": None}
            if cuda:
                runners["graph"] = CudaGraphRunner(model, max_batch=16, max_len=32, max_input_len=32)
            got = {}
            for rname, runner in runners.items():
                with torch.inference_mode():
                    got[rname] = generate(model, ids, mask, gc, forced_bos_token_ids=langs, runner=runner).all_tokens()
            hf_rows = []
            for i in range(ids.shape[0]):
                n = int(mask[i].sum())
                kw = dict(opts)
                if langs is not None:
                    kw["forced_bos_token_id"] = langs[i]
                with torch.no_grad():
                    s = hf.generate(input_ids=ids[i:i + 1, :n], attention_mask=mask[i:i + 1, :n],
                                    generation_config=HFGen(**kw))[0].tolist()[1:]
                while s and s[-1] in (1, 2):
                    s = s[:-1]
                hf_rows.append(s)
            r[mode] = {k: v == hf_rows for k, v in got.items()}
            if langs is not None:
                r[mode]["first_token_is_target_lang"] = [row[0] for row in got["eager"]] == langs
        if not cuda:
            report[name] = r
            continue
        # bf16: the graph runner against fp32 greedy
        m16, _, _ = load_source_model(path, reg=reg, device=dev, dtype=torch.bfloat16)
        gc = GenerationConfig.from_model(m16.cfg, src.generation_config, **base)
        with torch.inference_mode():
            a = generate(m16, ids, mask, gc, forced_bos_token_ids=langs,
                         runner=CudaGraphRunner(m16, max_batch=16, max_len=32, max_input_len=32)).all_tokens()
            b = generate(model, ids, mask, gc, forced_bos_token_ids=langs).all_tokens()
        same = sum(x == y for x, y in zip(a, b))
        r["bf16_graph_greedy_rows_equal_fp32"] = f"{same}/{len(a)}"
        r["seconds"] = round(time.time() - t0, 1)
        report[name] = r
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bart_gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
