"""`export_model`: a VisionEncoderDecoder checkpoint in, a complete export directory out.

Everything is written into a temporary directory beside the destination and moved into place only
once complete and validated, so an interrupted or failed export never leaves a half-written
export directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..manifest import graph_bytes as graph_size
from ..manifest import write_manifest
from . import destination
from .architectures import (
    UnsupportedArchitecture,
    check_decoder_config,
    decoder_family,
    encoder_family,
)
from .graphs import DEFAULT_OPSET, MAX_OPSET, export_graphs
from .optimize import externalize, fuse_graphs, write_lean_decoder
from .quantize import QUANTIZE_CHOICES, quantize_graphs, token_agreement
from .schema import build_manifest, generation_config, optimization_fields, start_token
from .validate import Validation, ValidationError, eager_attention, validate_export

ENCODER_TOKENIZER = "encoder_tokenizer"  # a text encoder's own tokenizer, when not the decoder's
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
STAGES = (
    "load",
    "encoder.onnx",
    "cross_kv.onnx",
    "decoder.onnx",
    "optimize",
    "validate",
    "quantize",
    "write",
)


def stages(quantize: str | None = None) -> tuple[str, ...]:
    """The stages an export goes through (`quantize` only when quantizing), for progress display."""
    return STAGES if quantize else tuple(s for s in STAGES if s != "quantize")


class ExportError(ValueError):
    """A problem with the export's input or destination, reported to the user as one line."""


@dataclass(frozen=True)
class ExportReport:
    out_dir: Path
    graph_bytes: dict[str, int]  # file name -> bytes on disk
    parameter_bytes: int  # the checkpoint's parameters in fp32
    validation: dict[str, Any] | None  # None with validate=False
    seconds: float
    encoder: str
    decoder: str
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total_bytes(self) -> int:
        return sum(self.graph_bytes.values())

    def summary(self) -> str:
        mb = 1e6
        lines = [
            f"exported {self.encoder} + {self.decoder} to {self.out_dir} in {self.seconds:.1f}s"
        ]
        width = max(map(len, [*self.graph_bytes, "total"]))
        for name, size in self.graph_bytes.items():
            shown = f"{size / mb:10.1f} MB" if size >= 0.1 * mb else f"{size / 1e3:10.0f} KB"
            lines.append(f"  {name:<{width}} {shown}")
        ratio = self.total_bytes / max(self.parameter_bytes, 1)
        lines.append(
            f"  {'total':<{width}} {self.total_bytes / mb:10.1f} MB ({ratio:.3f}x the fp32 parameters)"
        )
        if self.validation is None:
            lines.append("  validation: skipped (--no-validate)")
        else:
            v = self.validation
            lines.append(
                f"  validation: {'passed' if v['passed'] else 'FAILED'} (max |diff| encoder {v['encoder_max_abs_diff']:.2e}, "
                f"first step {v['first_step_max_abs_diff']:.2e}, cached step {v['cached_step_max_abs_diff']:.2e}; "
                f"tolerance {v['tolerance']:.0e})"
            )
        agreement = (self.validation or {}).get("token_agreement")
        if agreement:
            lines.append(
                f"  int8 vs fp32 PyTorch greedy tokens: {agreement['sequences_identical']:.0%} of "
                f"{agreement['images']} sequences identical, {agreement['tokens_agreeing']:.0%} of "
                f"positions before the first difference"
            )
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _load(model_or_dir):
    """The model in eval mode, and the directory it came from (None for an object)."""
    from transformers import EncoderDecoderModel, VisionEncoderDecoderModel

    classes = {"vision-encoder-decoder": VisionEncoderDecoderModel}
    classes["encoder-decoder"] = EncoderDecoderModel
    if isinstance(model_or_dir, str | os.PathLike):
        src = Path(model_or_dir)
        if not src.is_dir():
            raise ExportError(f"model directory not found: {src}")
        config_path = src / "config.json"
        if not config_path.is_file():
            raise ExportError(f"{src} has no config.json: not a saved transformers checkpoint")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ExportError(f"corrupt {config_path}: {exc}") from None
        if not isinstance(config, dict):
            raise ExportError(f"corrupt {config_path}: not a JSON object")
        model_type = config.get("model_type")
        if model_type not in classes:
            raise ExportError(
                f"{src} holds a {model_type!r} model, not a VisionEncoderDecoderModel "
                "or an EncoderDecoderModel"
            )
        try:
            model = classes[model_type].from_pretrained(src, attn_implementation="eager")
        except Exception as exc:  # noqa: BLE001  (a corrupt or mismatched checkpoint, any library's error)
            # corrupt safetensors (SafetensorError), weights of other shapes (RuntimeError),
            # a config transformers cannot build (ValueError, KeyError, AttributeError)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"cannot load {src}: {type(exc).__name__}: {first[:300]}") from None
        return model.eval(), src
    if not isinstance(model_or_dir, tuple(classes.values())):
        raise ExportError(
            "expected a VisionEncoderDecoderModel, an EncoderDecoderModel or its directory, "
            f"got {type(model_or_dir).__name__}"
        )
    return model_or_dir.eval(), None


