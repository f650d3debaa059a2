"""Unmerged low-rank adapters chosen per request at run time (TensorRT-LLM's ``--lora_task_uids``).

``encdec convert --lora-dir A --lora-dir B --lora-mode runtime`` keeps the base weights and writes
each adapter's factors, renamed into our parameter names, to ``lora/adapter{u}.safetensors`` (uid u
in the order given). An engine built from it loads them into a ``LoraBank``; every request names its
adapter (uid, or -1 for the base model), and each adapted linear layer adds
``x @ A[u].T @ B[u].T`` for its rows (rows of one request share the uid: beams, samples).

Our layout fuses projections (T5's q, k and v into one QKV weight; the gated FFN's two inputs), so
an adapter on q and v becomes one factor pair of the fused weight: A = [A_q; A_v] and B with B_q in
q's rows and B_v in v's rows (rank r_q + r_v, exact). Where each source row lands is found by
sending row markers through the family's own WeightMap (``map_factors``), so no family is special-
cased; a layout that moves columns instead of rows (transpose, a fuse along the input dimension)
or scales the weight is refused.

Runs on the eager runner (CPU or CUDA) and on the CUDA-graph runner (its compiled step and graphs;
on a CPU the compiled runner), whose buffers hold each row's uid; under tensor / pipeline
parallelism each rank slices the whole factors to its layers (``LoraBank``).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..errors import ConfigError, EncDecError, WeightError

LORA_DIR = "lora"


def map_factors(fam, src, factors: dict, label: str, source: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """An adapter's factors ``{source module: (A [r, in], B [out, r], scale)}`` as factors of our
    parameters ``{target: (A [R, in], B [out_t, R])}`` (the scale folded into B)."""
    from ..adapters import check_loaded, source_key
    from ..model import build_model

    keys = {}
    for module in factors:
        keys[module] = source_key(src.tensors, module, "weight")
        if keys[module] is None:
            raise WeightError(f"{label}: module {module}.weight is not in {source}")
    code_of = {keys[m]: i + 1 for i, m in enumerate(factors)}  # marker = code * 2**24 + row + 1
    markers = {}
    for k, t in src.tensors.items():
        if t.dim() == 2:
            m = torch.zeros(t.shape[0], 1, dtype=torch.float64)
            if k in code_of:
                m[:, 0] = code_of[k] * 2.0 ** 24 + torch.arange(1, t.shape[0] + 1, dtype=torch.float64)
        else:
            m = torch.zeros(t.shape, dtype=torch.float64)
        markers[k] = m
    wm = fam.make_weight_map(src.config)
    mapped, report = wm.apply(markers, None, src.config, source=source, strict=False)
    check_loaded({keys[m]: f"{label}: {m}" for m in factors}, report.dropped, fam)
    meta_model = build_model(src.config, meta=True)
    expected = meta_model.expected_shapes()
    placed: dict[str, list] = {}
    seen = set()
    for target, m in mapped.items():
        if m.dim() != 2 or not bool((m != 0).any()):
            continue
        if m.shape[1] != 1 or target not in expected or len(expected[target]) != 2:
            raise ConfigError(f"{label}: the {fam.name} family's layout moves the adapted weights' columns "
                              f"(target {target}); run-time LoRA is not supported for it: merge the adapter at "
                              f"convert (--lora-mode merge)")
        v = m[:, 0]
        rows = torch.nonzero(v).flatten()
        codes = torch.div(v[rows], 2.0 ** 24, rounding_mode="floor").long()
        src_rows = (v[rows] - codes.double() * 2.0 ** 24 - 1).long()
        for code in codes.unique().tolist():
            if code not in code_of.values():
                raise ConfigError(f"{label}: the {fam.name} family's layout scales or mixes the adapted weights "
                                  f"(target {target}); run-time LoRA is not supported for it: merge the adapter")
            sel = codes == code
            module = list(factors)[code - 1]
            placed.setdefault(target, []).append((module, rows[sel], src_rows[sel]))
            seen.add(module)
    missing = [m for m in factors if m not in seen]
    if missing:
        raise WeightError(f"{label}: module(s) {', '.join(missing)} reach no parameter of the model")
    for target, parts in placed.items():  # refused here, not at the first load of the engine
        if not hasattr(meta_model.get_submodule(target.removesuffix(".weight")), "lora"):
            raise ConfigError(f"{label}: {', '.join(sorted({m for m, _, _ in parts}))} adapts {target}, which is not "
                              f"a linear layer of ours (the output embedding); run-time LoRA serves linear layers: "
                              f"merge this adapter at convert (--lora-mode merge)")
    out = {}
    for target, parts in placed.items():
        n_out, n_in = expected[target]
        ranks = [factors[m][0].shape[0] for m, _, _ in parts]
        A = torch.zeros(sum(ranks), n_in, dtype=torch.float32)
        B = torch.zeros(n_out, sum(ranks), dtype=torch.float32)
        c = 0
        for (module, trow, srow), r in zip(parts, ranks):
            a, b, scale = factors[module]
            if a.shape[1] != n_in:
                raise WeightError(f"{label}: {module}: lora_A has {a.shape[1]} inputs, {target} has {n_in}")
            A[c:c + r] = a.float()
            B[trow, c:c + r] = scale * b.float()[srow]
            c += r
        out[target] = (A, B)
    return out


def write_bank(folder: Path, adapters: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """``folder/adapter{u}.safetensors``: ``{target}.lora_A`` and ``{target}.lora_B`` (fp32)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for u, fac in enumerate(adapters):
        t = {}
        for target, (a, b) in fac.items():
            t[f"{target}.lora_A"] = a.contiguous()
            t[f"{target}.lora_B"] = b.contiguous()
        save_file(t, str(folder / f"adapter{u}.safetensors"), metadata={"uid": str(u)})


