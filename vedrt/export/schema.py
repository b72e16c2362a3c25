"""What the exporter writes into vedrt.json (the schema `vedrt.manifest` reads back)."""

from __future__ import annotations

import json
from typing import Any

from ..manifest import FORMAT_VERSION
from .graphs import num_channels
from .modules import decoder_dims, decoder_hidden_size


def _patch_grid(enc_config, family, image_size: tuple[int, int]) -> tuple[int, int]:
    patch = (
        enc_config.patch_size
        if isinstance(enc_config.patch_size, int)
        else enc_config.patch_size[0]
    )
    if not family.hierarchical:
        return image_size[0] // patch, image_size[1] // patch
    # Swin pads the image to whole patches and each merge to an even size: ceilings, not floors
    grid = [-(-side // patch) for side in image_size]
    for _ in range(len(enc_config.depths) - 1):
        grid = [-(-side // 2) for side in grid]
    return grid[0], grid[1]


def _encoder_fields(model, family, image_size, enc_len, enc_dim) -> dict[str, Any]:
    if image_size is None:
        config = model.encoder.config
        return {
            "family": family.name,
            "modality": "text",
            "hidden_size": enc_dim,
            "vocab_size": config.vocab_size,
            "max_positions": _max_positions(config, family.positions),
            "pad_token_id": config.pad_token_id,
        }
    return {
        "family": family.name,
        "modality": "image",
        "image_size": list(image_size),
        "num_channels": num_channels(model),
        "enc_len": enc_len,
        "hidden_size": enc_dim,
        "prefix_tokens": family.prefix_tokens,
        "patch_grid": list(_patch_grid(model.encoder.config, family, image_size)),
    }


def build_manifest(
    model,
    specs,
    image_size,
    family_enc,
    family_dec,
    opset,
    validation,
    enc_len,
    enc_dim,
    graph_bytes,
    lean_decoder: str | None = None,
):
    """lean_decoder: the file of the decoder step without attention outputs, once it is written
    (after validation, which loads the export without it)."""
    import torch
    import transformers

    from .. import __version__

    dec_config = model.decoder.config
    layers, heads, head_dim = decoder_dims(dec_config)
    gen = generation_config(model)
    start = start_token(gen)
    graphs = {
        name: {
            "file": spec.file,
            "bytes": graph_bytes[spec.file],
            "inputs": [t.to_json() for t in spec.inputs],
            "outputs": [t.to_json() for t in spec.outputs],
        }
        for name, spec in specs.items()
    }
    if lean_decoder is not None:
        graphs["decoder"]["file_without_attentions"] = lean_decoder
    return {
        "format_version": FORMAT_VERSION,
        "vedrt_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "opset": opset,
        "precision": "fp32",
        "quantization": None,
        "encoder": _encoder_fields(model, family_enc, image_size, enc_len, enc_dim),
        "decoder": {
            "family": family_dec.name,
            "num_layers": layers,
            "num_heads": heads,
            "head_dim": head_dim,
            "hidden_size": decoder_hidden_size(dec_config),
            "vocab_size": dec_config.vocab_size,
            "max_positions": _max_positions(dec_config, family_dec.positions),
            "top_k": specs["decoder"].outputs[-1].shape[1],  # best log-probs per row in the graph
        },
        "special_tokens": {
            "decoder_start_token_id": start,
            "bos_token_id": gen.bos_token_id,
            "eos_token_id": gen.eos_token_id,
            "pad_token_id": gen.pad_token_id,
        },
        # through transformers' JSON writer: some settings are objects (`watermarking_config`)
        "generation_config": json.loads(gen.to_json_string(use_diff=True))
        | {"max_length": gen.max_length},
        "graphs": graphs,
        "source_config": model.config.to_dict(),
        "validation": validation.to_json() if validation is not None else None,
    }


def start_token(gen, default: int | None = None) -> int | None:
    """transformers' `_prepare_special_tokens`: the generation config's start token, else its
    BOS (never the model config's), else `default`."""
    for token in (gen.decoder_start_token_id, gen.bos_token_id):
        if token is not None:
            return token
    return default


def generation_config(model):
    """The generation config transformers 4.57's `generate()` uses for this model: its own, or,
    where that was made from the model config and never changed while the model config holds
    generation settings (checkpoints from before generation_config.json), one made afresh from
    the model config (`_prepare_generation_config`'s legacy rule)."""
    from transformers import GenerationConfig

    gen = model.generation_config
    if (
        getattr(gen, "_from_model_config", False)
        and getattr(gen, "_original_object_hash", None) == hash(gen)
        and len(model.config._get_non_default_generation_parameters()) > 0
    ):
        fresh = GenerationConfig.from_model_config(model.config)
        if fresh != gen:
            return fresh
    return gen


def _max_positions(config, positions: str) -> int:
    """How many tokens the encoder or decoder can place: past that its position table runs out."""
    if positions == "padding":  # RoBERTa: positions start after the padding index
        return config.max_position_embeddings - (config.pad_token_id or 0) - 1
    return getattr(config, "n_positions", None) or config.max_position_embeddings


def optimization_fields(
    fused: dict[str, dict[str, int]], quantize: str | None, validation: dict | None
) -> dict[str, Any]:
    """What the speed passes did, for the manifest (the fused ops are ONNX Runtime contrib ops)."""
    fields: dict[str, Any] = {
        "optimization": {"fusions": "onnxruntime.transformers", "fused": fused}
    }
    if quantize == "int8":
        fields["precision"] = "int8"
        fields["quantization"] = {
            "method": "onnxruntime.quantization.quantize_dynamic",
            "weight_type": "QInt8",
            "op_types": ["MatMul", "Gemm"],
        }
    if validation is not None:
        fields["validation"] = validation
    return fields