def _image_size(config) -> tuple[int, int] | None:
    """(height, width) of an image encoder's input; None for a text encoder."""
    size = getattr(config, "image_size", None)
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _write_side_files(
    model, src: Path | None, tmp: Path, image_size: tuple[int, int], tokenizer, image_processor
) -> list[str]:
    """Tokenizer, image processor, generation and model configs; returns warnings."""
    warnings = []
    model.config.to_json_file(str(tmp / "config.json"))
    model.generation_config.to_json_file(str(tmp / "generation_config.json"))
    if tokenizer is None and src is not None and any((src / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(src, use_fast=True)
        except Exception as exc:  # the tokenizer zoo raises anything; the graphs are still good
            warnings.append(f"could not load the tokenizer from {src}: {str(exc).splitlines()[0]}")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if not (tmp / "tokenizer.json").is_file():
        warnings.append(
            "no fast tokenizer found: the export can generate token ids but not caption text"
        )
    if image_size is None:  # a text encoder: its tokenizer is the one saved above
        return warnings
    if image_processor is not None:
        image_processor.save_pretrained(str(tmp))
    elif src is not None and (src / "preprocessor_config.json").is_file():
        shutil.copy2(src / "preprocessor_config.json", tmp / "preprocessor_config.json")
    else:
        from transformers import ViTImageProcessor

        ViTImageProcessor(size={"height": image_size[0], "width": image_size[1]}).to_json_file(
            str(tmp / "preprocessor_config.json")
        )
        warnings.append(
            "no image processor found: wrote ViTImageProcessor defaults (resize, mean/std 0.5)"
        )
    from ..runtime.errors import InputError
    from ..runtime.preprocess import ImageProcessor

    try:  # read as every caption will read it: a corrupt one fails the export, not each caption
        ImageProcessor.from_file(tmp / "preprocessor_config.json")
    except InputError as exc:
        origin = src / "preprocessor_config.json" if src is not None else "the image processor"
        raise ExportError(f"{origin}: {str(exc).split(': ', 1)[-1]}") from None
    return warnings


def _write_encoder_tokenizer(src: Path | None, tmp: Path, encoder_tokenizer) -> None:
    if encoder_tokenizer is not None:
        encoder_tokenizer.save_pretrained(str(tmp / ENCODER_TOKENIZER))
    elif src is not None and (src / ENCODER_TOKENIZER / "tokenizer.json").is_file():
        shutil.copytree(src / ENCODER_TOKENIZER, tmp / ENCODER_TOKENIZER)


def export_model(
    model_or_dir,
    out_dir: str | os.PathLike,
    *,
    opset: int | None = None,
    validate: bool = True,
    quantize: str | None = None,
    overwrite: bool = False,
    tokenizer=None,
    image_processor=None,
    encoder_tokenizer=None,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export a VisionEncoderDecoderModel or a text EncoderDecoderModel (object or saved
    directory) to an export directory.

    `tokenizer` / `image_processor` are needed only for a model object without a directory to
    read them from. `encoder_tokenizer`: a text model whose encoder has a tokenizer of its own
    (bert2gpt2); saved as `encoder_tokenizer/` (a checkpoint directory's own `encoder_tokenizer/`
    is copied), else the one tokenizer serves both sides. `progress` is called with each stage's
    name as it starts.
    """
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ExportError(
            f"quantize={quantize!r} is not supported (choose {', '.join(QUANTIZE_CHOICES)})"
        )
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if opset > MAX_OPSET:
        raise ExportError(
            f"opset {opset} is not supported: the exporter is tested with opsets "
            f"{DEFAULT_OPSET} to {MAX_OPSET} (24 and up export decoders it cannot read)"
        )
    if opset < DEFAULT_OPSET:
        raise ExportError(
            f"opset {opset} is not supported: the exporter needs opset >= {DEFAULT_OPSET}"
        )
    progress = progress or (lambda stage: None)
    out = Path(out_dir).absolute()
    source = Path(model_or_dir) if isinstance(model_or_dir, str | os.PathLike) else None
    try:
        destination.check(out, overwrite, source)
    except destination.DestinationError as exc:
        raise ExportError(str(exc)) from None
    leftovers = destination.clean_leftovers(out)
    started = time.perf_counter()
    progress("load")
    model, src = _load(model_or_dir)
    try:
        fam_enc = encoder_family(model.config.encoder.model_type)
        fam_dec = decoder_family(model.config.decoder.model_type)
        check_decoder_config(model.config.decoder, fam_dec)
    except UnsupportedArchitecture as exc:
        raise ExportError(str(exc)) from None
    image_size = _image_size(model.config.encoder) if fam_enc.modality == "image" else None
    param_bytes = sum(p.numel() for p in model.parameters()) * 4

    tmp = destination.make_temp(out)
    try:
        specs = export_graphs(model, tmp, image_size, opset, progress)
        progress("optimize")
        fused = fuse_graphs(tmp)
        enc_shape = specs["encoder"].outputs[0].shape

        def manifest(validation, graph_bytes, lean=None):
            fields = build_manifest(
                model, specs, image_size, fam_enc, fam_dec, opset, validation,
                enc_shape[1], enc_shape[2], graph_bytes, lean,
            )  # fmt: skip
            return fields | optimization_fields(fused, quantize, validation_json)

        validation: Validation | None = None
        validation_json = None
        # written now so validation loads the graphs as the runtime will; rewritten at the end
        write_manifest(
            tmp, manifest(None, {s.file: graph_size(tmp / s.file) for s in specs.values()})
        )
        if validate:
            progress("validate")
            start = start_token(generation_config(model), default=0)
            validation = validate_export(model, tmp, start)
            if not validation.passed:
                raise ValidationError(
                    f"validation failed: max |logits difference| {validation.max_abs_diff:.3e} exceeds "
                    f"{validation.tolerance:.0e} (encoder {validation.encoder_max_abs_diff:.2e}, "
                    f"first step {validation.first_step_max_abs_diff:.2e}, cached step {validation.cached_step_max_abs_diff:.2e})"
                )
        validation_json = validation.to_json() if validation is not None else None
        quant_warnings = []
        if quantize is not None:
            progress("quantize")
            validation_json, quant_warnings = _quantize(
                model, tmp, image_size, quantize, validation_json
            )
        progress("write")
        warnings = _write_side_files(model, src, tmp, image_size, tokenizer, image_processor)
        _write_encoder_tokenizer(src, tmp, encoder_tokenizer)
        warnings += quant_warnings + leftovers
        externalize(tmp)  # weights beside the graphs: faster load, lower peak memory
        lean = write_lean_decoder(tmp)  # the step without attention outputs, same weights
        graph_bytes = {spec.file: graph_size(tmp / spec.file) for spec in specs.values()}
        write_manifest(tmp, manifest(validation, graph_bytes, lean))
        graph_bytes[lean] = graph_size(tmp / lean)  # its own structure; the weights are shared
        destination.apply_umask(tmp, out)
        destination.move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportReport(
        out_dir=out,
        graph_bytes=graph_bytes,
        parameter_bytes=param_bytes,
        validation=validation_json,
        seconds=time.perf_counter() - started,
        encoder=fam_enc.name,
        decoder=fam_dec.name,
        warnings=tuple(warnings),
    )


def _quantize(
    model, tmp: Path, image_size: tuple[int, int], quantize: str, validation: dict | None
) -> tuple[dict | None, list[str]]:
    """Quantize the validated fp32 graphs; with validation, measure greedy-token agreement.

    int8 logits are not within 1e-4 of PyTorch by design, so the fp32 graphs are checked against
    that bound first and the int8 ones by how often their greedy tokens match the fp32 model's.
    """
    quantize_graphs(tmp, quantize)
    if validation is None:
        return None, []
    start = start_token(generation_config(model), default=0)
    with eager_attention(model):  # the reference, as in validation
        agreement = token_agreement(model, tmp, start)
    validation = {**validation, "token_agreement": agreement.to_json()}
    warnings = []
    if not agreement.passed:
        warnings.append(
            f"int8 greedy tokens match the fp32 model on only {agreement.sequences_identical:.0%} "
            f"of {agreement.images} random images (random weights diverge easily; check real data)"
        )
    return validation, warnings
