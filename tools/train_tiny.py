#!/usr/bin/env python
"""Train the small bundled models on the number-spelling task (encdec_core/assets/spell_task.py).

    python tools/train_tiny.py --kind t5   --out encdec_core/assets/default
    python tools/train_tiny.py --kind bart --out models/spell-bart
    python tools/train_tiny.py --kind nmt  --out models/spell-nmt

Plain torch loop over HF transformers models, CPU by default, one thread (--threads), fixed seeds:
the same command on the same torch build gives the same weights. Data come from spell_task: the
training numbers (both directions, small numbers oversampled), never the 200 held-out inputs.
At the end the model is evaluated with HF ``generate`` (greedy) on the held-out inputs and the
folder is written with a training record (training.json).

kinds
  t5    ByT5-style T5ForConditionalGeneration: vocab 384, ByT5Tokenizer (no tokenizer files needed)
  bart  BartForConditionalGeneration with a byte-level BPE tokenizer trained on the task text
  nmt   a fairseq transformer checkpoint (model.pt, dict.src.txt, dict.tgt.txt, bpecodes), trained
        as HF FSMTForConditionalGeneration; text goes through sacremoses + subword-nmt BPE
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encdec_core.assets import spell_task  # noqa: E402

# ------------------------------------------------------------------------------------------ data

def sampling_weights(numbers: list[int]) -> list[float]:
    """Short numbers are rare under uniform sampling (1% are below 100): oversample them."""
    return [{1: 8.0, 2: 4.0, 3: 2.0}.get(len(str(n)), 1.0) for n in numbers]


class Batches:
    """An endless, seeded stream of (inputs, targets) text batches from the training numbers."""

    def __init__(self, batch_size: int, seed: int):
        self.numbers = spell_task.TRAIN_NUMBERS
        self.weights = sampling_weights(self.numbers)
        self.rng = random.Random(seed)
        self.batch_size = batch_size

    def __next__(self) -> tuple[list[str], list[str]]:
        nums = self.rng.choices(self.numbers, self.weights, k=self.batch_size)
        pairs = [spell_task.example(n, self.rng.choice(("spell", "digits"))) for n in nums]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def __iter__(self):
        return self


# ------------------------------------------------------------------------------------------ kinds

class Kind:
    """What differs between model kinds: tokenizer, model, text in/out and how the folder is saved."""

    name = ""
    max_new_tokens = 0

    def __init__(self, args):
        self.args = args

    def setup(self, workdir: Path) -> None:
        raise NotImplementedError

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        return enc.input_ids, enc.attention_mask

    def labels(self, texts: list[str]) -> torch.Tensor:
        ids, mask = self.encode(texts)
        return ids.masked_fill(mask == 0, -100)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def loss(self, src: list[str], tgt: list[str], device) -> torch.Tensor:
        ids, mask = self.encode(src)
        labels = self.labels(tgt)
        return self.model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss

    def generation_config(self):
        raise NotImplementedError

    def reload(self, out: Path):
        """The model as read back from the written folder (to check that what ships is what was trained)."""
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM.from_pretrained(str(out))

    def save(self, out: Path) -> None:
        raise NotImplementedError


class T5Kind(Kind):
    name = "t5"
    max_new_tokens = 48  # longest answer: 42 bytes + EOS

    def setup(self, workdir):
        from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

        a = self.args
        self.tokenizer = ByT5Tokenizer()
        cfg = T5Config(
            vocab_size=384, d_model=a.d_model, d_kv=a.d_model // a.heads, d_ff=a.ffn, num_layers=a.layers,
            num_decoder_layers=a.decoder_layers or a.layers, num_heads=a.heads,
            feed_forward_proj="gated-gelu", dropout_rate=a.dropout, relative_attention_num_buckets=32,
            relative_attention_max_distance=64, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            architectures=["T5ForConditionalGeneration"])
        self.model = T5ForConditionalGeneration(cfg)

    def generation_config(self):
        from transformers import GenerationConfig

        return GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                                max_new_tokens=self.max_new_tokens, num_beams=1, do_sample=False)

    def save(self, out):
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)


class BartKind(Kind):
    name = "bart"
    max_new_tokens = 24

    def setup(self, workdir):
        from tokenizers import ByteLevelBPETokenizer
        from transformers import BartConfig, BartForConditionalGeneration, BartTokenizerFast

        a = self.args
        corpus = workdir / "corpus.txt"
        corpus.write_text("\n".join(spell_task.corpus_lines()) + "\n", encoding="utf-8")
        bpe = ByteLevelBPETokenizer()
        bpe.train([str(corpus)], vocab_size=a.vocab_size, min_frequency=2, show_progress=False,
                  special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        tokdir = workdir / "tok"
        tokdir.mkdir()
        bpe.save_model(str(tokdir))
        self.tokenizer = BartTokenizerFast.from_pretrained(str(tokdir))
        ids = self.tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        assert ids == [0, 1, 2, 3, 4], ids
        cfg = BartConfig(
            vocab_size=len(self.tokenizer), d_model=a.d_model, encoder_layers=a.layers,
            decoder_layers=a.decoder_layers or a.layers, encoder_attention_heads=a.heads,
            decoder_attention_heads=a.heads, encoder_ffn_dim=a.ffn, decoder_ffn_dim=a.ffn,
            activation_function="gelu", max_position_embeddings=64, dropout=a.dropout, attention_dropout=0.0,
            activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
            forced_eos_token_id=2, scale_embedding=False, architectures=["BartForConditionalGeneration"])
        self.model = BartForConditionalGeneration(cfg)

    def generation_config(self):
        from transformers import GenerationConfig

        return GenerationConfig(decoder_start_token_id=2, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                                forced_eos_token_id=2, max_new_tokens=self.max_new_tokens, num_beams=1,
                                do_sample=False)

    def save(self, out):
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)


class NMTKind(Kind):
    """A fairseq `transformer` (post-LN, sinusoidal positions, shared embeddings), trained as HF FSMT.

    Text pipeline as fairseq-interactive runs it: sacremoses (lang en, aggressive dash splits,
    escaping) -> subword-nmt BPE (separator @@) -> joined dictionary (specials <s>=0 <pad>=1 </s>=2
    <unk>=3, then dict lines, padded to a multiple of 8 with madeupwordNNNN). Written as model.pt
    (args Namespace), dict.src.txt, dict.tgt.txt and bpecodes.
    """

    name = "nmt"
    max_new_tokens = 20
    SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")

    def setup(self, workdir):
        import io

        from sacremoses import MosesDetokenizer, MosesTokenizer
        from subword_nmt.apply_bpe import BPE
        from subword_nmt.learn_bpe import learn_bpe
        from transformers import FSMTConfig, FSMTForConditionalGeneration

        a = self.args
        self.moses = MosesTokenizer(lang="en")
        self.detok = MosesDetokenizer(lang="en")
        tokenized = [self.tokenize(s) for s in spell_task.corpus_lines()]
        # BPE merges are learned on the words only: numerals stay one digit per piece
        # ("4@@ 7@@ 2@@ 1"), which the model learns far better than arbitrary digit chunks
        words_only = [" ".join(w for w in line.split() if not any(ch.isdigit() for ch in w)) for line in tokenized]
        codes = io.StringIO()
        learn_bpe(io.StringIO("\n".join(words_only) + "\n"), codes, a.vocab_size, min_frequency=2)
        self.codes = codes.getvalue()
        self.bpe = BPE(io.StringIO(self.codes), separator="@@")
        counts: dict[str, int] = {}
        for line in tokenized:
            for tok in self.bpe.process_line(line).split():
                counts[tok] = counts.get(tok, 0) + 1
        self.dict_lines = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        n = len(self.SPECIALS) + len(self.dict_lines)
        self.dict_lines += [(f"madeupword{i:04d}", 0) for i in range((-n) % 8)]
        self.symbols = list(self.SPECIALS) + [t for t, _ in self.dict_lines]
        self.index = {t: i for i, t in enumerate(self.symbols)}
        cfg = FSMTConfig(
            langs=["src", "tgt"], src_vocab_size=len(self.symbols), tgt_vocab_size=len(self.symbols),
            d_model=a.d_model, encoder_layers=a.layers, decoder_layers=a.decoder_layers or a.layers,
            encoder_attention_heads=a.heads, decoder_attention_heads=a.heads, encoder_ffn_dim=a.ffn,
            decoder_ffn_dim=a.ffn, activation_function="relu", max_position_embeddings=64, dropout=a.dropout,
            attention_dropout=0.0, activation_dropout=0.0, scale_embedding=True, tie_word_embeddings=True,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
        self.model = FSMTForConditionalGeneration(cfg)
        # fairseq's sinusoidal positions are a fixed table, not weights: the checkpoint has only a
        # dummy buffer and every reader recomputes them. FSMT keeps them as a trainable Parameter,
        # so without this the optimizer would move them and the saved model would not be the trained one.
        for side in (self.model.model.encoder, self.model.model.decoder):
            side.embed_positions.weight.requires_grad_(False)
        self.positions = [s.embed_positions.weight.detach().clone()
                          for s in (self.model.model.encoder, self.model.model.decoder)]

    def tokenize(self, text: str) -> str:
        return self.moses.tokenize(text, aggressive_dash_splits=True, return_str=True, escape=True)

    def encode(self, texts):
        rows = [[self.index.get(t, 3) for t in self.bpe.process_line(self.tokenize(s)).split()] + [2]
                for s in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), 1, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, (ids != 1).long()

    def decode(self, ids):
        out = []
        for row in ids.tolist():
            toks = [self.symbols[i] for i in row if i > 3]
            out.append(self.detok.detokenize((" ".join(toks) + " ").replace("@@ ", "").split()))
        return out

    def loss(self, src, tgt, device):
        """FSMT builds no decoder inputs from labels, and its causal mask only when use_cache=False."""
        ids, mask = self.encode(src)
        labels, _ = self.encode(tgt)
        dec_in = torch.cat([torch.full_like(labels[:, :1], 2), labels[:, :-1]], 1)
        dec_in = dec_in.masked_fill(dec_in == 2, 1)
        dec_in[:, 0] = 2
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         decoder_input_ids=dec_in.to(device), labels=labels.masked_fill(labels == 1, -100).to(device),
                         use_cache=False)
        return out.loss

    def generation_config(self):
        from transformers import GenerationConfig

        return GenerationConfig(decoder_start_token_id=2, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                                forced_eos_token_id=2, max_new_tokens=self.max_new_tokens, num_beams=1,
                                do_sample=False)

    def reload(self, out):
        """model.pt back into FSMT: fairseq names with `model.` prepended; positions recomputed."""
        from transformers import FSMTForConditionalGeneration

        state = torch.load(out / "model.pt", map_location="cpu", weights_only=False)["model"]
        model = FSMTForConditionalGeneration(self.model.config)
        own = model.state_dict()
        for k, v in state.items():
            if k.endswith((".version", "._float_tensor")):
                continue
            own["model." + k].copy_(v)
        return model

    def save(self, out):
        """fairseq 0.12 layout: the FSMT keys minus `model.`, positions as the dummy buffer, version 3."""
        import argparse
        from collections import OrderedDict

        a, c = self.args, self.model.config
        for side, table in zip((self.model.model.encoder, self.model.model.decoder), self.positions):
            if not torch.equal(side.embed_positions.weight.detach().cpu(), table):
                raise RuntimeError("the sinusoidal position table changed in training; fairseq cannot store it")
        state = OrderedDict()
        for k, v in self.model.state_dict().items():
            k = k[len("model."):]
            if "embed_positions" not in k:
                state[k] = v.detach().clone()
        emb = state["encoder.embed_tokens.weight"]
        state["decoder.embed_tokens.weight"] = emb
        state["decoder.output_projection.weight"] = emb
        for side in ("encoder", "decoder"):
            state[f"{side}.embed_positions._float_tensor"] = torch.FloatTensor(1)
            state[f"{side}.version"] = torch.Tensor([3])
        args = argparse.Namespace(
            arch="transformer", task="translation", source_lang="src", target_lang="tgt",
            encoder_embed_dim=c.d_model, decoder_embed_dim=c.d_model, encoder_ffn_embed_dim=c.encoder_ffn_dim,
            decoder_ffn_embed_dim=c.decoder_ffn_dim, encoder_layers=c.encoder_layers,
            decoder_layers=c.decoder_layers, encoder_attention_heads=c.encoder_attention_heads,
            decoder_attention_heads=c.decoder_attention_heads, activation_fn="relu",
            encoder_normalize_before=False, decoder_normalize_before=False, encoder_learned_pos=False,
            decoder_learned_pos=False, share_all_embeddings=True, share_decoder_input_output_embed=True,
            no_scale_embedding=False, layernorm_embedding=False, max_source_positions=c.max_position_embeddings,
            max_target_positions=c.max_position_embeddings, dropout=a.dropout, attention_dropout=0.0,
            activation_dropout=0.0, tokenizer="moses", bpe="subword_nmt", moses_source_lang="en",
            moses_target_lang="en", adaptive_softmax_cutoff=None, no_token_positional_embeddings=False,
            seed=a.seed, lr=[a.lr], max_update=a.steps)
        torch.save({"args": args, "model": state, "optimizer_history": [], "extra_state": {}}, out / "model.pt")
        lines = "".join(f"{t} {n}\n" for t, n in self.dict_lines)
        for lang in ("src", "tgt"):
            (out / f"dict.{lang}.txt").write_text(lines, encoding="utf-8")
        (out / "bpecodes").write_text(self.codes, encoding="utf-8")


KINDS = {"t5": T5Kind, "bart": BartKind, "nmt": NMTKind}
DEFAULTS = {  # per kind: the settings the shipped models were trained with (see docs/models.md)
    "t5": dict(d_model=96, heads=3, ffn=256, layers=3, decoder_layers=3, steps=1500, batch_size=64, lr=2e-3,
               dropout=0.0),
    "bart": dict(d_model=128, heads=4, ffn=256, layers=2, decoder_layers=2, steps=1000, batch_size=64, lr=2e-3,
                 vocab_size=320, dropout=0.0),
    "nmt": dict(d_model=128, heads=4, ffn=256, layers=2, decoder_layers=2, steps=2000, batch_size=64, lr=1.5e-3,
                vocab_size=150, dropout=0.1),
}


# ------------------------------------------------------------------------------------------ loop

@torch.no_grad()
def evaluate(kind: Kind, pairs: list[tuple[str, str]], batch_size: int = 100, num_beams: int = 1,
             device="cpu") -> tuple[float, list[tuple[str, str, str]]]:
    """Exact-answer accuracy of HF generate on (input, target) pairs, and the misses."""
    model = kind.model
    was_training = model.training
    model.eval()
    gc = kind.generation_config()
    gc.num_beams = num_beams
    if kind.name == "nmt":
        # FSMT's cached decoding gave garbage under transformers 5.17 (the GPU image), not under
        # 5.24; without the cache FSMT re-runs the whole (causally masked) prefix each step
        gc.use_cache = False
    right, misses = 0, []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i: i + batch_size]
        ids, mask = kind.encode([p[0] for p in chunk])
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gc)
        for (src, tgt), hyp in zip(chunk, kind.decode(out.cpu())):
            if spell_task.check(src, hyp):
                right += 1
            else:
                misses.append((src, tgt, hyp))
    model.train(was_training)
    return right / len(pairs), misses


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args) -> dict:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kind = KINDS[args.kind](args)
    t0, c0 = time.time(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        kind.setup(Path(tmp))
        model = kind.model.to(device)
        model.train()
        nparams = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"[{args.kind}] {nparams / 1e6:.2f}M parameters; {args.steps} steps of {args.batch_size}", flush=True)
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
        batches = Batches(args.batch_size, args.seed)
        dev = spell_task.dev_set()
        log, ema = [], None
        for step in range(args.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
            src, tgt = next(batches)
            loss = kind.loss(src, tgt, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                line = {"step": step + 1, "loss": round(ema, 4), "s": round(time.time() - t0, 1)}
                if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
                    line["dev_acc"] = evaluate(kind, dev, device=device)[0]
                log.append(line)
                print(json.dumps(line), flush=True)
        train_s, cpu_s = time.time() - t0, time.process_time() - c0
        acc, misses = evaluate(kind, spell_task.held_out(), device=device)
        print(f"[{args.kind}] held-out exact accuracy (greedy, HF generate): {acc:.3f} "
              f"({len(misses)} misses) after {train_s:.0f} s ({cpu_s:.0f} s of CPU time)", flush=True)
        for m in misses[:20]:
            print("  miss:", m, flush=True)
        model.to("cpu")
        record = {
            "kind": args.kind, "command": " ".join(["python", "tools/train_tiny.py"] + sys.argv[1:]),
            "args": vars(args), "parameters": nparams, "train_seconds": round(train_s, 1),
            "train_cpu_seconds": round(cpu_s, 1), "device": str(device),
            "held_out_accuracy_greedy": acc, "held_out_misses": misses[:50],
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "log": log,
        }
        if args.out:
            save(kind, Path(args.out), record)
            kind.model = kind.reload(Path(args.out))
            again, _ = evaluate(kind, spell_task.held_out())
            print(f"[{args.kind}] read back from {args.out}: held-out accuracy {again:.3f}", flush=True)
            if again != acc:
                raise SystemExit(f"{args.out}: the written model answers differently from the trained one "
                                 f"({again:.3f} vs {acc:.3f})")
    return record


def save(kind: Kind, out: Path, record: dict) -> None:
    """Written to a temp folder next to out, then renamed over it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        kind.save(tmp)
        if kind.name != "nmt":  # a fairseq folder has no generation_config.json
            kind.generation_config().save_pretrained(tmp)
        with open(tmp / "training.json", "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=sorted(KINDS), default="t5")
    p.add_argument("--out", help="output folder (replaced); none: train and evaluate only")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--dropout", type=float)
    p.add_argument("--d-model", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--ffn", type=int)
    p.add_argument("--layers", type=int, help="encoder layers")
    p.add_argument("--decoder-layers", type=int)
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary (bart, nmt)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=500, help="dev accuracy every N steps (0: never)")
    args = p.parse_args(argv)
    for k, v in DEFAULTS[args.kind].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


if __name__ == "__main__":
    train(parse_args())
