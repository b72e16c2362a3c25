"""The benchmarked models: random weights with real shapes, built from configs, and the scene model.

Weights are random (no model hub here), but speed depends only on shapes, so a ViT-base + GPT2-small
built from default configs costs what `nlpconnect/vit-gpt2-image-captioning` costs. Checkpoints and
exports are cached under the work directory: building and exporting a 239M-parameter model takes
minutes on 2 cores and is not what is being measured.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .backends import ModelSpec

REPO = Path(__file__).resolve().parent.parent
SCENES_EXPORT = REPO / "vedrt" / "models" / "scenes"
SCENES_CHECKPOINT = REPO / "checkpoints" / "scenes"


def _vit_gpt2():
    """ViT-base/16 (224 px) + GPT2-small with cross-attention: the vit-gpt2 captioner's shape."""
    import transformers as T

    encoder = T.ViTConfig()  # the defaults are ViT-base/16 at 224 px
    decoder = T.GPT2Config(add_cross_attention=True)  # the defaults are GPT2-small
    return T.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder), 50256


def _trocr_base():
    """ViT-base at 384 px + a 12-layer, 1024-wide TrOCR decoder: trocr-base's shape."""
    import transformers as T

    encoder = T.ViTConfig(image_size=384)
    decoder = T.TrOCRConfig(
        vocab_size=50265,
        d_model=1024,
        decoder_layers=12,
        decoder_attention_heads=16,
        decoder_ffn_dim=4096,
        activation_function="gelu",
        max_position_embeddings=512,
        layernorm_embedding=True,
        use_learned_position_embeddings=True,
        is_decoder=True,
        add_cross_attention=True,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )
    config = T.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    return config, 2


CONFIGS: dict[str, Callable] = {"vit-gpt2": _vit_gpt2, "trocr-base": _trocr_base}
MODELS = (*CONFIGS, "scenes")


def build_checkpoint(name: str, out: Path, seed: int = 0) -> Path:
    """Save a random-weight checkpoint of model `name` (once; reused afterwards)."""
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers as T

    config, start = CONFIGS[name]()
    torch.manual_seed(seed)
    model = T.VisionEncoderDecoderModel(config=config).eval()
    special = model.decoder.config
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id = start
        cfg.pad_token_id = special.pad_token_id if special.pad_token_id is not None else start
        cfg.eos_token_id = special.eos_token_id if special.eos_token_id is not None else start
    model.generation_config.bos_token_id = special.bos_token_id
    model.save_pretrained(out)
    return out


def ensure_export(checkpoint: Path, out: Path, precision: str, log: Callable[[str], None]) -> Path:
    """Export `checkpoint` at `precision` into `out` unless a finished export that this vedrt
    reads is already there (an export of an older format is replaced, not benchmarked as failed)."""
    from vedrt.errors import VedrtError
    from vedrt.manifest import read_manifest

    reason = "none there"
    source = out.with_name(out.name + ".source.json")  # which checkpoint the export came from
    fingerprint = checkpoint_fingerprint(checkpoint)
    if (out / "vedrt.json").is_file():
        try:
            read_manifest(out)
            if source.is_file() and json.loads(source.read_text()) == fingerprint:
                return out
            reason = (
                "exported from another checkpoint, or this one changed since"
                if source.is_file()
                else "no record of the checkpoint it was exported from"
            )
        except VedrtError as exc:
            reason = str(exc).split(";")[0]
    log(
        f"exporting {checkpoint.name} ({precision}) to {out} ({reason}): minutes for base-sized models"
    )
    # In a child process: exporting holds the model, its traces and ONNX protos, and the memory
    # stays with the process after it. In the harness itself, TrOCR-base's two exports left it
    # at 13.9 GB beside three workers at batch 32, and the kernel's OOM killer ended the run.
    quantize = [] if precision == "fp32" else ["--quantize", precision]
    command = [sys.executable, "-m", "vedrt", "export", str(checkpoint), str(out), "--overwrite"]
    done = subprocess.run([*command, *quantize], stdin=subprocess.DEVNULL, stdout=2, check=False)
    if done.returncode:
        raise RuntimeError(f"exporting {checkpoint} ({precision}) failed: exit {done.returncode}")
    source.write_text(json.dumps(fingerprint, indent=1) + "\n")
    return out


