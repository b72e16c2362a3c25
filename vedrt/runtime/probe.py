"""Load-time check that vedrt.json's `decoder.max_positions` is what the decoder graph holds.

A manifest that promises more positions than the graph's position table has would pass option
checks and then fail deep inside ONNX Runtime once a long generation got there. One decoder step
at the last promised position, on zeros, costs a millisecond at load and turns that into one line.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..manifest import Manifest
from .errors import InputError

_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


def _feed(manifest: Manifest, inputs: list[Any], last: int) -> dict[str, np.ndarray]:
    """Zeros for every input, one row, a cache as long as the manifest says, at position `last`."""
    sizes = {"cache_len": last + 1, "enc_len": manifest.enc_len or 1}
    feed = {}
    for spec in inputs:
        dtype = _DTYPES.get(spec.type)
        if dtype is None:
            raise InputError(f"decoder graph input {spec.name} has unexpected type {spec.type}")
        shape = [d if isinstance(d, int) else sizes.get(str(d), 1) for d in spec.shape]
        value = np.zeros(shape, dtype)
        if spec.name == "past_lengths":
            value = np.full(shape, last, dtype)
        elif spec.name == "encoder_mask":
            value = np.ones(shape, dtype)
        feed[spec.name] = value
    return feed


def check_positions(manifest: Manifest, decoder_session: Any) -> None:
    """InputError at load if the decoder graph cannot place a token at the last promised position."""
    if not manifest.max_positions:
        return
    last = manifest.max_positions - 1
    import onnxruntime as ort

    feed = _feed(manifest, decoder_session.get_inputs(), last)
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # the failure is reported below, in one line
    try:
        decoder_session.run(["logits"], feed, quiet)
    except Exception as exc:  # ORT raises its own types; any failure here is the same problem
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{manifest.root / 'vedrt.json'}: decoder.max_positions={manifest.max_positions} "
            f"does not match the decoder graph, which fails at position {last} ({first}); "
            "re-export the model"
        ) from None
