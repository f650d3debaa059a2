"""Generation: greedy, sampling and beam search over a decoder runner.

Results equal HF transformers' (v5) ``generate`` with the same settings: same option names and
defaults, same length rules (for encoder-decoders ``max_length`` / ``min_length`` count the decoder
start token; ``max_new_tokens`` / ``min_new_tokens`` win when set), same logits-processor order,
same tie-breaking (the same torch ops pick the tokens) and the same output layout.

A runner hides how the decoder runs (eager here; a CUDA-graph runner elsewhere):

    runner.prefill(input_ids, attention_mask, expand, max_len)  # encoder + cross K/V, rows x expand
    runner.step(tokens[N]) -> fp32 logits [N, V]                # one position for every row; may be
                                                                # a static buffer the next step overwrites
    runner.reorder(index[N])                                    # beam search: rows take rows `index`

The loop keeps its state in tensors on the model's device and syncs with the host once per step
(the stopping test). Under tensor / pipeline parallelism every rank sees the same logits and runs
the same loop; sampling draws from a torch.Generator seeded from ``seed`` so ranks agree (when none
is given and the model runs on several ranks, rank 0 draws one from torch's global generator and sends
it to the others). Without a seed on one rank, sampling uses torch's global generator, like HF.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..errors import ConfigError, EncDecError
from .encode import encode_grouped
from .logits import LogitsPipeline

# HF's global defaults (GenerationConfig._get_default_generation_params), for the options we run.
_DEFAULTS = dict(
    max_new_tokens=None, min_new_tokens=None, max_length=None, min_length=None,
    num_beams=1, length_penalty=1.0, early_stopping=False, num_return_sequences=1,
    do_sample=False, temperature=1.0, top_k=50, top_p=1.0, seed=None,
    no_repeat_ngram_size=0, repetition_penalty=1.0, suppress_tokens=None, begin_suppress_tokens=None,
    bad_words_ids=None,
)
_DEFAULT_MAX_NEW = 20  # HF: max_length 20 on top of the decoder prompt when nothing sets a length
# Sampling divides the fp32 scores by the temperature. Below 1e-5 a logit gap of 0.001 is already a
# probability ratio of e**100: the draw is greedy decoding in effect, and smaller values only bring
# the scores closer to fp32's overflow (a logit x overflows below a temperature of x / 3.4e38, and
# under ~1.4e-45 the temperature itself rounds to 0 in fp32: inf / nan probabilities, an internal error
# in torch.multinomial; HF's sampling fails the same way). do_sample false is the way to greedy decoding.
MIN_TEMPERATURE = 1e-5
_TOKEN_FIELDS = ("forced_bos_token_id", "forced_eos_token_id", "eos_token_id", "pad_token_id",
                 "decoder_start_token_id")

# generation_config.json keys that do not change the tokens chosen (or that we fill from elsewhere)
_IGNORED = {
    "transformers_version", "_from_model_config", "use_cache", "output_attentions", "output_hidden_states",
    "output_scores", "output_logits", "return_dict_in_generate", "cache_implementation", "cache_config",
    "compile_config", "disable_compile", "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind", "bos_token_id", "max_time",
    "trust_remote_code", "_commit_hash", "streaming", "token_healing", "prefill_chunk_size",
}
# options HF would act on that we do not implement: allowed only at their neutral value
_NEUTRAL = {
    "num_beam_groups": (None, 1), "diversity_penalty": (None, 0.0), "penalty_alpha": (None, 0.0),
    "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "min_p": (None,),
    "top_h": (None,), "encoder_repetition_penalty": (None, 1.0), "encoder_no_repeat_ngram_size": (None, 0),
    "force_words_ids": (None,), "constraints": (None,), "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False), "remove_invalid_values": (None, False), "guidance_scale": (None, 1.0),
    "watermarking_config": (None,), "stop_strings": (None,), "low_memory": (None, False), "dola_layers": (None,),
    "prompt_lookup_num_tokens": (None,), "assistant_early_exit": (None,), "max_matching_ngram_size": (None,),
    "use_mtp": (None, False), "forced_decoder_ids": (None,), "num_assistant_tokens_schedule": (None, "constant"),
}


def hf_generation_keys() -> frozenset[str]:
    """The generation options HF reads from a config.json that stands in for a missing
    generation_config.json: ours (not ``seed``), those accepted at their neutral values only (a
    config.json that sets one is refused, as a generation_config.json would be), and bos_token_id."""
    ours = set(GenerationConfig.field_names()) - {"seed"}
    return frozenset(ours | set(_NEUTRAL) | {"bos_token_id"})


def _as_id_list(v) -> tuple[int, ...] | None:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),)


def _plain_scalar(v):
    """A numpy scalar or a 0-d numpy / torch array given for an option, as the Python number (or bool)
    it holds: HF's generate takes them (it only compares them and does arithmetic), and the checks
    and the runners expect Python numbers. Anything else is returned unchanged (and checked as given)."""
    if type(v).__module__.split(".")[0] in ("numpy", "torch") and getattr(v, "ndim", None) == 0:
        return v.item()
    return v


def length_penalty_bound(max_len: int) -> float:
    """The largest |length_penalty| beam search takes for outputs up to ``max_len`` tokens (start token
    included): a beam's score is sum_logprob / length ** length_penalty in fp32 (HF's formula and
    dtype), and length ** |length_penalty| is kept within 2**64 for every length up to ``max_len``.
    That leaves 2**64 of fp32's range (normal numbers 2**-126 to 2**128) for the log-prob sum it
    divides (or, for a negative penalty, multiplies), so scores stay finite, normal numbers that still
    rank. Past 2**128 the power is inf in fp32 (every score -0.0, no ranking at all), and past 2**1024
    the host's float overflows (BeamState's table: an internal OverflowError, an HTTP 500 in serve).
    The bound is 64 / log2(max_len), rounded down to 2 decimals (the value checked is the one the
    message shows): 14.57 for HF's default 20 new tokens, 8.36 for 200, 6.39 for 1024, far beyond the
    penalties in use (0.6 to 2)."""
    return math.floor(64.0 / math.log2(max(int(max_len), 2)) * 100) / 100


@dataclass
class GenerationConfig:
    """Generation options under HF's names and meanings. ``None`` lengths mean "not set"."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    max_length: int | None = None  # counts the decoder start token (HF, encoder-decoder)
    min_length: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never"
    num_return_sequences: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int | None = None
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    suppress_tokens: list[int] | None = None  # never generated
    begin_suppress_tokens: list[int] | None = None  # not generated as the first token
    bad_words_ids: list[list[int]] | None = None  # token sequences never completed
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    max_position_embeddings: int | None = None  # caps the default max_length (HF does the same)
    source: str = field(default="generation config", repr=False, compare=False)
    origins: dict = field(default_factory=dict, repr=False, compare=False)  # field -> where its value came from

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("source", "origins", "max_position_embeddings")]

    @classmethod
    def from_model(cls, cfg, generation_config: Mapping[str, Any] | None = None, **overrides) -> "GenerationConfig":
        """Options from the model's generation_config.json (a dict; None or {} when absent), with
        ``overrides`` on top (a None override means "not given"). Like HF: a model without a
        generation_config.json takes its special tokens from the model config."""
        names = set(cls.field_names())
        unknown = sorted(k for k in overrides if k not in names)
        if unknown:
            raise ConfigError(f"generate: unknown option(s) {unknown}; known: {sorted(names)}")
        src = "generation_config.json"
        if generation_config is not None and not isinstance(generation_config, Mapping):
            raise ConfigError(f"{src}: {type(generation_config).__name__} {generation_config!r}: expected a JSON "
                              f"object (a dict of generation options)")
        gen = dict(generation_config or {})
        for key, value in gen.items():
            if key in _NEUTRAL and value not in _NEUTRAL[key] and overrides.get(key) is None:
                raise ConfigError(
                    f"{src}: field '{key}' = {value!r} is not supported by encdec generation "
                    f"(expected one of {list(_NEUTRAL[key])})")
        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for name in names:
            if overrides.get(name) is not None:
                values[name] = _plain_scalar(overrides[name])
                origins[name] = "generate option"
            elif gen.get(name) is not None:
                values[name] = gen[name]
                origins[name] = src
        for name, default in _DEFAULTS.items():
            values.setdefault(name, default)
        # special tokens: generation_config.json when the model has one, else the model config
        fallback = {"eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
                    "decoder_start_token_id": cfg.decoder_start_token_id}
        if not gen:  # HF builds the generation config from the model config then
            fallback.update(forced_bos_token_id=cfg.forced_bos_token_id,
                            forced_eos_token_id=cfg.forced_eos_token_id)
        for name, v in fallback.items():
            if values.get(name) is None:
                values[name] = v
        if getattr(cfg, "position_type", None) in ("learned", "sinusoidal"):
            values["max_position_embeddings"] = cfg.max_position_embeddings
        values["source"] = "generate options"
        values["origins"] = origins
        return cls(**values)

    def replace(self, **kw) -> "GenerationConfig":
        origins = {k: v for k, v in self.origins.items() if k not in kw}
        return dataclasses.replace(self, origins=origins, **kw)

    # ------------------------------------------------------------------ derived
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return _as_id_list(self.eos_token_id) or ()

    @property
    def pad_id(self) -> int | None:
        """HF: pad defaults to the first EOS."""
        if self.pad_token_id is not None:
            return int(self.pad_token_id)
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def limits(self, prompt_len: int = 1) -> tuple[int, int]:
        """(min_length, max_length) of the output, decoder prompt (start token) included."""
        if self.max_new_tokens is not None:
            max_len = self.max_new_tokens + prompt_len
        elif self.max_length is None:
            max_len = _DEFAULT_MAX_NEW + prompt_len
            if self.max_position_embeddings is not None:
                max_len = min(max_len, self.max_position_embeddings)
        else:
            max_len = self.max_length
        if self.min_new_tokens is not None:
            min_len = self.min_new_tokens + prompt_len
        else:
            min_len = self.min_length or 0
        return min_len, max_len

    @property
    def max_new_tokens_effective(self) -> int:
        return self.limits()[1] - 1

    @property
    def mode(self) -> str:
        if self.num_beams > 1:
            return "beam_sample" if self.do_sample else "beam"
        return "sample" if self.do_sample else "greedy"

    # ------------------------------------------------------------------ checks
    def validate(self, vocab_size: int | None = None) -> None:
        def bad(name, value, expected):
            where = self.origins.get(name, self.source)
            raise ConfigError(f"{where}: field '{name}' = {value!r}: expected {expected}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):  # finite: nan / inf would silently scramble the scores
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("max_new_tokens", "max_length"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                bad(name, v, "a positive integer")
        for name in ("min_new_tokens", "min_length", "no_repeat_ngram_size", "top_k"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 0):
                bad(name, v, "a non-negative integer")
        for name in ("num_beams", "num_return_sequences"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                bad(name, v, "a positive integer")
        if not isinstance(self.do_sample, bool):
            bad("do_sample", self.do_sample, "true or false")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            bad("early_stopping", self.early_stopping, 'true, false or "never"')
        if not is_num(self.length_penalty):
            bad("length_penalty", self.length_penalty, "a finite number")
        for name in ("temperature", "top_p"):  # their values are only checked when sampling, but
            v = getattr(self, name)              # the logits pipeline reads them as numbers in any case
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                bad(name, v, "a number")
        if self.do_sample:  # like HF, sampling options are only read (and checked) when sampling
            if not is_num(self.temperature) or not self.temperature >= MIN_TEMPERATURE:
                bad("temperature", self.temperature, f"a number >= {MIN_TEMPERATURE} (lower ones are greedy decoding "
                                                     f"in effect and can overflow the scores; for greedy decoding "
                                                     f"set do_sample false)")
            if not is_num(self.top_p) or not 0.0 <= self.top_p <= 1.0:
                bad("top_p", self.top_p, "a number in [0, 1]")
        if not is_num(self.repetition_penalty) or not self.repetition_penalty > 0:
            bad("repetition_penalty", self.repetition_penalty, "a number > 0")
        if self.seed is not None and (not is_int(self.seed) or not -2 ** 63 <= self.seed < 2 ** 64):
            bad("seed", self.seed, "a 64-bit integer")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            bad("num_return_sequences", self.num_return_sequences,
                "1 for greedy decoding (use beam search or sampling for several outputs)")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            bad("num_return_sequences", self.num_return_sequences, f"at most num_beams = {self.num_beams}")
        for name in _TOKEN_FIELDS:
            v = getattr(self, name)
            ids = v if isinstance(v, (list, tuple)) else [v]
            if name not in ("eos_token_id", "forced_eos_token_id") and isinstance(v, (list, tuple)):
                bad(name, v, "a single token id")
            for t in ids:
                if t is None:
                    continue
                if not is_int(t) or t < 0 or (vocab_size is not None and t >= vocab_size):
                    rng = f"in [0, {vocab_size})" if vocab_size is not None else ">= 0"
                    bad(name, v, f"a token id {rng}")
        rng = f"in [0, {vocab_size})" if vocab_size is not None else ">= 0"

        def id_list(v) -> bool:
            return (isinstance(v, (list, tuple)) and len(v) > 0 and all(
                is_int(t) and t >= 0 and (vocab_size is None or t < vocab_size) for t in v))

        for name in ("suppress_tokens", "begin_suppress_tokens"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (list, tuple)) and (len(v) == 0 or id_list(v))):
                bad(name, v, f"a list of token ids {rng}")
        if self.bad_words_ids is not None:
            v = self.bad_words_ids
            if not isinstance(v, (list, tuple)) or len(v) == 0 or not all(id_list(w) for w in v):
                bad("bad_words_ids", v, f"a non-empty list of non-empty lists of token ids {rng}")
        if self.suppress_tokens:  # HF refuses it too: the forced step would have no token left
            for name in ("forced_bos_token_id", "forced_eos_token_id"):
                forced = _as_id_list(getattr(self, name))
                if forced and set(forced) <= set(self.suppress_tokens):
                    bad("suppress_tokens", self.suppress_tokens,
                        f"a list without every {name} ({getattr(self, name)!r}): forcing a suppressed token "
                        f"leaves no token at that step (to keep EOS from coming early, set min_new_tokens)")
        if self.decoder_start_token_id is None:
            bad("decoder_start_token_id", None, "a token id (set it in the model config or generation config)")
        min_len, max_len = self.limits()
        if max_len < 2:
            bad("max_length", max_len, "at least 2 (the decoder start token plus one generated token)")
        if self.num_beams > 1:  # like HF, length_penalty is only read by beam search
            lp_max = length_penalty_bound(max_len)
            if not abs(self.length_penalty) <= lp_max:
                bad("length_penalty", self.length_penalty,
                    f"a number in [-{lp_max}, {lp_max}] for beam search with max_length {max_len} (beyond, "
                    f"length ** length_penalty leaves the float32 range of the beam scores)")


# ---------------------------------------------------------------------------- output
@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B * num_return_sequences, T], start token first, HF's layout
    sequences_scores: torch.Tensor | None  # beam search: length-normalised score of each row
    num_return_sequences: int
    eos_token_ids: tuple[int, ...] = ()
    # the decoder start token (and any decoder prefix) at the start of each row; a list (one per row)
    # where outputs with prefixes of different lengths were merged
    prompt_len: int | list[int] = 1
    # generate(output_scores=True): [rows, T] fp32 log-probability of each token of ``sequences``
    # (0 at the prompt and after a row's end). Greedy / sampling: log_softmax of the processed
    # scores (after the logits processors and, when sampling, temperature / top-k / top-p), HF's
    # compute_transition_scores(normalize_logits=True); beam search: the processed log-probs the
    # search adds up, HF's compute_transition_scores(sequences, scores, beam_indices).
    token_scores: torch.Tensor | None = None
    # where parts with prompts of different lengths were merged: each row's length before the padding
    # the merge added (a row that ran to the length limit then ends before the padding, not at an EOS)
    row_lengths: list[int] | None = None
    _host: list | None = field(default=None, repr=False)
    _host_scores: list | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def _row(self, i: int) -> tuple[list[int], int, int, bool]:
        """(row i on the host, its prompt length p, the number of tokens generated before its first
        EOS after the prompt, whether an EOS ended it); only padding follows an EOS."""
        if self._host is None:
            self._host = self.sequences.tolist()
        p = self.prompt(i)
        full = self._host[i] if self.row_lengths is None else self._host[i][: self.row_lengths[i]]
        eos = set(self.eos_token_ids)
        n = next((j for j, t in enumerate(full[p:]) if t in eos), None)
        return full, p, (len(full) - p if n is None else n), n is not None

    def tokens(self, i: int) -> list[int]:
        """Row i without the start token (a decoder prefix is kept), cut at its first EOS after the
        prefix (the EOS is dropped with what follows: only padding follows an EOS)."""
        full, p, n, _ = self._row(i)
        return full[1: p + n]

    def prompt(self, i: int) -> int:
        """Row i's prompt length (the start token and its decoder prefix)."""
        return self.prompt_len if isinstance(self.prompt_len, int) else self.prompt_len[i]

    def all_tokens(self) -> list[list[int]]:
        return [self.tokens(i) for i in range(len(self))]

    def token_logprobs(self, i: int) -> list[float]:
        """Row i's log-probability of each generated token (needs ``generate(output_scores=True)``):
        the tokens ``tokens(i)`` returns after the decoder prefix, followed by the EOS that ended the
        row, if one did (its probability is part of the sequence's)."""
        if self.token_scores is None:
            raise EncDecError("token log-probabilities were not computed: generate with output_scores=True")
        if self._host_scores is None:
            self._host_scores = self.token_scores.tolist()
        _, p, n, ended = self._row(i)
        return self._host_scores[i][p: p + n + ended]

    def score(self, i: int) -> float:
        """Row i's score: beam search's length-normalised score (HF's ``sequences_scores``), else the
        sum of its token log-probabilities (``token_logprobs``; needs ``output_scores=True``)."""
        if self.sequences_scores is not None:
            return float(self.sequences_scores[i])
        return math.fsum(self.token_logprobs(i))

    def request_tokens(self, b: int) -> list[list[int]]:
        """The num_return_sequences outputs of request b."""
        n = self.num_return_sequences
        return [self.tokens(b * n + j) for j in range(n)]


def merge_outputs(parts, n_requests: int, pad_token_id: int) -> GenerationOutput:
    """One output for ``n_requests`` requests generated in several batches: ``parts`` holds
    (the request indices of a batch, its GenerationOutput). Rows are right-padded with
    ``pad_token_id`` to the longest batch, as one batched ``generate`` pads the rows that end early
    (a row only ends before the longest one at an EOS, so the padding follows an EOS)."""
    first = parts[0][1]
    n = first.num_return_sequences
    width = max(out.sequences.shape[1] for _, out in parts)
    seq = first.sequences.new_full((n_requests * n, width), pad_token_id)
    scores = tok_scores = None
    if first.sequences_scores is not None:
        scores = first.sequences_scores.new_zeros(n_requests * n)
    if first.token_scores is not None:
        tok_scores = first.token_scores.new_zeros((n_requests * n, width))
    prompts = [0] * (n_requests * n)
    lengths = [0] * (n_requests * n)
    for reqs, out in parts:
        if out.num_return_sequences != n or (out.token_scores is None) != (tok_scores is None):
            raise ValueError("merge_outputs: the parts were generated with different settings")
        rows = (torch.tensor(reqs, device=seq.device).unsqueeze(1) * n + torch.arange(n, device=seq.device)).view(-1)
        seq[rows, : out.sequences.shape[1]] = out.sequences
        if scores is not None:
            scores[rows] = out.sequences_scores
        if tok_scores is not None:
            tok_scores[rows, : out.token_scores.shape[1]] = out.token_scores
        for k, r in enumerate(rows.tolist()):
            prompts[r] = out.prompt(k)
            lengths[r] = out.sequences.shape[1] if out.row_lengths is None else out.row_lengths[k]
    if len(set(prompts)) == 1 and all(out.row_lengths is None for _, out in parts):
        return GenerationOutput(seq, scores, n, first.eos_token_ids, prompts[0], tok_scores)
    return GenerationOutput(seq, scores, n, first.eos_token_ids, prompts, tok_scores, lengths)


# ---------------------------------------------------------------------------- runner
class EagerRunner:
    """Runs an EncDecModel step by step with its preallocated KV cache."""

    def __init__(self, model):
        self.model = model
        self.state = None
        pack = getattr(model, "pack_cpu_weights", None)
        if pack is not None:
            pack()  # fp32 on CPU: oneDNN-packed weights (once; a no-op elsewhere)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, expand: int, max_len: int) -> None:
        with torch.inference_mode():
            ctx = self.model.ctx
            # mixed source lengths: encoded in length groups on one rank (runtime.encode); under
            # tensor / pipeline parallelism one call (the grouped path has not been run across ranks)
            cost = None if ctx.tp_size == 1 and ctx.pp_size == 1 else 0
            if getattr(getattr(self.model, "lora_bank", None), "active", False):
                cost = 0  # run-time LoRA maps rows to requests: one call over the batch in order
            enc, attention_mask = encode_grouped(self.model.encode, input_ids, attention_mask, cost)
            state = self.model.init_state(enc, attention_mask, max_len)
            if expand > 1:
                idx = torch.arange(input_ids.shape[0], device=enc.device).repeat_interleave(expand)
                state.select(idx)
        self.state = state

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.decode(tokens.unsqueeze(1), self.state)[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        with torch.inference_mode():
            self.state.reorder(index)


# ---------------------------------------------------------------------------- entry point
def _id_range(ids: torch.Tensor) -> tuple[int, int]:
    """(smallest, largest) id of a non-empty integer tensor: one host read."""
    lo, hi = torch.aminmax(ids)
    return tuple(torch.stack([lo, hi]).tolist())


def _check_inputs(input_ids, attention_mask, vocab: int, forced_bos_token_ids, out_vocab: int):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise EncDecError(f"generate: input_ids = {shape}: expected a 2-D LongTensor [batch, source length]")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise EncDecError(f"generate: input_ids has shape {tuple(input_ids.shape)}: expected a non-empty batch")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise EncDecError(f"generate: input_ids has dtype {input_ids.dtype}: expected integer token ids")
    lo, hi = _id_range(input_ids)
    if lo < 0 or hi >= vocab:
        raise EncDecError(f"generate: input_ids contain token id {lo if lo < 0 else hi}: "
                          f"expected ids in [0, {vocab}) (the encoder vocabulary)")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            raise EncDecError(f"generate: attention_mask shape {shape}: expected {tuple(input_ids.shape)} "
                              "like input_ids")
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            bad = ~((attention_mask == 0) | (attention_mask == 1))
        else:
            bad = (attention_mask != 0) & (attention_mask != 1)
        if bool(bad.any()):
            v = attention_mask[bad][0].item()
            raise EncDecError(f"generate: attention_mask contains {v!r}: expected 1 (a source token) or 0 (padding)")
        if bool((attention_mask.sum(dim=1) == 0).any()):
            raise EncDecError("generate: attention_mask has a row with no tokens: expected every request to "
                              "have at least one source token")
    if forced_bos_token_ids is not None:
        if isinstance(forced_bos_token_ids, (str, bytes)) or not hasattr(forced_bos_token_ids, "__len__"):
            raise EncDecError(f"generate: forced_bos_token_ids = {forced_bos_token_ids!r}: expected a list with one "
                              f"entry (a token id or None) per request")
        if len(forced_bos_token_ids) != input_ids.shape[0]:
            raise EncDecError(f"generate: forced_bos_token_ids has {len(forced_bos_token_ids)} entries: expected "
                              f"one per request ({input_ids.shape[0]})")
        for i, t in enumerate(forced_bos_token_ids):
            if t is not None and (not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < out_vocab):
                raise EncDecError(f"generate: forced_bos_token_ids[{i}] = {t!r}: expected None or a token id "
                                  f"in [0, {out_vocab})")


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             gc: GenerationConfig | None = None, forced_bos_token_ids: Sequence[int | None] | None = None,
             runner=None, decoder_input_ids: torch.Tensor | None = None,
             output_scores: bool = False, streamer=None) -> GenerationOutput:
    """Generate for a batch of (right-padded) sources. See the module docstring.

    ``forced_bos_token_ids``: one entry per request (None = the config's forced_bos_token_id).
    ``decoder_input_ids`` [B, P]: a decoder prefix the output continues (HF semantics: the decoder
    start token is put in front unless every row already starts with it; lengths, the length
    penalty and min/max_new_tokens count from the end of the prefix).
    ``output_scores``: also the log-probability of every generated token (``GenerationOutput.token_scores``);
    the tokens are the same. A runner's fused greedy / beam loop is not used then (the step-by-step
    loop computes the scores).
    ``streamer``: an object with ``put(tokens, live)`` and ``end()``, told each step's token of every
    row (``tokens`` [rows] on the host as a list; ``live[r]`` False once row r has ended, its token
    then being padding) and the end of the search; greedy and sampling only (a beam's tokens are not
    final until the search ends). Rows are requests x num_return_sequences, as in the output.
    """
    if not isinstance(output_scores, bool):
        raise EncDecError(f"generate: output_scores = {output_scores!r}: expected True or False")
    if streamer is not None and not all(callable(getattr(streamer, m, None)) for m in ("put", "end")):
        raise EncDecError(f"generate: streamer = {streamer!r}: expected an object with put(tokens, live) and end()")
    cfg = model.cfg
    if gc is None:
        gc = GenerationConfig.from_model(cfg, None)
    elif not isinstance(gc, GenerationConfig):
        raise EncDecError(f"generate: gc = {type(gc).__name__}: expected a GenerationConfig (build one with "
                          f"GenerationConfig.from_model(model.cfg, None, **options))")
    vocab = cfg.vocab_size
    gc.validate(vocab)
    if streamer is not None and gc.num_beams > 1:
        raise EncDecError(f"generate: streaming serves greedy decoding and sampling, not num_beams = {gc.num_beams} "
                          f"(a beam's tokens are final only when the search ends)")
    if runner is not None and not all(callable(getattr(runner, m, None)) for m in ("prefill", "step", "reorder")):
        raise EncDecError(f"generate: runner = {runner!r}: expected a runner with prefill, step and reorder "
                          f"(None: the eager runner)")
    runner = runner if runner is not None else EagerRunner(model)
    device = model.device
    _check_inputs(input_ids, attention_mask, cfg.encoder_vocab_size, forced_bos_token_ids, vocab)
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)

    batch = input_ids.shape[0]
    expand = max(gc.num_beams, gc.num_return_sequences)
    prefix, start_only = _decoder_prefix(decoder_input_ids, batch, gc.decoder_start_token_id, vocab, device)
    prompt = prefix.shape[1]
    min_len, max_len = gc.limits(prompt)
    if max_len <= prompt:
        raise ConfigError(f"generate: max_length {max_len} leaves no room after the decoder prefix of length "
                          f"{prompt}: expected max_length > {prompt} (or set max_new_tokens)")
    prefix = prefix.repeat_interleave(expand, dim=0) if expand > 1 else prefix
    eos = gc.eos_token_ids

    forced_bos: torch.Tensor | int | None = gc.forced_bos_token_id
    # HF: the first generated position, after a forced first token when the prompt is the start token alone
    begin_index: int | list[int] = prompt + (1 if prompt == 1 and gc.forced_bos_token_id is not None else 0)
    if forced_bos_token_ids is not None and any(t is not None for t in forced_bos_token_ids):
        default = -1 if gc.forced_bos_token_id is None else int(gc.forced_bos_token_id)
        rows = [default if t is None else int(t) for t in forced_bos_token_ids]
        forced_bos = torch.tensor(rows, dtype=torch.long, device=device).repeat_interleave(expand)
        if prompt == 1 and default < 0:  # each request as HF with its own forced_bos_token_id: some forced
            begin_index = [2 if t >= 0 else 1 for t in rows for _ in range(expand)]

    if gc.do_sample and gc.num_beams > 1:
        min_keep = len(eos) + 1 if eos else 2
    else:
        min_keep = 1
    pipeline = LogitsPipeline(
        vocab_size=vocab, eos_token_ids=eos, min_length=min_len, max_length=max_len,
        repetition_penalty=gc.repetition_penalty, no_repeat_ngram_size=gc.no_repeat_ngram_size,
        forced_bos=forced_bos, forced_eos=_as_id_list(gc.forced_eos_token_id), do_sample=gc.do_sample,
        temperature=gc.temperature, top_k=gc.top_k, top_p=gc.top_p, min_tokens_to_keep=min_keep,
        bad_words=gc.bad_words_ids, suppress=gc.suppress_tokens, begin_suppress=gc.begin_suppress_tokens,
        begin_index=begin_index, device=device)

    generator = None
    seed = gc.seed
    ctx = getattr(model, "ctx", None)
    if gc.do_sample and seed is None and ctx is not None and getattr(ctx, "world_size", 1) > 1:
        # every rank must draw the same tokens: rank 0 draws a seed from torch's global generator (where
        # one rank samples without a seed) and every rank takes it (a fixed seed 0 gave every unseeded
        # run, and every request to a served engine, the same "sample")
        seed = ctx.shared_seed(None)
    if gc.do_sample and seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    with torch.no_grad():
        runner.prefill(input_ids, attention_mask, expand, max_len)
        if gc.num_beams > 1:
            from .beam import beam_search

            res = beam_search(runner, gc, batch, max_len, pipeline, generator, device, prefix,
                              output_scores=output_scores)
            return GenerationOutput(res[0], res[1], gc.num_return_sequences, eos, prompt_len=prompt,
                                    token_scores=res[2] if output_scores else None)
        seqs, tok_scores = _sample(runner, gc, batch * expand, max_len, pipeline, generator, device, prefix,
                                   output_scores, streamer, start_only)
        return GenerationOutput(seqs, None, gc.num_return_sequences, eos, prompt_len=prompt,
                                token_scores=tok_scores)


