"""The synthetic task of the bundled models: English number spelling and its inverse.

    spell: 4721                                  -> four thousand seven hundred twenty-one
    digits: four thousand seven hundred twenty-one -> 4721

Anyone can check an answer (``check``), the output length varies from 1 to 42 characters, and
the model must read the whole input (every digit / word changes the answer). Numbers run from 0
to MAX_NUMBER. The split is a pure function of fixed seeds, so the training script, the tests and
the docs share it: TEST_NUMBERS (200 numbers, never seen in training in either direction) give
the 200 held-out inputs of ``held_out()``; DEV_NUMBERS (200 more) are for progress logging while
training; everything else is training data.

No dependency beyond the standard library: this file ships with the package.
"""
from __future__ import annotations

import random
import re

MAX_NUMBER = 9999
SPLIT_SEED = 20261125
N_TEST = 200
N_DEV = 200

ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")

SPELL_PREFIX = "spell: "
DIGITS_PREFIX = "digits: "


def spell(n: int) -> str:
    """0 <= n <= 9999 in words: 'four thousand seven hundred twenty-one', 'nine hundred five'."""
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"spell: {n} is outside 0..{MAX_NUMBER}")
    if n < 20:
        return ONES[n]
    words = []
    thousands, rest = divmod(n, 1000)
    hundreds, rest = divmod(rest, 100)
    if thousands:
        words += [ONES[thousands], "thousand"]
    if hundreds:
        words += [ONES[hundreds], "hundred"]
    if rest:
        if rest < 20:
            words.append(ONES[rest])
        else:
            t, o = divmod(rest, 10)
            words.append(TENS[t] + (f"-{ONES[o]}" if o else ""))
    return " ".join(words)


_WORD = {w: i for i, w in enumerate(ONES)} | {w: 10 * i for i, w in enumerate(TENS) if w}


def unspell(text: str) -> int:
    """The inverse of spell(); raises ValueError on anything spell() would not write."""
    text = text.strip()
    if not re.fullmatch(r"[a-z]+(?:[ -][a-z]+)*", text):
        raise ValueError(f"not a spelled number: {text!r}")
    total, cur = 0, 0
    for word in text.split(" "):
        if word == "thousand":
            total, cur = cur * 1000, 0
        elif word == "hundred":
            cur *= 100
        else:
            for part in word.split("-"):
                if part not in _WORD:
                    raise ValueError(f"not a spelled number: {text!r}")
                cur += _WORD[part]
    n = total + cur
    if not 0 <= n <= MAX_NUMBER or spell(n) != text:
        raise ValueError(f"not a canonical spelled number: {text!r}")
    return n


def example(n: int, direction: str) -> tuple[str, str]:
    """(input, target) for number n; direction 'spell' or 'digits'."""
    if direction == "spell":
        return f"{SPELL_PREFIX}{n}", spell(n)
    if direction == "digits":
        return f"{DIGITS_PREFIX}{spell(n)}", str(n)
    raise ValueError(f"direction {direction!r}: expected 'spell' or 'digits'")


def answer(text: str) -> str:
    """The right output for an input of either direction."""
    text = text.strip()
    if text.startswith(SPELL_PREFIX.strip()):
        return spell(int(text[len(SPELL_PREFIX.strip()):].strip()))
    if text.startswith(DIGITS_PREFIX.strip()):
        return str(unspell(text[len(DIGITS_PREFIX.strip()):]))
    raise ValueError(f"input {text!r} starts with neither {SPELL_PREFIX!r} nor {DIGITS_PREFIX!r}")


def check(text: str, output: str) -> bool:
    """Whether output is exactly the right answer to input text."""
    try:
        return output.strip() == answer(text)
    except ValueError:
        return False


def _split() -> tuple[list[int], list[int], list[int]]:
    rng = random.Random(SPLIT_SEED)
    # the held-out numbers: 10 in 20..99, 30 in 100..999, the rest 4-digit, so short and long
    # answers are both covered; dev likewise from what is left. 0..19 are the lexicon (each its
    # own word, nothing to infer them from) and always train.
    pools = [list(range(20, 100)), list(range(100, 1000)), list(range(1000, MAX_NUMBER + 1))]
    test, dev = [], []
    for pool, k in zip(pools, (10, 30, N_TEST - 40)):
        picked = rng.sample(pool, 2 * k)
        test += picked[:k]
        dev += picked[k:]
    taken = set(test) | set(dev)
    train = [n for n in range(MAX_NUMBER + 1) if n not in taken]
    return sorted(test), sorted(dev), train


TEST_NUMBERS, DEV_NUMBERS, TRAIN_NUMBERS = _split()


def _pairs(numbers: list[int], seed: int) -> list[tuple[str, str]]:
    """One input per number; the direction alternates over a seeded shuffle (half each way)."""
    order = list(numbers)
    random.Random(seed).shuffle(order)
    return [example(n, "spell" if i % 2 == 0 else "digits") for i, n in enumerate(order)]


def held_out() -> list[tuple[str, str]]:
    """The 200 held-out (input, target) pairs: 100 'spell:' and 100 'digits:', none seen in training."""
    return _pairs(TEST_NUMBERS, SPLIT_SEED + 1)


def dev_set() -> list[tuple[str, str]]:
    return _pairs(DEV_NUMBERS, SPLIT_SEED + 2)


def train_pairs() -> list[tuple[str, str]]:
    """Every training number in both directions (deterministic order)."""
    return [example(n, d) for n in TRAIN_NUMBERS for d in ("spell", "digits")]


def corpus_lines() -> list[str]:
    """Text for training a tokenizer: every training input and target (no held-out text)."""
    out = []
    for src, tgt in train_pairs():
        out += [src, tgt]
    return out
