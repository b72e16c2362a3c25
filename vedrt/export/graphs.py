"""Trace the three modules to ONNX with their names and dynamic axes.

Opset 18 at least (the dynamo exporter writes an invalid `Split` at 17). The TorchScript exporter
runs first: it is several times faster, and our modules avoid the transformers mask code whose
shapes it would freeze (validation checks other batch and cache sizes than the traced ones). The
dynamo exporter is the fallback. Example inputs use sizes of at least 2 on every dynamic axis, as
torch.export specializes axes it sees at size 0 or 1, and are contiguous (it cannot lower strides).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from .modules import TOP_K, CrossKV, DecoderStep, EncoderGraph, TextEncoderGraph, decoder_dims

DEFAULT_OPSET = 18
MAX_OPSET = 23  # the newest opset exports were checked with (24 and 25 drop the decoder's inputs)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # ints for fixed axes, names for dynamic ones

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def num_channels(model) -> int:
    """The image encoder's input channels (3 unless the config says otherwise: grayscale)."""
    return int(getattr(model.config.encoder, "num_channels", 3) or 3)


def graph_specs(
    model, image_size: tuple[int, int] | None, enc_len: int | str, enc_dim: int
) -> dict[str, GraphSpec]:
    """The names and shapes of every graph's inputs and outputs: the contract with the runtime.

    `image_size` None: a text encoder (input_ids + attention_mask), `enc_len` then symbolic."""
    layers, heads, hd = decoder_dims(model.decoder.config)
    vocab = model.decoder.config.vocab_size
    f32 = "float32"
    cross = tuple(
        TensorSpec(f"cross_{kv}.{i}", f32, ("batch", heads, enc_len, hd))
        for i in range(layers)
        for kv in ("key", "value")
    )
    cross_groups = tuple(
        TensorSpec(f"cross_{kv}.{i}", f32, ("groups", heads, enc_len, hd))
        for i in range(layers)
        for kv in ("key", "value")
    )
    cache = tuple(
        TensorSpec(f"self_{kv}.{i}", f32, ("batch_beams", heads, "cache_len", hd))
        for i in range(layers)
        for kv in ("key", "value")
    )
    new = tuple(
        TensorSpec(f"new_{kv}.{i}", f32, ("batch_beams", heads, 1, hd))
        for i in range(layers)
        for kv in ("key", "value")
    )
    attn = tuple(
        TensorSpec(f"cross_attn.{i}", f32, ("batch_beams", heads, 1, enc_len))
        for i in range(layers)
    )
    states = TensorSpec("encoder_hidden_states", f32, ("batch", enc_len, enc_dim))
    if image_size is None:
        encoder_in = (
            TensorSpec("input_ids", "int64", ("batch", enc_len)),
            TensorSpec("attention_mask", "int64", ("batch", enc_len)),
        )
    else:
        channels = num_channels(model)
        encoder_in = (TensorSpec("pixel_values", f32, ("batch", channels, *image_size)),)
    return {
        "encoder": GraphSpec("encoder.onnx", encoder_in, (states,)),
        "cross_kv": GraphSpec("cross_kv.onnx", (states,), cross),
        "decoder": GraphSpec(
            "decoder.onnx",
            (
                TensorSpec("input_ids", "int64", ("batch_beams", 1)),  # one token per step
                TensorSpec("past_lengths", "int64", ("batch_beams",)),
                *cache,
                *cross_groups,
                TensorSpec("encoder_mask", "int64", ("groups", enc_len)),
            ),
            (
                TensorSpec("logits", f32, ("batch_beams", vocab)),
                *new,
                *attn,
                TensorSpec("top_logprobs", f32, ("batch_beams", min(TOP_K, vocab))),
                TensorSpec("top_ids", "int64", ("batch_beams", min(TOP_K, vocab))),
            ),
        ),
    }


def _dynamic(spec: TensorSpec) -> dict[int, torch.export.Dim] | None:
    axes = {i: torch.export.Dim.DYNAMIC for i, d in enumerate(spec.shape) if isinstance(d, str)}
    return axes or None


def _dynamo(module, args: tuple, spec: GraphSpec, opset: int) -> onnx.ModelProto:
    flat_inputs = list(spec.inputs)
    if isinstance(module, DecoderStep):
        # its forward takes (ids, past_lengths, cache list, cross list, encoder_mask)
        n_cache = (len(flat_inputs) - 3) // 2
        dyn = (
            _dynamic(flat_inputs[0]),
            _dynamic(flat_inputs[1]),
            [_dynamic(s) for s in flat_inputs[2 : 2 + n_cache]],
            [_dynamic(s) for s in flat_inputs[2 + n_cache : 2 + 2 * n_cache]],
            _dynamic(flat_inputs[-1]),
        )
    else:
        dyn = tuple(_dynamic(s) for s in flat_inputs)
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        opset_version=opset,
        input_names=[s.name for s in flat_inputs],
        output_names=[s.name for s in spec.outputs],
        dynamic_shapes=dyn,
        external_data=False,
        optimize=True,
    )
    return program.model_proto


