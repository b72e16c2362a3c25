"""Check the written graphs against transformers itself (not against our own torch modules).

Three comparisons on random inputs, each the max |difference| over every output value:
the encoder states, the first step's logits (past_length 0) and a cached step's logits (the cache
padded with garbage past `past_length`, to prove it is masked). The decoder runs with two beams per
image, at other batch and cache sizes than the traced ones, so the shared cross-attention K/V path is exercised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .graphs import example_inputs
from .modules import decoder_dims

TOLERANCE = 1e-4


@dataclass(frozen=True)
class Validation:
    encoder_max_abs_diff: float
    first_step_max_abs_diff: float
    cached_step_max_abs_diff: float
    tolerance: float = TOLERANCE

    @property
    def max_abs_diff(self) -> float:
        return max(
            self.encoder_max_abs_diff, self.first_step_max_abs_diff, self.cached_step_max_abs_diff
        )

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_json(self) -> dict:
        return {"passed": self.passed, **asdict(self)}


class ValidationError(RuntimeError):
    """The exported graphs disagree with the PyTorch model beyond the tolerance."""


@contextlib.contextmanager
def eager_attention(model) -> Iterator[None]:
    """Run `model` with transformers' eager attention for a while, then restore what it had.

    Eager is the reference computation: transformers 4.57's SDPA path ignores GPT2's
    `scale_attn_by_inverse_layer_idx` and `scale_attn_weights`, so a model object loaded with SDPA
    would otherwise be "validated" against a different function than the one exported. GPT2, ViT,
    BART/MBart, TrOCR and Swin read `config._attn_implementation` at call time, so switching each
    sub-model's config (not its modules) is enough and leaves the caller's object as it was.
    BERT-style models pick their attention class when built; their SDPA class computes the same
    function as eager (within float rounding), which validation's tolerance allows for.
    """
    configs = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            configs.setdefault(id(config), config)
    saved = [(c, c._attn_implementation_internal) for c in configs.values()]
    try:
        for config, _ in saved:
            config._attn_implementation_internal = "eager"
        yield
    finally:
        for config, value in saved:
            config._attn_implementation_internal = value


def _sessions(out_dir: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return {
        name: ort.InferenceSession(
            str(out_dir / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"]
        )
        for name in ("encoder", "cross_kv", "decoder")
    }


def _run_decoder(
    sess, cross: list[np.ndarray], ids: np.ndarray, past: int, cache: list[np.ndarray]
):
    layers = len(cache) // 2
    feed = {"input_ids": ids, "past_length": np.array(past, dtype=np.int64)}
    for i in range(layers):
        feed[f"self_key.{i}"], feed[f"self_value.{i}"] = cache[2 * i], cache[2 * i + 1]
        feed[f"cross_key.{i}"], feed[f"cross_value.{i}"] = cross[2 * i], cross[2 * i + 1]
    return sess.run(None, feed)


def validate_export(
    model, out_dir: Path, image_size: tuple[int, int], start_token: int
) -> Validation:
    batch, beams, cache_len = 3, 2, 7  # not the traced sizes: dynamic axes must really be dynamic
    pixel_values, ids, cache = example_inputs(
        model, image_size, batch, beams, past=2, new=1, cache_len=cache_len, seed=1
    )
    ids[:, 0] = start_token
    sessions = _sessions(out_dir)
    layers, _, _ = decoder_dims(model.decoder.config)

    with torch.no_grad(), eager_attention(model):
        ref_states = model.encoder(pixel_values=pixel_values).last_hidden_state
        if getattr(model, "enc_to_dec_proj", None) is not None:
            ref_states = model.enc_to_dec_proj(ref_states)
        expanded = pixel_values.repeat_interleave(beams, dim=0)
        ref_first = model(pixel_values=expanded, decoder_input_ids=ids[:, :1]).logits[:, -1]
        ref_cached = model(pixel_values=expanded, decoder_input_ids=ids).logits[:, -1]

    states = sessions["encoder"].run(None, {"pixel_values": pixel_values.numpy()})[0]
    cross = sessions["cross_kv"].run(None, {"encoder_hidden_states": states})
    garbage = [
        c.numpy() for c in cache
    ]  # random values everywhere: positions >= past must be ignored

    first = _run_decoder(sessions["decoder"], cross, ids[:, :1].numpy(), 0, garbage)
    prefill = _run_decoder(sessions["decoder"], cross, ids[:, :2].numpy(), 0, garbage)
    filled = [c.copy() for c in garbage]
    for i in range(2 * layers):
        filled[i][:, :, 0:2] = prefill[1 + i]
    cached = _run_decoder(sessions["decoder"], cross, ids[:, 2:].numpy(), 2, filled)

    def diff(a, b) -> float:
        return float(np.abs(np.asarray(a) - b.numpy()).max())

    return Validation(
        encoder_max_abs_diff=diff(states, ref_states),
        first_step_max_abs_diff=diff(first[0], ref_first),
        cached_step_max_abs_diff=diff(cached[0], ref_cached),
    )
