"""Generation options: transformers' names, meanings and defaults, resolved once per call.

Priority is that of `model.generate()`: keyword arguments > the checkpoint's generation config >
`transformers.GenerationConfig()` defaults. Lengths are resolved the way transformers 4.57 does it
(`_prepare_generated_length`), so `GenerationOptions.max_length` is the final total length,
decoder start token included.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError

# transformers.GenerationConfig() defaults for the options we implement.
HF_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "max_new_tokens": None,
    "min_length": 0,
    "min_new_tokens": None,
    "num_beams": 1,
    "num_return_sequences": 1,
    "length_penalty": 1.0,
    "early_stopping": False,
    "no_repeat_ngram_size": 0,
    "repetition_penalty": 1.0,
    "bad_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "bos_token_id": None,
    "decoder_start_token_id": None,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
}

# Generation-config keys that change the output but that this runtime does not implement: a
# checkpoint setting one of them gets a warning, since its results would differ from transformers.
UNSUPPORTED_IF_SET: dict[str, Any] = {
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "exponential_decay_length_penalty": None,
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "typical_p": 1.0,
    "min_p": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "constraints": None,
    "force_words_ids": None,
    "guidance_scale": None,
    "penalty_alpha": None,
    "watermarking_config": None,
}

# Per-call switches that are not part of a generation config.
CALL_ONLY: dict[str, Any] = {
    "seed": None,
    "return_dict": False,
    "output_scores": False,
    "output_attentions": False,
}

# transformers' names for options vedrt names otherwise, accepted as they are
ALIASES = {"return_dict_in_generate": "return_dict"}

PROMPT_LEN = 1  # the decoder prompt is the start token alone

# The type each option must have. Checked on the merged values (keywords and the checkpoint's
# config alike) before anything is converted, so 2.5, "5" or True is an error, never an int.
INT_OPTIONS = (
    "max_length",
    "max_new_tokens",
    "min_length",
    "min_new_tokens",
    "num_beams",
    "num_return_sequences",
    "no_repeat_ngram_size",
    "top_k",
    "seed",
)
TOKEN_OPTIONS = ("pad_token_id", "bos_token_id", "decoder_start_token_id", "forced_bos_token_id")
FLOAT_OPTIONS = ("length_penalty", "repetition_penalty", "temperature", "top_p")
BOOL_OPTIONS = ("do_sample", "return_dict", "output_scores", "output_attentions")
# None means "the default" for these (the checkpoint's config may hold null)
NONE_ALLOWED = {
    "max_length",
    "max_new_tokens",
    "min_length",
    "min_new_tokens",
    "no_repeat_ngram_size",
    "top_k",
    "seed",
    "repetition_penalty",
    "temperature",
    "top_p",
    *TOKEN_OPTIONS,
}


@dataclass(frozen=True)
class GenerationOptions:
    """The resolved options of one `generate()` call (see transformers' GenerationConfig)."""

    max_length: int  # total output length, start token included (max_new_tokens resolved into it)
    max_new_tokens: int | None  # as given; already folded into max_length
    min_length: int  # EOS is forbidden while the sequence (start token included) is shorter
    min_new_tokens: int | None  # EOS is forbidden until this many tokens were generated
    num_beams: int  # 1: greedy or sampling; >1: beam search
    num_return_sequences: int  # sequences returned per image (<= num_beams unless sampling)
    length_penalty: float  # beam score = sum logprob / generated_len ** length_penalty
    early_stopping: bool | str  # True: stop at num_beams finished; False: heuristic; "never"
    no_repeat_ngram_size: int  # >0: no n-gram of this size occurs twice
    repetition_penalty: float  # >1 discourages tokens already in the sequence (CTRL rule)
    bad_words_ids: tuple[tuple[int, ...], ...] | None  # token sequences that are never generated
    forced_bos_token_id: int | None  # token forced right after the start token
    forced_eos_token_id: tuple[int, ...] | None  # tokens forced at the last position
    eos_token_id: tuple[int, ...] | None  # generating any of these ends a sequence
    pad_token_id: int | None  # fills finished rows (defaults to the first EOS id)
    decoder_start_token_id: int  # the first decoder token (falls back to bos_token_id)
    do_sample: bool  # sample from the processed distribution instead of taking the best
    temperature: float  # sampling: divide logits by this
    top_k: int  # sampling: keep the k most likely tokens (0: all)
    top_p: float  # sampling: keep the smallest set with this much probability mass
    seed: int | None  # sampling: numpy RNG seed; same seed, same output
    return_dict: bool  # return a GenerateOutput instead of the token array
    output_scores: bool  # with return_dict: per-step processed scores
    output_attentions: bool  # with return_dict: per-step cross-attention probabilities

    @property
    def max_new(self) -> int:
        """How many tokens may follow the start token."""
        return self.max_length - PROMPT_LEN


def is_int(value: Any) -> bool:
    """A real integer: Python or numpy, but not a bool, a float or a string."""
    if type(value) is int:  # the common case, before the ABC check (a resolve checks ~25)
        return True
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _is_float(value: Any) -> bool:
    if type(value) is float or type(value) is int:
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


_INTEGERS = frozenset(INT_OPTIONS + TOKEN_OPTIONS)
_FLOATS, _BOOLS = frozenset(FLOAT_OPTIONS), frozenset(BOOL_OPTIONS)


def check_types(merged: dict[str, Any]) -> None:
    """One line naming the option whose value has the wrong type."""
    for name, value in merged.items():
        if value is None and name in NONE_ALLOWED:
            continue
        if name in _INTEGERS and not is_int(value):
            raise InputError(f"{name} must be an integer, got {value!r}")
        if name in _FLOATS and not _is_float(value):
            raise InputError(f"{name} must be a number, got {value!r}")
        if name in _FLOATS and value != value:  # NaN passes every range check below
            raise InputError(f"{name} must be a number, got NaN")
        if name in _BOOLS and not isinstance(value, bool | np.bool_):
            raise InputError(f"{name} must be True or False, got {value!r}")


def check_token_ids(o: GenerationOptions, vocab_size: int | None) -> None:
    """Every token id an option names must be one the decoder has (0 <= id < vocab_size)."""
    singles = {
        "decoder_start_token_id": o.decoder_start_token_id,
        "pad_token_id": o.pad_token_id,
        "forced_bos_token_id": o.forced_bos_token_id,
    }
    ids = [(k, v) for k, v in singles.items() if v is not None]
    ids += [("eos_token_id", t) for t in o.eos_token_id or ()]
    ids += [("forced_eos_token_id", t) for t in o.forced_eos_token_id or ()]
    ids += [("bad_words_ids", t) for word in o.bad_words_ids or () for t in word]
    for name, token in ids:
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            bound = f"< {vocab_size}, the vocabulary size" if vocab_size is not None else ">= 0"
            raise InputError(f"{name}: token id {token} is out of range (ids are >= 0 and {bound})")


def _as_tuple(value: Any, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if is_int(value):
        return (int(value),)
    if isinstance(value, list | tuple) and value and all(is_int(v) for v in value):
        return tuple(int(v) for v in value)
    raise InputError(f"{name} must be an int or a non-empty list of ints, got {value!r}")


def _bad_words(value: Any) -> tuple[tuple[int, ...], ...] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(
        isinstance(w, list | tuple) and all(is_int(t) for t in w) for w in value
    ):
        raise InputError(f"bad_words_ids must be a list of lists of ints, got {value!r}")
    words = tuple(tuple(int(t) for t in word) for word in value)
    if not words or any(not w or min(w) < 0 for w in words):
        raise InputError(
            f"bad_words_ids must be a non-empty list of non-empty lists of ids >= 0, got {value!r}"
        )
    return words


def warn_unsupported(generation_config: dict[str, Any]) -> None:
    """Say which of the checkpoint's settings this runtime ignores (its output would differ)."""
    set_keys = [
        k
        for k, default in UNSUPPORTED_IF_SET.items()
        if generation_config.get(k, default) != default
    ]
    if set_keys:
        warnings.warn(
            f"vedrt ignores these generation config settings of the checkpoint: {', '.join(set_keys)}",
            stacklevel=3,
        )


def resolve(
    generation_config: dict[str, Any],
    overrides: dict[str, Any],
    max_positions: int | None = None,
    vocab_size: int | None = None,
) -> GenerationOptions:
    """Merge the call's keywords over the checkpoint's generation config and check them.

    With `vocab_size`, every token id an option names (start, pad, EOS, forced and bad words) is
    checked against the vocabulary here, not discovered as an index error mid-generation.
    """
    overrides = _unalias(overrides)
    known = set(HF_DEFAULTS) | set(CALL_ONLY)
    for key in overrides:
        if key not in known:
            raise TypeError(f"generate() got an unexpected keyword argument {key!r}")
    merged = dict(HF_DEFAULTS)
    merged.update({k: v for k, v in generation_config.items() if k in HF_DEFAULTS})
    merged.update(CALL_ONLY)
    merged.update(overrides)
    check_types(merged)
    o = merged

    eos = _as_tuple(o["eos_token_id"], "eos_token_id")
    pad = o["pad_token_id"]
    if pad is None and eos is not None:
        pad = eos[0]  # transformers does the same (with a warning)
    start = o["decoder_start_token_id"]
    if start is None:
        start = o["bos_token_id"]
    if start is None:
        raise InputError("decoder_start_token_id (or bos_token_id) must be set for generation")

    max_length = o["max_length"] if o["max_length"] is not None else HF_DEFAULTS["max_length"]
    if o["max_new_tokens"] is not None:
        max_length = int(o["max_new_tokens"]) + PROMPT_LEN
    elif overrides.get("max_length") is None and max_length == HF_DEFAULTS["max_length"]:
        max_length = max_length + PROMPT_LEN  # transformers: 20 *new* tokens by default
    min_length = o["min_length"] or 0
    if o["min_new_tokens"] is not None:
        min_length = int(o["min_new_tokens"]) + PROMPT_LEN

    opts = GenerationOptions(
        max_length=int(max_length),
        max_new_tokens=o["max_new_tokens"],
        min_length=int(min_length),
        min_new_tokens=o["min_new_tokens"],
        num_beams=int(o["num_beams"]),
        num_return_sequences=int(o["num_return_sequences"]),
        length_penalty=float(o["length_penalty"]),
        early_stopping=o["early_stopping"],
        no_repeat_ngram_size=int(o["no_repeat_ngram_size"] or 0),
        repetition_penalty=float(
            o["repetition_penalty"] if o["repetition_penalty"] is not None else 1.0
        ),
        bad_words_ids=_bad_words(o["bad_words_ids"]),
        forced_bos_token_id=o["forced_bos_token_id"],
        forced_eos_token_id=_as_tuple(o["forced_eos_token_id"], "forced_eos_token_id"),
        eos_token_id=eos,
        pad_token_id=None if pad is None else int(pad),
        decoder_start_token_id=int(start),
        do_sample=bool(o["do_sample"]),
        temperature=float(o["temperature"] if o["temperature"] is not None else 1.0),
        top_k=int(o["top_k"] or 0),
        top_p=float(o["top_p"] if o["top_p"] is not None else 1.0),
        seed=o["seed"],
        return_dict=bool(o["return_dict"]),
        output_scores=bool(o["output_scores"]),
        output_attentions=bool(o["output_attentions"]),
    )
    check(opts, max_positions)
    check_minimum(opts, overrides)
    check_token_ids(opts, vocab_size)
    return opts


def _unalias(overrides: dict[str, Any]) -> dict[str, Any]:
    if not any(alias in overrides for alias in ALIASES):
        return overrides
    renamed = dict(overrides)
    for alias, name in ALIASES.items():
        if alias in renamed:
            value = renamed.pop(alias)
            if name in renamed and renamed[name] != value:
                raise InputError(f"{alias}={value!r} and {name}={renamed[name]!r} disagree")
            renamed[name] = value
    return renamed


def check_minimum(o: GenerationOptions, overrides: dict[str, Any]) -> None:
    """A minimum length above the limit: the caller's own is an error naming it; the
    checkpoint's (its generation config's min_length, say, under a smaller max_new_tokens) is a
    warning, and EOS stays forbidden up to the limit, as in transformers."""
    if o.min_length <= o.max_length:
        return
    limit = f"max_new_tokens={o.max_new} (max_length={o.max_length})"
    if overrides.get("min_new_tokens") is not None:
        raise InputError(
            f"min_new_tokens={o.min_new_tokens} is more than {limit}: the minimum cannot exceed "
            "the limit"
        )
    if overrides.get("min_length") is not None:
        raise InputError(
            f"min_length={o.min_length} is more than {limit}: the minimum cannot exceed the limit"
        )
    warnings.warn(
        f"the generation config's minimum length (min_length={o.min_length}, start token "
        f"included) is more than {limit}: EOS is forbidden up to the limit, as in transformers",
        stacklevel=4,
    )


def check(o: GenerationOptions, max_positions: int | None) -> None:
    """Reject settings transformers rejects, and lengths the exported decoder cannot hold."""
    if o.max_new_tokens is not None and o.max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {o.max_new_tokens}")
    if o.max_length <= PROMPT_LEN:
        raise InputError(
            f"max_length={o.max_length} leaves no room for new tokens (max_new_tokens must be >= 1)"
        )
    if max_positions is not None and o.max_length > max_positions:
        raise InputError(
            f"max_new_tokens={o.max_new} needs {o.max_length} decoder positions, but this decoder has "
            f"{max_positions} (at most max_new_tokens={max_positions - PROMPT_LEN})"
        )
    if o.min_new_tokens is not None and o.min_new_tokens < 0:
        raise InputError(f"min_new_tokens must be >= 0, got {o.min_new_tokens}")
    if o.min_length < 0:
        raise InputError(f"min_length must be >= 0, got {o.min_length}")
    if o.seed is not None and o.seed < 0:
        raise InputError(f"seed must be >= 0, got {o.seed}")
    if o.num_beams < 1:
        raise InputError(f"num_beams must be >= 1, got {o.num_beams}")
    if o.num_return_sequences < 1:
        raise InputError(f"num_return_sequences must be >= 1, got {o.num_return_sequences}")
    if o.num_beams > 1 and o.num_return_sequences > o.num_beams:
        raise InputError(
            f"num_return_sequences={o.num_return_sequences} is larger than num_beams={o.num_beams}"
        )
    if o.num_beams == 1 and not o.do_sample and o.num_return_sequences > 1:
        raise InputError(
            f"num_return_sequences={o.num_return_sequences} is larger than num_beams=1 "
            "(greedy search returns one sequence; use num_beams or do_sample)"
        )
    if o.early_stopping not in (True, False, "never"):
        raise InputError(f"early_stopping must be True, False or 'never', got {o.early_stopping!r}")
    if o.repetition_penalty <= 0:
        raise InputError(f"repetition_penalty must be > 0, got {o.repetition_penalty}")
    if o.no_repeat_ngram_size < 0:
        raise InputError(f"no_repeat_ngram_size must be >= 0, got {o.no_repeat_ngram_size}")
    if o.do_sample:
        if o.temperature <= 0:
            raise InputError(f"temperature must be > 0 when sampling, got {o.temperature}")
        if o.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {o.top_k}")
        if not 0.0 <= o.top_p <= 1.0:
            raise InputError(f"top_p must be in [0, 1], got {o.top_p}")


def replace(options: GenerationOptions, **changes: Any) -> GenerationOptions:
    """A copy with some fields changed (the dataclass is frozen)."""
    return dataclasses.replace(options, **changes)