class LoraDelta:
    """One adapted layer's factors (the ``lora`` attribute of a ColumnLinear / RowLinear): called with
    the layer's input, returns each row's update, or None while no adapter is active.

    An attribute the layer reads rather than a forward hook: torch.compile guards on module
    attributes it reads, but not on hooks (``skip_nnmodule_hook_guards``), and reused a step
    compiled for a model without adapters for one with them (seen on an H200: the adapters silently
    missing from the compiled step)."""

    def __init__(self, bank: "LoraBank", A: torch.Tensor, B: torch.Tensor, slot: torch.Tensor):
        self.bank, self.A, self.B, self.slot = bank, A, B, slot

    def delta(self, x: torch.Tensor, uids: torch.Tensor) -> torch.Tensor:
        """Each row's update as two dense products (rounded to x's dtype after each)."""
        n = x.shape[0]
        x3 = x.reshape(n, -1, x.shape[-1])
        xa = torch.matmul(x3, self.A.t())  # [n, T, U*R]: every adapter's down-projection
        keep = (self.slot.unsqueeze(0) == uids.unsqueeze(1)).unsqueeze(1)  # [n, 1, U*R]: the row's adapter
        delta = torch.matmul(torch.where(keep, xa, torch.zeros((), dtype=xa.dtype, device=xa.device)), self.B)
        return delta.reshape(*x.shape[:-1], self.B.shape[1])

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the layer's output for input ``x``) plus each row's update; ``y`` itself while no
        adapter is active.

        Tried and dropped (2026-11-30, H200, bart-large at 64 rows): one Triton kernel for the two
        products and the add, each program recomputing the down-projection of its rows. Correct, but
        no faster with adapters on q and v (1.155 against 1.132 ms per step) and much slower on every
        linear layer at rank 16 (2.54 against 1.64 ms): few programs, each looping over all of K."""
        uids = self.bank._row_uids(x.shape[0])
        if uids is None:
            return y
        return y + self.delta(x, uids).to(y.dtype)


class LoraBank:
    """Every adapter's factors, stacked per adapted layer, which each adapted layer adds for its rows
    while ``rows(uids)`` (per request) or ``static_rows(idx)`` (per row) is active.

    A layer's factors are kept as ``A [U*R, in]`` and ``B [U*R, out]`` (adapter u in rows
    ``u*R .. u*R + R``, R the largest rank, smaller ranks zero-padded) with ``slot[j]`` = the adapter
    of row j. A batch's update is two dense products over all adapters, the first one's columns of
    other adapters zeroed per row: ``((x A^T) * [slot == uid(row)]) B``. Static shapes, no gather of
    factors per row, so the same code runs in the eager runner and, traced by torch.compile, inside
    the CUDA-graph runner's graphs (there the per-row uids are a static buffer the runner fills)."""

    def __init__(self, model, folder: Path, count: int):
        from safetensors.torch import load_file

        from ..checkpoint import shard_plan, shard_rule, shard_tensor, stage_of

        # parallel runs: the files hold every adapter's whole factors; this rank keeps the layers of
        # its pipeline stage and, under tensor parallelism, the slices that match its weights: B's
        # output rows of a column-parallel layer, A's input columns of a row-parallel one (whose
        # partial updates join the layer's all-reduce)
        ctx = getattr(model, "ctx", None)
        tp, tp_rank = (ctx.tp_size, ctx.tp_rank) if ctx is not None else (1, 0)
        pp, pp_rank = (ctx.pp_size, ctx.pp_rank) if ctx is not None else (1, 0)
        plan = shard_plan(model.cfg)
        self.count = count
        self._uids: torch.Tensor | None = None
        self._uid_list: list[int] = []
        self._rows: torch.Tensor | None = None
        self._off = False  # static_rows(None): no row uses an adapter (the layers add nothing)
        per: dict[str, list] = {}
        for u in range(count):
            f = folder / f"adapter{u}.safetensors"
            if not f.is_file():
                raise WeightError(f"{f}: adapter file missing (the engine lists {count} adapters)")
            try:
                t = load_file(str(f))
            except Exception as exc:  # noqa: BLE001 - a corrupt file: name it
                raise WeightError(f"{f}: cannot read: {type(exc).__name__}: {exc}") from None
            for key in t:
                if key.endswith(".lora_A"):
                    target = key[: -len(".lora_A")]
                    per.setdefault(target, [None] * count)[u] = (t[key], t[target + ".lora_B"])
        dev, dt = model.device, model.dtype
        self.device = dev
        self.layers = {}
        for target, facs in per.items():
            st = stage_of(target, model.cfg, pp) if pp > 1 else None
            if st is not None and st != pp_rank:
                continue  # another pipeline stage's layer
            rule = shard_rule(target, plan)
            if tp > 1 and rule is not None and rule.kind not in ("column", "row"):
                raise ConfigError(f"{folder}: adapted parameter {target} is split by {rule.kind} under tensor "
                                  f"parallelism, which run-time LoRA does not slice; merge the adapter instead")
            if tp > 1 and rule is not None:
                cut = []
                for f in facs:
                    if f is not None and rule.kind == "column":  # B [out, r]: the weight's output rows
                        f = (f[0], shard_tensor(target, f[1], plan, tp, tp_rank))
                    elif f is not None:  # row: A [r, in], the weight's input columns
                        f = (shard_tensor(target, f[0], plan, tp, tp_rank), f[1])
                    cut.append(f)
                facs = cut
            path = target.removesuffix(".weight")
            try:
                mod = model.get_submodule(path)
            except AttributeError:
                raise WeightError(f"{folder}: adapted parameter {target} is not in the model") from None
            w = getattr(mod, "weight", None)
            if not hasattr(mod, "lora") or not isinstance(w, torch.Tensor) or w.dim() != 2:
                raise WeightError(f"{folder}: adapted parameter {target} is not the weight of a linear layer")
            r_max = max(f[0].shape[0] for f in facs if f is not None)
            n_out, n_in = w.shape
            A = torch.zeros(count * r_max, n_in, dtype=dt, device=dev)
            B = torch.zeros(count * r_max, n_out, dtype=dt, device=dev)
            for u, f in enumerate(facs):
                if f is None:
                    continue
                a, b = f
                if a.shape[1] != n_in or b.shape[0] != n_out:
                    raise WeightError(f"{folder / f'adapter{u}.safetensors'}: {target} factors {tuple(a.shape)} / "
                                      f"{tuple(b.shape)} do not fit the weight {tuple(w.shape)}")
                A[u * r_max: u * r_max + a.shape[0]] = a.to(dt)
                B[u * r_max: u * r_max + b.shape[1]] = b.t().to(dt)
            slot = torch.arange(count, device=dev).repeat_interleave(r_max)
            self.layers[target] = (A, B)
            mod.lora = LoraDelta(self, A, B, slot)

    def _row_uids(self, n: int) -> torch.Tensor | None:
        """The adapter uid of each of ``n`` input rows (-1: none), or None where no adapter is active."""
        if self._off:
            return None
        rows = self._rows
        if rows is not None:
            if rows.shape[0] != n:
                raise EncDecError(f"run-time LoRA: {n} rows for a row index of {rows.shape[0]}")
            return rows
        uids = self._uids
        if uids is None:
            return None
        if n == uids.shape[0]:
            return uids
        if n % uids.shape[0]:
            raise EncDecError(f"run-time LoRA: {n} rows for {uids.shape[0]} requests")
        return uids.repeat_interleave(n // uids.shape[0])

    def check_uids(self, uids) -> list[int]:
        bad = [u for u in uids if not isinstance(u, int) or isinstance(u, bool) or not -1 <= u < self.count]
        if bad:
            raise EncDecError(f"LoRA task uid(s) {bad}: expected -1 (the base model) or an adapter uid in "
                              f"[0, {self.count})")
        return list(uids)

    @contextlib.contextmanager
    def rows(self, uids):
        """Within this block, request i uses adapter ``uids[i]`` (-1: none); a layer's input rows are
        the requests' rows, each repeated equally often (beams, samples)."""
        uids = self.check_uids(uids)
        prev = self._uids, self._uid_list
        self._uids = torch.tensor(uids, dtype=torch.long, device=self.device)
        self._uid_list = uids
        try:
            yield
        finally:
            self._uids, self._uid_list = prev

    @contextlib.contextmanager
    def static_rows(self, idx: torch.Tensor | None):
        """Within this block, input row r uses adapter ``idx[r]`` (-1: none), for every adapted layer:
        ``idx`` is a [rows] long tensor on the model's device (a CUDA-graph runner's static buffer,
        filled before each replay); None: no row uses an adapter, the layers add nothing (the
        runner's graphs for batches of base-model requests: the base model's kernels). Takes
        precedence over ``rows``."""
        prev = self._rows, self._off
        self._rows, self._off = idx, idx is None
        try:
            yield
        finally:
            self._rows, self._off = prev

    @property
    def active(self) -> bool:
        return self._uids is not None

    @property
    def any_adapter(self) -> bool:
        """Whether a request of the active ``rows(uids)`` names an adapter (a host-side check)."""
        return any(u >= 0 for u in self._uid_list) if self._uids is not None else False

    def request_uids(self, n: int) -> torch.Tensor | None:
        """The active per-request uids (``rows``) for a batch of ``n`` requests, or None."""
        if self._uids is None:
            return None
        if self._uids.shape[0] != n:
            raise EncDecError(f"run-time LoRA: {n} requests for {self._uids.shape[0]} task uids")
        return self._uids


def active(model) -> bool:
    bank = getattr(model, "lora_bank", None)
    return bank is not None and bank.active
