"""Text <-> ids for fairseq translation models, without fairseq.

Source side: sacremoses tokenize -> subword-nmt BPE -> dictionary ids + ``</s>``.
Target side: ids -> tokens (specials dropped) -> remove ``@@ `` -> moses detokenize.

Dictionaries (``dict.{lang}.txt``) hold ``token count [#fairseq:overwrite]`` per line; the four
specials are implicit: ``<s>``=0 ``<pad>``=1 ``</s>``=2 ``<unk>``=3, line i has id i + 4. fairseq's
preprocessing pads a dictionary to a multiple of 8 with ``madeupwordNNNN`` entries (written into
the file); a dictionary shorter than the model's embedding is padded the same way here.
"""
from __future__ import annotations

from pathlib import Path

from encdec_core.errors import ConfigError, EncDecError

BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
SPECIALS = (BOS, PAD, EOS, UNK)
BPE_CODE_FILES = ("bpecodes", "bpe.codes", "codes", "code")


class Dictionary:
    def __init__(self, symbols: list[str], path: Path | None = None):
        self.symbols = list(symbols)
        self.path = path
        self.indices: dict[str, int] = {}
        for i, s in enumerate(self.symbols):
            self.indices[s] = i  # '#fairseq:overwrite' duplicates: the last one wins, as in fairseq
        self.bos_index, self.pad_index, self.eos_index, self.unk_index = 0, 1, 2, 3

    @classmethod
    def load(cls, path: Path) -> "Dictionary":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: dictionary file not found")
        symbols = list(SPECIALS)
        seen = set(SPECIALS)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            overwrite = False
            body = line.rstrip()
            if body.endswith(" #fairseq:overwrite"):
                overwrite = True
                body = body[: -len(" #fairseq:overwrite")]
            word, sep, count = body.rpartition(" ")
            if not sep or not word:
                raise ConfigError(f"{path}: line {n} = {line!r}: expected '<token> <count>'")
            try:
                int(count)
            except ValueError:
                raise ConfigError(f"{path}: line {n} = {line!r}: count {count!r} is not an integer") from None
            if word in seen and not overwrite:
                raise ConfigError(f"{path}: line {n}: duplicate token {word!r} (fairseq needs "
                                  f"'#fairseq:overwrite' to allow it)")
            seen.add(word)
            symbols.append(word)
        return cls(symbols, path)

    def __len__(self) -> int:
        return len(self.symbols)

    def pad_to(self, size: int) -> None:
        """Append madeupword entries up to ``size`` (fairseq's padding_factor filler)."""
        i = 0
        while len(self.symbols) < size:
            w = f"madeupword{i:04d}"
            if w not in self.indices:
                self.indices[w] = len(self.symbols)
                self.symbols.append(w)
            i += 1

    def pad_to_multiple(self, factor: int = 8) -> None:
        if len(self) % factor:
            self.pad_to((len(self) + factor - 1) // factor * factor)

    def index(self, token: str) -> int:
        return self.indices.get(token, self.unk_index)

    def encode_line(self, line: str, append_eos: bool = True) -> list[int]:
        ids = [self.index(w) for w in line.split()]
        if append_eos:
            ids.append(self.eos_index)
        return ids

    def string(self, ids, skip=(0, 1, 2)) -> str:
        skip = set(skip)
        out = []
        for i in ids:
            i = int(i)
            if i in skip:
                continue
            out.append(self.symbols[i] if 0 <= i < len(self.symbols) else UNK)
        return " ".join(out)


def find_bpe_codes(folder: Path) -> Path | None:
    for name in BPE_CODE_FILES:
        p = Path(folder) / name
        if p.is_file():
            return p
    return None


def check_bpe_codes(folder: Path, bpe: str | None) -> None:
    """subword-nmt BPE needs its codes file in ``folder`` (fairseq's hub loads ``bpecodes`` from the
    model folder): refuse its absence, naming the folder and the file."""
    if bpe == "subword_nmt" and find_bpe_codes(folder) is None:
        raise ConfigError(
            f"{folder}: missing bpecodes: the checkpoint's options say bpe='subword_nmt', which needs the BPE codes "
            f"learned at training in the model folder (read as {' / '.join(BPE_CODE_FILES)}); copy them there")


class NMTTokenizer:
    """encode(texts) -> source ids ending with </s>; decode(ids) -> detokenized text."""

    def __init__(self, src_dict: Dictionary, tgt_dict: Dictionary, bpe_codes: Path | None = None,
                 source_lang: str = "en", target_lang: str = "en", tokenizer: str | None = "moses",
                 bpe: str | None = "subword_nmt", moses_dash_splits: bool = True, moses_escape: bool = True):
        self.src_dict, self.tgt_dict = src_dict, tgt_dict
        self.pad_token_id, self.eos_token_id, self.bos_token_id, self.unk_token_id = 1, 2, 0, 3
        self.source_lang, self.target_lang = source_lang or "en", target_lang or "en"
        self.dash_splits, self.escape = moses_dash_splits, moses_escape
        self._tok = self._detok = None
        if tokenizer == "moses":
            try:
                from sacremoses import MosesDetokenizer, MosesTokenizer
            except ImportError:  # pragma: no cover - environment problem
                raise EncDecError("the fairseq text pipeline needs sacremoses: pip install 'encdec[nmt]'") from None
            self._tok = MosesTokenizer(lang=self.source_lang)
            self._detok = MosesDetokenizer(lang=self.target_lang)
        elif tokenizer not in (None, "space"):
            raise ConfigError(f"tokenizer {tokenizer!r}: expected 'moses', 'space' or none")
        self._bpe = None
        self.bpe_symbol = "@@ "
        if bpe == "subword_nmt":
            if bpe_codes is None:
                raise ConfigError("BPE 'subword_nmt' needs a codes file (bpecodes) next to the dictionaries")
            try:
                from subword_nmt.apply_bpe import BPE
            except ImportError:  # pragma: no cover
                raise EncDecError("the fairseq text pipeline needs subword-nmt: pip install 'encdec[nmt]'") from None
            try:
                with open(bpe_codes, encoding="utf-8") as f:
                    self._bpe = BPE(f, separator="@@")
            except (OSError, ValueError, IndexError) as exc:
                raise ConfigError(f"{bpe_codes}: not a subword-nmt codes file ({type(exc).__name__}: {exc})") from None
        elif bpe is not None:
            raise ConfigError(f"bpe {bpe!r}: expected 'subword_nmt' or none (sentencepiece/gpt2 BPE are not "
                              f"supported by the encdec fairseq pipeline)")

    # ----------------------------------------------------------------- pieces
    def tokenize(self, text: str) -> str:
        if self._tok is None:
            return text.strip()
        return self._tok.tokenize(text.strip(), aggressive_dash_splits=self.dash_splits, return_str=True,
                                  escape=self.escape)

    def apply_bpe(self, text: str) -> str:
        return self._bpe.process_line(text) if self._bpe is not None else text

    def remove_bpe(self, text: str) -> str:
        return (text + " ").replace(self.bpe_symbol, "").rstrip() if self._bpe is not None else text

    def detokenize(self, text: str) -> str:
        if self._detok is None:
            return text
        return self._detok.detokenize(text.split())

    # ----------------------------------------------------------------- interface
    def encode(self, texts: list[str]) -> list[list[int]]:
        if isinstance(texts, str):
            texts = [texts]
        return [self.src_dict.encode_line(self.apply_bpe(self.tokenize(t))) for t in texts]

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.detokenize(self.remove_bpe(self.tgt_dict.string(ids)))

    def tokenize_target(self, text: str) -> str:
        """Moses tokenization in the target language (what fairseq-preprocess did to the targets)."""
        if self._tok is None:
            return text.strip()
        if getattr(self, "_tgt_tok", None) is None:
            from sacremoses import MosesTokenizer

            self._tgt_tok = MosesTokenizer(lang=self.target_lang)
        return self._tgt_tok.tokenize(text.strip(), aggressive_dash_splits=self.dash_splits, return_str=True,
                                      escape=self.escape)

    def encode_target(self, texts: list[str]) -> list[list[int]]:
        """Target-side ids (moses in the target language -> BPE -> target dictionary + ``</s>``), the
        reference fairseq scores (``--score-reference``). ``Engine.score`` uses it."""
        if isinstance(texts, str):
            texts = [texts]
        return [self.tgt_dict.encode_line(self.apply_bpe(self.tokenize_target(t))) for t in texts]

    def target_token_strings(self, ids) -> list[str]:
        """Target dictionary entries of ``ids`` (BPE pieces with their ``@@``)."""
        syms = self.tgt_dict.symbols
        return [syms[int(i)] if 0 <= int(i) < len(syms) else UNK for i in ids]


class FSMTTextTokenizer:
    """transformers' FSMTTokenizer (facebook/wmt19-* folders) behind the same small interface."""

    def __init__(self, path: Path):
        try:
            from transformers import FSMTTokenizer
        except ImportError:  # pragma: no cover
            raise EncDecError("FSMT model folders need transformers: pip install 'encdec[hf]'") from None
        try:
            self.tok = FSMTTokenizer.from_pretrained(str(path))
        except Exception as exc:
            raise ConfigError(f"{path}: cannot load the FSMT tokenizer ({type(exc).__name__}: {exc})") from None
        self.pad_token_id = self.tok.pad_token_id
        self.eos_token_id = self.tok.eos_token_id

    def encode(self, texts: list[str]) -> list[list[int]]:
        if isinstance(texts, str):
            texts = [texts]
        return [self.tok(t)["input_ids"] for t in texts]

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.tok.decode(ids, skip_special_tokens=True)

    def encode_target(self, texts: list[str]) -> list[list[int]]:
        """Target-side ids: moses in the target language, BPE, the TARGET vocabulary (vocab-tgt.json)
        and ``</s>``. (HF's FSMTTokenizer has no target mode: its ``text_target`` looks the pieces up in
        the source vocabulary, which is wrong wherever the two differ.)"""
        if isinstance(texts, str):
            texts = [texts]
        tok = self.tok
        lang = tok.tgt_lang
        vocab = getattr(self, "_tgt_vocab", None)
        if vocab is None:
            vocab = self._tgt_vocab = {v: k for k, v in tok.decoder.items()}
        unk = vocab.get(tok.unk_token, tok.unk_token_id)
        eos = tok.sep_token_id  # fairseq's </s> (FSMT names it sep: build_inputs_with_special_tokens)
        out = []
        for t in texts:
            if tok.do_lower_case:
                t = t.lower()
            words = tok.moses_tokenize(tok.moses_pipeline(t, lang=lang), lang=lang)
            pieces = [p for w in words if w for p in tok.bpe(w).split(" ")]
            out.append([vocab.get(p, unk) for p in pieces] + [eos])
        return out

    def target_token_strings(self, ids) -> list[str]:
        return [self.tok.decoder.get(int(i), self.tok.unk_token) for i in ids]


def _dict_for(folder: Path, lang: str | None) -> Path | None:
    if lang:
        p = folder / f"dict.{lang}.txt"
        if p.is_file():
            return p
    return None


def find_dictionaries(folder: Path, source_lang: str | None, target_lang: str | None) -> tuple[Path, Path]:
    """dict.{src}.txt / dict.{tgt}.txt, as fairseq's translation task loads them: a side whose language
    is known needs its own file (never another side's dictionary in its place); only where the
    languages are not known does a single dict.*.txt (or dict.txt) serve both sides."""
    folder = Path(folder)
    src, tgt = _dict_for(folder, source_lang), _dict_for(folder, target_lang)
    if src and tgt:
        return src, tgt
    missing = [f"dict.{lang}.txt (the {side} language {lang!r})"
               for lang, found, side in ((source_lang, src, "source"), (target_lang, tgt, "target"))
               if lang and not found]
    if missing:
        have = sorted(p.name for p in folder.glob("dict*.txt"))
        raise ConfigError(
            f"{folder}: missing {' and '.join(missing)}: fairseq's translation task loads "
            f"dict.<source_lang>.txt and dict.<target_lang>.txt from the model folder (found: "
            f"{', '.join(have) or 'no dictionary'}); copy the dictionary the model was trained with (a joined "
            f"dictionary: the same file under both names)")
    found = sorted(folder.glob("dict.*.txt")) or sorted(folder.glob("dict.txt"))
    if len(found) == 1:
        return src or found[0], tgt or found[0]
    if not found:
        raise ConfigError(f"{folder}: no fairseq dictionary (dict.<lang>.txt) found")
    if len({p.read_bytes() for p in found}) == 1:  # a joined dictionary saved once per language
        return src or found[0], tgt or found[0]
    raise ConfigError(
        f"{folder}: several different dictionaries {[p.name for p in found]} but the source/target languages "
        f"are not known (source_lang={source_lang!r}, target_lang={target_lang!r}): expected "
        f"dict.<source_lang>.txt and dict.<target_lang>.txt with the languages of the checkpoint")


def load_tokenizer(path: Path, cfg=None):
    """Family.tokenizer: a fairseq folder (dict.*.txt [+ bpecodes]) or an FSMT folder (vocab-src.json)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise ConfigError(f"{path}: tokenizer directory not found")
    extra = dict(getattr(cfg, "extra", None) or {})
    if not list(path.glob("dict*.txt")) and (path / "vocab-src.json").is_file():
        return FSMTTextTokenizer(path)
    src_lang, tgt_lang = extra.get("source_lang"), extra.get("target_lang")
    src_path, tgt_path = find_dictionaries(path, src_lang, tgt_lang)
    src_dict, tgt_dict = Dictionary.load(src_path), Dictionary.load(tgt_path)
    if cfg is not None:
        for d, rows, side in ((src_dict, cfg.encoder_vocab_size, "source"), (tgt_dict, cfg.vocab_size, "target")):
            if len(d) > rows:
                raise ConfigError(f"{d.path}: {len(d)} entries (with the 4 specials) but the model's {side} "
                                  f"embedding has {rows} rows: wrong dictionary for this model?")
            d.pad_to(rows)
    codes = find_bpe_codes(path)
    bpe = extra["bpe"] if "bpe" in extra else ("subword_nmt" if codes is not None else None)
    check_bpe_codes(path, bpe)
    return NMTTokenizer(src_dict, tgt_dict, codes, extra.get("moses_source_lang") or src_lang or "en",
                        extra.get("moses_target_lang") or tgt_lang or "en",
                        tokenizer=extra.get("tokenizer", "moses"), bpe=bpe,
                        moses_dash_splits=not extra.get("moses_no_dash_splits", False),
                        moses_escape=not extra.get("moses_no_escape", False))
