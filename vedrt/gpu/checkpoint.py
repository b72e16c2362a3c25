"""Where the torch executor gets its weights: the export directory has the config, not them.

Three ways, simplest first:
1. `checkpoint=None`: the export directory itself, when `model.safetensors` was copied into it
   (`config.json` is already there, so `from_pretrained(export_dir)` works);
2. `checkpoint="dir"`: the checkpoint directory the export was made from;
3. `checkpoint=model`: an in-memory `VisionEncoderDecoderModel` (tests, notebooks).
The model must match the export (layers, heads, vocabulary): a mismatch is one clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from ..manifest import Manifest

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def load_checkpoint(manifest: Manifest, checkpoint: Any) -> tuple[Any, bool]:
    """(model in eval mode, whether we own it and may convert it in place)."""
    if checkpoint is None:
        if not any((manifest.root / name).is_file() for name in WEIGHT_FILES):
            raise InputError(
                f"backend='torch' needs the checkpoint's weights, which {manifest.root} lacks: pass "
                "load(..., checkpoint=DIR) with the directory it was exported from, or copy that "
                "directory's model.safetensors into the export directory"
            )
        checkpoint = manifest.root
    if isinstance(checkpoint, str | Path):
        model, owned = _from_dir(Path(checkpoint)), True
    elif hasattr(checkpoint, "decoder") and hasattr(checkpoint, "parameters"):
        model, owned = checkpoint, False
    else:
        raise InputError(
            f"checkpoint must be a directory or a VisionEncoderDecoderModel, got {type(checkpoint).__name__}"
        )
    check_matches(manifest, model)
    return model.eval(), owned


def _from_dir(path: Path) -> Any:
    if not path.is_dir():
        raise InputError(f"checkpoint {path}: not a directory")
    try:
        from transformers import VisionEncoderDecoderModel
    except ImportError:
        raise InputError(
            "backend='torch' needs transformers (pip install 'vedrt[export]')"
        ) from None
    try:
        return VisionEncoderDecoderModel.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"checkpoint {path}: cannot load ({first[:200]})") from None


def check_matches(manifest: Manifest, model: Any) -> None:
    """The weights must be those of the exported model, or the tokens would silently differ."""
    from ..export.architectures import decoder_family
    from ..export.modules import decoder_dims

    config = model.decoder.config
    layers, heads, head_dim = decoder_dims(config)
    family = decoder_family(config.model_type).name
    have = (family, layers, heads, head_dim, config.vocab_size)
    want = (
        manifest.raw.get("decoder", {}).get("family", family),
        manifest.num_layers,
        manifest.num_heads,
        manifest.head_dim,
        manifest.vocab_size,
    )
    if have != want:
        raise InputError(
            "checkpoint does not match the export: (family, layers, heads, head_dim, vocab) "
            f"{have} vs {want} in {manifest.root}/vedrt.json"
        )
    exported = manifest.raw.get("source_config")
    if isinstance(exported, dict):  # the encoder and the position tables too, not only the above
        found = next(structure_differences(exported, _as_json(model.config.to_dict())), None)
        if found is not None:
            raise InputError(
                f"checkpoint does not match the export: {found} ({manifest.root}/vedrt.json)"
            )


# config fields that change what the weights compute or where they apply (sizes, layouts,
# position tables): the checkpoint's must equal what the export was made from
STRUCTURE = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
    "num_channels",
    "embed_dim",
    "depths",
    "num_heads",
    "window_size",
    "embedding_size",
    "max_position_embeddings",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "d_model",
    "decoder_layers",
    "decoder_attention_heads",
    "decoder_ffn_dim",
    "vocab_size",
)


def structure_differences(exported: dict, given: dict) -> Any:
    """'encoder.patch_size: export 16, checkpoint 32' for each structural field that differs."""
    for part in ("encoder", "decoder"):
        want, have = exported.get(part) or {}, given.get(part) or {}
        for key in STRUCTURE:
            if key in want and key in have and want[key] != have[key]:
                yield f"{part}.{key}: export {want[key]!r}, checkpoint {have[key]!r}"


def _as_json(config: dict) -> dict:
    """The config as the manifest holds it (tuples as lists)."""
    import json

    return json.loads(json.dumps(config, default=str))
