"""WeightMap: source checkpoint names -> our parameter names, as data.

An ordered table of rules. Each rule has a source pattern (or several, for ``fuse``), a target
pattern (or several, for ``split``/``alias``) and one op from a closed set:

    identity   copy the tensor
    fuse       concatenate several sources along ``dim`` into one target (q,k,v -> qkv)
    split      cut one source into equal chunks along ``dim`` into several targets
    transpose  swap the last two dims
    scale      multiply by ``factor``
    alias      one source fills several targets (tied embeddings)
    drop       consume the source and produce nothing (buffers, duplicates); with ``copy_of`` (a
               source pattern) the dropped tensor must equal that one, else the map reports a
               conflict: dropping a copy that differs would change the model

Patterns use named placeholders: ``{i}``, ``{j}``, ``{k}``, ``{n}`` match a decimal number, any
other ``{name}`` matches one dotted component. Placeholders are matched where they are written,
never "every digit" (T5's ``layer.1`` is a sub-layer slot, not a layer index).

Applying a map reports every unmatched source key and every unfilled target together, and every
source tensor of a non-floating dtype that a rule loads (named by its source key: ``fuse`` and
``scale`` would promote it to float before any later check could see it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

from .errors import WeightError, non_floating

OPS = ("identity", "fuse", "split", "transpose", "scale", "alias", "drop")
_NUMERIC = {"i", "j", "k", "n"}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _compile(pattern: str) -> re.Pattern:
    out, pos = [], 0
    seen = set()
    for m in _PLACEHOLDER.finditer(pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        name = m.group(1)
        if name in seen:
            out.append(f"(?P={name})")
        else:
            seen.add(name)
            out.append(f"(?P<{name}>\\d+)" if name in _NUMERIC else f"(?P<{name}>[^.]+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("^" + "".join(out) + "$")


def _as_tuple(x) -> tuple:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One tensor a copy of the other: the same shape and values (``b`` compared in ``a``'s dtype)."""
    return a.shape == b.shape and torch.equal(a, b.to(a.dtype))


@dataclass(frozen=True)
class Rule:
    source: str | tuple[str, ...]
    target: str | tuple[str, ...] | None = None
    op: str = "identity"
    dim: int = 0
    factor: float = 1.0
    when: str | None = None  # apply only if this config flag (an attribute name) is true; "!x" negates
    copy_of: str | None = None  # drop: the source this one must equal (a duplicate of it), placeholders allowed

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"WeightMap rule {self.source!r}: op '{self.op}' not in {OPS}")
        n_src, n_tgt = len(_as_tuple(self.source)), len(_as_tuple(self.target))
        if n_src == 0:
            raise ValueError("WeightMap rule without a source pattern")
        if self.op == "fuse" and (n_src < 2 or n_tgt != 1):
            raise ValueError(f"fuse rule {self.source!r} needs >= 2 sources and 1 target")
        if self.op in ("split", "alias") and n_tgt < 2:
            raise ValueError(f"{self.op} rule {self.source!r} needs >= 2 targets")
        if self.op not in ("fuse",) and n_src != 1:
            raise ValueError(f"{self.op} rule {self.source!r} takes one source")
        if self.op == "drop" and n_tgt:
            raise ValueError(f"drop rule {self.source!r} takes no target")
        if self.copy_of is not None and self.op != "drop":
            raise ValueError(f"{self.op} rule {self.source!r}: copy_of is for drop rules")
        if self.op not in ("drop", "split", "alias") and n_tgt != 1:
            raise ValueError(f"{self.op} rule {self.source!r} needs exactly one target")


@dataclass
class MapReport:
    unmatched: list[str] = field(default_factory=list)
    unfilled: list[str] = field(default_factory=list)
    shape_errors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # source keys a "drop" rule consumed (not an error)
    dtype_errors: list[str] = field(default_factory=list)  # "key (int32)": loaded source tensors, not floating
    origin: dict[str, tuple[str, ...]] = field(default_factory=dict)  # target -> the source keys it came from
    conflicts: list[str] = field(default_factory=list)  # dropped duplicates that differ from their original

    @property
    def ok(self) -> bool:
        return not (self.unmatched or self.unfilled or self.shape_errors or self.dtype_errors or self.conflicts)

    def message(self, source: str = "checkpoint") -> str:
        parts = []
        if self.unmatched:
            parts.append(f"{len(self.unmatched)} source tensor(s) matched no rule: {', '.join(self.unmatched)}")
        if self.unfilled:
            parts.append(f"{len(self.unfilled)} parameter(s) missing from the source: {', '.join(self.unfilled)}")
        if self.shape_errors:
            parts.append("wrong shape: " + "; ".join(self.shape_errors))
        if self.dtype_errors:
            parts.append(non_floating(self.dtype_errors, f"{len(self.dtype_errors)} source tensor(s)"))
        if self.conflicts:
            parts.append("; ".join(self.conflicts))
        return f"{source}: " + " | ".join(parts)