def checkpoint_fingerprint(checkpoint: Path) -> dict:
    """Where a checkpoint is and its files' sizes and times: a cached export is benchmarked
    only for the checkpoint it was made from (another one of the same folder name, or this one
    retrained, used to get the old export)."""
    files = {}
    for path in sorted(checkpoint.iterdir()):
        if path.is_file():
            stat = path.stat()
            files[path.name] = [stat.st_size, stat.st_mtime_ns]
    return {"checkpoint": str(checkpoint.resolve()), "files": files}


def _image_size(config: dict) -> tuple[int, int]:
    size = config["encoder"]["image_size"]
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def prepare(
    name: str, work_dir: Path, precisions: tuple[str, ...], log: Callable[[str], None]
) -> ModelSpec | None:
    """The spec of model `name`, building and exporting what is missing; None if unavailable."""
    if name == "scenes":
        return _prepare_scenes(work_dir / name, precisions, log)
    if name in CONFIGS:
        root = work_dir / name
        checkpoint = build_checkpoint(name, root / "checkpoint")
    else:  # a saved checkpoint directory of the user's
        checkpoint = Path(name).absolute()
        if not (checkpoint / "config.json").is_file():
            raise ValueError(
                f"{name}: neither a known model ({', '.join(MODELS)}) nor a checkpoint"
            )
        name = checkpoint.name
        # two checkpoints of one folder name (runs/a/ck, runs/b/ck) keep apart caches
        root = work_dir / f"{name}-{hashlib.sha1(str(checkpoint).encode()).hexdigest()[:8]}"
    exports = {p: ensure_export(checkpoint, root / p, p, log) for p in precisions}
    config = json.loads((checkpoint / "config.json").read_text())
    return ModelSpec(name, checkpoint, exports, _image_size(config), root)


def _prepare_scenes(
    root: Path, precisions: tuple[str, ...], log: Callable[[str], None]
) -> ModelSpec | None:
    """The shipped export (fp32) and, where its checkpoint is here, int8 exported from it."""
    if not (SCENES_EXPORT / "vedrt.json").is_file():
        return None
    checkpoint = SCENES_CHECKPOINT if (SCENES_CHECKPOINT / "config.json").is_file() else None
    exports = {"fp32": SCENES_EXPORT}
    for p in precisions:
        if p != "fp32" and checkpoint is not None:
            exports[p] = ensure_export(checkpoint, root / p, p, log)
    manifest = json.loads((SCENES_EXPORT / "vedrt.json").read_text())
    size = tuple(manifest["encoder"]["image_size"])
    return ModelSpec("scenes", checkpoint, exports, (int(size[0]), int(size[1])), root)


def pixel_values(spec: ModelSpec, batch: int, seed: int = 0) -> np.ndarray:
    """Inputs every backend gets: rendered held-out scenes for the scene model, noise otherwise."""
    if spec.name == "scenes":
        return scene_pixels(spec, batch, seed)
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, *spec.image_size), dtype=np.float32)


def scene_pixels(spec: ModelSpec, count: int, seed: int = 0) -> np.ndarray:
    """Held-out scenes (a seed training never touches), preprocessed as the export says."""
    from vedrt.data.scenes import HELDOUT_SEED, render, scene_at
    from vedrt.runtime.preprocess import ImageProcessor

    processor = ImageProcessor.from_file(spec.exports["fp32"] / "preprocessor_config.json")
    images = [render(scene_at(HELDOUT_SEED + seed, i)) for i in range(count)]
    return processor(images)
