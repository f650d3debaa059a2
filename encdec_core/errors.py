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