@dataclass(frozen=True)
class WeightMap:
    rules: Sequence[Rule]

    def __post_init__(self):
        object.__setattr__(self, "_compiled", [[_compile(p) for p in _as_tuple(r.source)] for r in self.rules])

    def apply(
        self,
        state: Mapping[str, torch.Tensor],
        expected: Mapping[str, tuple] | None = None,
        config=None,
        source: str = "checkpoint",
        strict: bool = True,
    ) -> tuple[dict[str, torch.Tensor], MapReport]:
        """Rename ``state``. ``expected`` maps each target name to its shape (from the model).

        Returns (tensors, report). With ``strict`` a non-empty report raises WeightError.
        """
        out: dict[str, torch.Tensor] = {}
        consumed: set[str] = set()
        report = MapReport()
        keys = list(state.keys())

        def check_dtype(names) -> None:  # before cat / multiply can promote an integer or bool tensor
            for n in names:
                x = state[n]
                if not x.is_floating_point():
                    report.dtype_errors.append(f"{n} ({str(x.dtype).replace('torch.', '')})")
        for rule, pats in zip(self.rules, self._compiled):
            if rule.when is not None and config is not None:
                flag = rule.when.lstrip("!")
                val = bool(getattr(config, flag))
                if rule.when.startswith("!"):
                    val = not val
                if not val:
                    continue
            srcs = _as_tuple(rule.source)
            for key in keys:
                if key in consumed:
                    continue
                m = pats[0].match(key)
                if not m:
                    continue
                groups = m.groupdict()
                if rule.op == "fuse":
                    others = [s.format(**groups) for s in srcs[1:]]
                    if any(o not in state for o in others):
                        continue  # incomplete group: left for later rules / reported unmatched
                    tensors = [state[key]] + [state[o] for o in others]
                    consumed.update([key, *others])
                    check_dtype([key, *others])
                    target = rule.target.format(**groups)
                    report.origin[target] = (key, *others)
                    try:
                        out[target] = torch.cat(tensors, dim=rule.dim)
                    except (RuntimeError, IndexError):  # shapes that do not line up: report, never raise
                        shapes = ", ".join(f"{n} {tuple(x.shape)}" for n, x in zip([key, *others], tensors))
                        report.shape_errors.append(f"cannot fuse {shapes} along dim {rule.dim}")
                    continue
                consumed.add(key)
                t = state[key]
                if rule.op == "drop":
                    report.dropped.append(key)
                    orig = rule.copy_of.format(**groups) if rule.copy_of else None
                    if orig in state and not same_values(t, state[orig]):
                        report.conflicts.append(
                            f"{key} differs from {orig}, of which this model keeps one table (transformers would "
                            f"use both; dropping {key} would change the model): not supported")
                    continue
                targets = [tg.format(**groups) for tg in _as_tuple(rule.target)]
                check_dtype([key])
                report.origin.update({tg: (key,) for tg in targets})
                if rule.op == "identity":
                    out[targets[0]] = t
                elif rule.op == "transpose":
                    if t.dim() < 2:
                        report.shape_errors.append(f"{key} {tuple(t.shape)} cannot be transposed (needs >= 2 dims)")
                        continue
                    out[targets[0]] = t.transpose(-1, -2).contiguous()
                elif rule.op == "scale":
                    out[targets[0]] = t * rule.factor
                elif rule.op == "alias":
                    for tg in targets:
                        out[tg] = t
                elif rule.op == "split":
                    if t.dim() == 0 or not -t.dim() <= rule.dim < t.dim() or t.shape[rule.dim] % len(targets):
                        report.shape_errors.append(
                            f"{key} {tuple(t.shape)} cannot be split in {len(targets)} along dim {rule.dim}")
                        continue
                    for tg, chunk in zip(targets, t.chunk(len(targets), dim=rule.dim)):
                        out[tg] = chunk.contiguous()
        report.unmatched = [k for k in keys if k not in consumed]
        if expected is not None:
            report.unfilled = [k for k in expected if k not in out]
            for k, shape in expected.items():
                if k in out and tuple(out[k].shape) != tuple(shape):
                    src = report.origin.get(k, ())
                    came = f" (from {', '.join(f'{n} {tuple(state[n].shape)}' for n in src)})" if src else ""
                    report.shape_errors.append(f"{k} has {tuple(out[k].shape)}, expected {tuple(shape)}{came}")
            extra = [k for k in out if k not in expected]
            if extra:
                report.unmatched += [f"{k} (produced, but the model has no such parameter)" for k in extra]
        if strict and not report.ok:
            raise WeightError(report.message(source))
        return out, report

    def validate(self, state, expected, config=None, source: str = "checkpoint") -> MapReport:
        return self.apply(state, expected, config, source, strict=False)[1]


def rules(*items: Iterable) -> WeightMap:
    """Build a WeightMap from tuples ``(source, target[, op[, kwargs]])`` or Rule objects."""
    out = []
    for it in items:
        if isinstance(it, Rule):
            out.append(it)
            continue
        src, tgt, *rest = it
        op = rest[0] if rest else "identity"
        kw = rest[1] if len(rest) > 1 else {}
        out.append(Rule(src, tgt, op, **kw))
    return WeightMap(out)
