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


def non_floating(entries, what: str = "tensor(s)") -> str:
    """The refusal of weights that are not floating point (an integer or bool tensor would be cast, or
    promoted by a fuse / merge, silently): ``entries`` like "name (int32)"."""
    return f"{what} of a non-floating dtype: {', '.join(entries)}; expected float32, float16 or bfloat16 weights"


def first_non_utf8(texts) -> tuple[int, int, str] | None:
    """(index of the text, position, character) of the first character UTF-8 cannot encode (a lone
    surrogate: a byte a decoder kept with ``surrogateescape``, or a broken string built in Python);
    None when every string of ``texts`` encodes (other items are skipped)."""
    for i, t in enumerate(texts):
        if isinstance(t, str):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as exc:
                return i, exc.start, t[exc.start]
    return None


def check_utf8(what: str, texts) -> None:
    """Refuse texts with a lone surrogate by name and position, before a tokenizer fails on them."""
    bad = first_non_utf8(texts)
    if bad is not None:
        i, pos, c = bad
        raise EncDecError(f"{what}[{i}]: character {pos} is U+{ord(c):04X}, a lone surrogate: expected text "
                          f"that UTF-8 can encode")
