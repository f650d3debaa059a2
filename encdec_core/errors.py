"""User-facing errors: each names the file, field, value and what was expected."""
from __future__ import annotations


class EncDecError(Exception):
    """An error caused by user input; the CLI prints it on one line and exits non-zero."""


class ConfigError(EncDecError):
    pass


class WeightError(EncDecError):
    pass


class LimitError(EncDecError):
    pass


def check_utf8(what: str, texts) -> None:
    """Strings that cannot be UTF-8 encoded (lone surrogates: bytes a decoder kept with
    ``surrogateescape``, or a broken string built in Python) refused by name and position, before
    a tokenizer fails on them."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            continue
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:
            c = ord(t[exc.start])
            raise EncDecError(f"{what}[{i}]: character {exc.start} is U+{c:04X}, a lone surrogate: expected text "
                              f"that UTF-8 can encode") from None