def _decoder_prefix(decoder_input_ids, batch: int, start: int, vocab: int,
                    device) -> tuple[torch.Tensor, int | None]:
    """([B, P] prefix starting with the decoder start token (HF puts it in front unless every row has
    it), and the start token when the prefix is that token alone in every row, else None: known on the
    host, so that a fused greedy loop need not read the prefix back from the device)."""
    start_col = torch.full((batch, 1), start, dtype=torch.long, device=device)
    if decoder_input_ids is None:
        return start_col, start
    d = decoder_input_ids
    if not isinstance(d, torch.Tensor) or d.dim() != 2 or d.shape[0] != batch or d.shape[1] == 0:
        shape = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise EncDecError(f"generate: decoder_input_ids = {shape}: expected a LongTensor [{batch}, prefix length]")
    if d.dtype not in (torch.int64, torch.int32):
        raise EncDecError(f"generate: decoder_input_ids has dtype {d.dtype}: expected integer token ids")
    lo, hi = _id_range(d)
    if lo < 0 or hi >= vocab:
        raise EncDecError(f"generate: decoder_input_ids contain token id {lo if lo < 0 else hi}: expected ids in "
                          f"[0, {vocab}) (the decoder vocabulary)")
    first = d[:, 0].tolist()  # one host read (d may be on the host: the engine builds it there)
    d = d.to(device=device, dtype=torch.long)
    if all(t != start for t in first):
        return torch.cat([start_col, d], dim=1), None
    # rows keep their own first tokens when any row has the start token (HF's rule), so a one-column
    # prefix is "the start token alone" only where every row has it
    return d, start if d.shape[1] == 1 and all(t == start for t in first) else None


