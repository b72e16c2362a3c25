"""Token ids -> text with the `tokenizers` library, as transformers' `batch_decode` would."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import InputError


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (used when the tokenizer config asks for it)."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


class Detokenizer:
    """Decodes with the export's tokenizer.json, skipping special tokens."""

    def __init__(self, root: str | Path):
        from tokenizers import Tokenizer

        root = Path(root)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise InputError(
                f"{root} has no tokenizer.json: it can generate token ids but not caption text"
            )
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise InputError(
                f"{path}: corrupt tokenizer ({str(exc).splitlines()[0][:200]})"
            ) from None
        self.clean_up = False
        config = root / "tokenizer_config.json"
        if config.is_file():
            try:
                self.clean_up = bool(
                    json.loads(config.read_text(encoding="utf-8")).get(
                        "clean_up_tokenization_spaces"
                    )
                )
            except (OSError, ValueError):
                pass

    def decode(self, sequences: np.ndarray) -> list[str]:
        texts = self.tokenizer.decode_batch(
            [list(map(int, row)) for row in sequences], skip_special_tokens=True
        )
        if self.clean_up:
            texts = [clean_up_tokenization(t) for t in texts]
        return [t.strip() for t in texts]
