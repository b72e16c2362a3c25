"""Inputs of a text EncoderDecoderModel export: token ids with their attention mask.

`check_text_inputs` gives one clear error for the wrong type, rank, ids outside the encoder's
vocabulary or an empty text, before any graph runs. `Tokenizer` encodes strings with the export's
encoder tokenizer (`encoder_tokenizer/tokenizer.json` when the encoder has its own, as in
bert2gpt2, else `tokenizer.json`) the way transformers' tokenizer(..., padding=True) does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..manifest import Manifest


def _int_array(value: Any, name: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError:  # a ragged list of lists
        raise InputError(
            f"{name} must be [batch, length]: its rows have different lengths (pad them, and "
            "pass the attention_mask that marks the padding)"
        ) from None
    if array.dtype == np.bool_ and name == "attention_mask":  # transformers takes these too
        array = array.astype(np.int64)
    if array.dtype == object or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{name} must be an integer array [batch, length], got {array.dtype}")
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise InputError(f"{name} must be [batch, length] with both >= 1, got {list(array.shape)}")
    return np.ascontiguousarray(array, dtype=np.int64)


def inferred_mask(ids: np.ndarray, pad_token_id: int | None, eos: tuple[int, ...] | None):
    """The mask transformers' generate() makes when given none: `input_ids != pad_token_id` when
    the pad id occurs and is not an EOS id (pad then marks padding), else every token real."""
    if pad_token_id is None or not (ids == pad_token_id).any() or pad_token_id in (eos or ()):
        return np.ones_like(ids)
    return (ids != pad_token_id).astype(np.int64)


def check_text_inputs(
    manifest: Manifest,
    input_ids: Any,
    attention_mask: Any,
    pad_token_id: int | None = None,
    eos_token_id: tuple[int, ...] | None = None,
) -> dict:
    """{"input_ids", "attention_mask"} as int64 arrays the encoder graph takes. Without a mask,
    the generation's pad and EOS ids decide it, as in transformers (`inferred_mask`)."""
    ids = _int_array(input_ids, "input_ids")
    if attention_mask is None:
        mask = inferred_mask(ids, pad_token_id, eos_token_id)
    else:
        mask = _int_array(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise InputError(
                f"attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}"
            )
        if not np.isin(mask, (0, 1)).all():
            raise InputError("attention_mask must hold only 0 and 1")
    vocab = manifest.encoder.get("vocab_size")
    if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
        raise InputError(f"input_ids must be in [0, {vocab}) (the encoder's vocabulary)")
    positions = manifest.encoder.get("max_positions")
    if positions is not None and ids.shape[1] > positions:
        raise InputError(
            f"texts of {ids.shape[1]} tokens exceed the encoder's {positions} positions"
        )
    if not mask.any(axis=1).all():
        raise InputError("every text needs at least one token (a row of attention_mask is all 0)")
    return {"input_ids": ids, "attention_mask": mask}


class Tokenizer:
    """Strings -> padded input_ids and attention_mask with the export's tokenizer.json."""

    def __init__(self, root: str | Path, manifest: Manifest):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(root) / "encoder_tokenizer" / "tokenizer.json"  # the encoder's own, if any
        if not path.is_file():
            path = Path(root) / "tokenizer.json"
        if not path.is_file():
            raise InputError(f"{root} has no tokenizer.json: pass input_ids to generate() instead")
        self.tokenizer = HFTokenizer.from_file(str(path))
        # a tokenizer.json saved after a padded call keeps padding on: this class pads itself,
        # so that the mask marks exactly each text's own tokens
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.pad_id = manifest.encoder.get("pad_token_id") or 0

    def __call__(self, texts: list[str]) -> dict:
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("texts must be a non-empty list of strings")
        for row, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800" is valid JSON)
                where = f"text {row}: " if len(texts) > 1 else ""
                raise InputError(
                    f"{where}not valid Unicode (a lone surrogate at character {exc.start})"
                ) from None
        encodings = self.tokenizer.encode_batch(texts)  # with the special tokens, as transformers
        for row, encoding in enumerate(encodings):
            if not encoding.ids:
                where = f"text {row}: " if len(texts) > 1 else ""
                raise InputError(f"{where}empty text (it has no tokens)")
        length = max(len(e.ids) for e in encodings)
        ids = np.full((len(texts), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), length), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        return {"input_ids": ids, "attention_mask": mask}