def nothing_to_sample(gc: GenerationConfig, position: int) -> ConfigError:
    """The error for sampling where the options exclude every token of an output's next position."""
    opts = [name for name, neutral in (
        ("suppress_tokens", None), ("begin_suppress_tokens", None), ("bad_words_ids", None),
        ("no_repeat_ngram_size", 0), ("forced_bos_token_id", None), ("forced_eos_token_id", None),
        ("min_new_tokens", None), ("min_length", None)) if getattr(gc, name) not in (neutral, [], 0)]
    return ConfigError(
        f"generate: sampling: generated token {position}: the options ({', '.join(opts) or 'none set'}) exclude "
        f"every token of the vocabulary (min_new_tokens / min_length exclude EOS; a forced token that is also "
        f"suppressed leaves none): expected options that leave at least one token to draw")


def feed_prefix(runner, prefix: torch.Tensor) -> None:
    """Run all but the last prefix token through the decoder (their logits are not needed)."""
    for j in range(prefix.shape[1] - 1):
        runner.step(prefix[:, j].contiguous())


def _sample(runner, gc: GenerationConfig, rows: int, max_len: int, pipeline, generator, device,
            prefix: torch.Tensor, output_scores: bool = False,
            streamer=None, start_only: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy (argmax) or multinomial sampling; finished rows continue with the pad token. Returns
    (sequences, token log-probs [rows, T] or None).

    A runner with ``greedy_search`` (the CUDA-graph runner, unless built with ``fused_greedy=False``) runs
    greedy decoding itself where its ``greedy_search_serves`` says so (the processors depend on the
    position only) and every row's prefix is the start token alone (``start_only``, known on the host):
    argmax and token feedback inside its graph, no host round trip per token. Its ``sample_search``
    does the same for sampling (the same draws from the same generator state), or hands the request
    back (None) for the loop below."""
    fused = getattr(runner, "greedy_search", None)
    if fused is not None and start_only is not None and not output_scores and streamer is None \
            and runner.greedy_search_serves(gc, pipeline, prefix):
        return fused(gc, rows, max_len, pipeline, prefix, start=start_only), None
    fused = getattr(runner, "sample_search", None)
    if fused is not None and start_only is not None and not output_scores and streamer is None \
            and runner.sample_search_serves(gc, pipeline, prefix):
        seqs = fused(gc, rows, max_len, pipeline, prefix, generator=generator, start=start_only)
        if seqs is not None:  # None: its top-k / top-p shortcut was not exact here; the token loop redoes it
            return seqs, None
    eos = gc.eos_token_ids
    pad = gc.pad_id
    cur = prefix.shape[1]
    seqs = torch.empty((rows, max_len), dtype=torch.long, device=device)
    seqs[:, :cur] = prefix
    tok_scores = torch.zeros((rows, max_len), dtype=torch.float32, device=device) if output_scores else None
    feed_prefix(runner, prefix)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    tokens = prefix[:, -1].contiguous()
    while True:
        logits = runner.step(tokens).float()
        scores = pipeline(seqs[:, :cur], logits)
        if gc.do_sample:
            # a live row whose every token the options exclude (all -inf) has nothing to draw from:
            # torch.multinomial fails on its nan probabilities (a device assert on CUDA). It draws
            # from a uniform row here and is reported at this step's host sync below.
            dead = torch.isneginf(scores).all(dim=-1) & unfinished
            probs = torch.where(dead.unsqueeze(1), 1.0, torch.softmax(scores, dim=-1))
            nxt = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            nxt = torch.argmax(scores, dim=-1)
        if tok_scores is not None:  # finished rows (pad from here on) keep 0
            lp = torch.log_softmax(scores, dim=-1).gather(1, nxt.unsqueeze(1)).squeeze(1)
            tok_scores[:, cur] = torch.where(unfinished, lp, 0.0)
        if gc.do_sample and streamer is not None and bool(dead.any()):
            # the streamer is about to read this step's tokens: a starved row's stand-in must not reach it
            raise nothing_to_sample(gc, cur + 1 - prefix.shape[1])
        if eos_t is not None:
            nxt = torch.where(unfinished, nxt, pad)
            if streamer is not None:
                streamer.put(nxt.tolist(), unfinished.tolist())
            unfinished = unfinished & ~torch.isin(nxt, eos_t)
        elif streamer is not None:
            streamer.put(nxt.tolist(), [True] * rows)
        seqs[:, cur] = nxt
        cur += 1
        live = None
        if gc.do_sample:  # a starved row is found at this step's one host sync
            starved, live = torch.stack((dead.any(), unfinished.any())).tolist()
            if starved:
                raise nothing_to_sample(gc, cur - prefix.shape[1])
        if cur >= max_len:
            break
        if eos_t is not None and not (bool(unfinished.any()) if live is None else live):  # the one host sync
            break
        tokens = nxt
    if streamer is not None:
        streamer.end()
    return seqs[:, :cur], (tok_scores[:, :cur] if tok_scores is not None else None)
