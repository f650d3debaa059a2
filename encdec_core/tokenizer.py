"""Text <-> ids. Families may supply their own codec (fairseq BPE, mBART language codes);
otherwise an HF tokenizer is loaded from the model folder with from_pretrained(dir)."""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError, EncDecError


class HFTokenizer:
    def __init__(self, path: Path):
        try:
            from transformers import AutoTokenizer
        except ImportError:  # pragma: no cover - environment problem
            raise EncDecError("the HF tokenizer needs `transformers` (pip install 'encdec[hf]')") from None
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{path}: tokenizer directory not found")
        try:
            self.tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:
            raise ConfigError(f"{path}: cannot load a tokenizer ({type(exc).__name__}: {exc})") from None
        self.path = path
        self.pad_token_id = self.tok.pad_token_id
        self.eos_token_id = self.tok.eos_token_id

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [self.tok(t)["input_ids"] for t in texts]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def encode_target(self, texts: list[str]) -> list[list[int]]:
        """Target-side ids of each text, as HF tokenizes ``text_target`` (labels): for T5
        ``tokens </s>``, for BART ``<s> tokens </s>``. Scoring (``Engine.score``) uses it."""
        if isinstance(texts, str):
            texts = [texts]
        return [list(self.tok(text_target=t)["input_ids"]) for t in texts]

    def target_token_strings(self, ids: list[int]) -> list[str]:
        """The vocabulary entries of target ids (sub-word pieces, not detokenized text)."""
        out = []
        for i in ids:  # one at a time: an id past the tokenizer's vocabulary (padded model rows) is no error
            try:
                t = self.tok.convert_ids_to_tokens(int(i))
            except (IndexError, KeyError, ValueError, TypeError, OverflowError):
                t = None
            out.append(f"<id {int(i)}>" if t is None else str(t))
        return out

    def lang_id(self, code: str) -> int:
        tid = self.tok.convert_tokens_to_ids(code)
        if tid is None or tid == self.tok.unk_token_id:
            raise ConfigError(f"target language {code!r}: not a token of the tokenizer in {self.path}")
        return tid


def load_tokenizer(family, path: Path, cfg):
    if family is not None and family.tokenizer is not None:
        return family.tokenizer(Path(path), cfg)
    return HFTokenizer(Path(path))
