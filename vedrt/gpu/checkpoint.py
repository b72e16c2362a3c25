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