def _torchscript(module, args: tuple, spec: GraphSpec, opset: int) -> onnx.ModelProto:
    def axes(t: TensorSpec) -> dict[int, str]:
        return {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}

    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        args,
        buffer,
        dynamo=False,
        opset_version=opset,
        input_names=[s.name for s in spec.inputs],
        output_names=[s.name for s in spec.outputs],
        dynamic_axes={t.name: axes(t) for t in spec.inputs + spec.outputs if axes(t)},
    )
    return onnx.load_model_from_string(buffer.getvalue())


def _export(module, args: tuple, spec: GraphSpec, path: Path, opset: int) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            proto = _torchscript(module, args, spec, opset)
        except Exception:  # a torch without the TorchScript exporter: dynamo is slower but works
            proto = _dynamo(module, args, spec, opset)
    _name_axes(proto.graph.input, spec.inputs)
    _name_axes(proto.graph.output, spec.outputs)
    for node in proto.graph.node:  # tracer stack traces: a large share of a small model's file
        node.ClearField("metadata_props")
        node.doc_string = ""
    onnx.save(proto, str(path))


def _name_axes(values, specs: tuple[TensorSpec, ...]) -> None:
    """Give dynamic axes the spec's names (`batch_beams`), not the tracer's (`s34`)."""
    for value, spec in zip(values, specs, strict=True):
        for dim, want in zip(value.type.tensor_type.shape.dim, spec.shape, strict=True):
            if isinstance(want, str):
                dim.dim_param = want


def example_inputs(
    model,
    image_size: tuple[int, int] | None,
    batch: int = 2,
    beams: int = 2,
    past: int = 2,
    new: int = 2,
    cache_len: int = 5,
    seed: int = 0,
    text_len: int = 6,
):
    """Random inputs for every graph (also used by validation): the encoder's inputs (pixel
    values, or token ids with an attention mask that pads the first row), token ids, caches."""
    g = torch.Generator().manual_seed(seed)
    layers, heads, hd = decoder_dims(model.decoder.config)
    if image_size is None:
        text = torch.randint(5, model.encoder.config.vocab_size, (batch, text_len), generator=g)
        mask = torch.ones(batch, text_len, dtype=torch.int64)
        mask[0, text_len - 2 :] = 0  # a shorter text, padded
        pad = model.encoder.config.pad_token_id or 0
        encoder_in = (text.masked_fill(mask == 0, pad), mask)
    else:
        encoder_in = (torch.randn(batch, num_channels(model), *image_size, generator=g),)
    vocab = model.decoder.config.vocab_size
    ids = torch.randint(3, vocab, (batch * beams, past + new), generator=g)
    # no pad id among them: validation compares against transformers' forward over the whole
    # sequence, where a pad mid-sequence moves RoBERTa-style positions as generate() never does
    pad = model.decoder.config.pad_token_id
    if pad is not None and 3 <= pad < vocab and vocab > 4:
        ids[ids == pad] = 3 if pad != 3 else 4
    cache = [
        torch.randn(batch * beams, heads, cache_len, hd, generator=g) for _ in range(2 * layers)
    ]
    return encoder_in, ids, cache


def export_graphs(
    model, out_dir: Path, image_size: tuple[int, int] | None, opset: int, progress
) -> dict[str, GraphSpec]:
    """Write encoder.onnx, cross_kv.onnx and decoder.onnx; returns their specs."""
    encoder, cross_kv, step = (
        (EncoderGraph if image_size is not None else TextEncoderGraph)(model).eval(),
        CrossKV(model).eval(),
        DecoderStep(model).eval(),
    )
    encoder_in, ids, cache = example_inputs(model, image_size)
    with torch.no_grad():
        states = encoder(*encoder_in)
        cross = cross_kv(states)
    enc_len = states.shape[1] if image_size is not None else "enc_len"
    specs = graph_specs(model, image_size, enc_len, states.shape[2])
    progress("encoder.onnx")
    _export(encoder, encoder_in, specs["encoder"], out_dir / "encoder.onnx", opset)
    progress("cross_kv.onnx")
    _export(cross_kv, (states.contiguous(),), specs["cross_kv"], out_dir / "cross_kv.onnx", opset)
    progress("decoder.onnx")
    rows, groups = ids.shape[0], encoder_in[0].shape[0]
    args = (
        ids[:, :1].contiguous(),
        torch.arange(2, 2 + rows, dtype=torch.int64) % 3,  # rows at different positions
        list(cache),
        [c.contiguous() for c in cross],  # one image per group
        torch.ones(groups, states.shape[1], dtype=torch.int64),
    )
    _export(step, args, specs["decoder"], out_dir / "decoder.onnx", opset)
    return specs
