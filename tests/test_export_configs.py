"""Checkpoint settings beyond the family matrix: each exports as transformers generates (token
for token), or is refused at export naming the field. Found by varying config fields one at a
time against transformers 4.57 (eager attention)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import decoder_config, encoder_config, tiny_model  # noqa: E402

from vedrt.export import ExportError, export_model  # noqa: E402
from vedrt.runtime import InputError, load  # noqa: E402

transformers.logging.set_verbosity_error()


def _hf(model, pixel_values: np.ndarray, **options) -> np.ndarray:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(pixel_values=torch.from_numpy(pixel_values), **options).numpy()


def _pixels(channels: int = 3, n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, channels, 32, 32), dtype=np.float32)


def test_start_token_is_bos_when_the_generation_config_has_none(tmp_path):
    """transformers starts with the generation config's start id, else its BOS: never the model
    config's start id (fine-tuning recipes set that one; vedrt took it and every sequence
    differed from its first token)."""
    model = tiny_model("vit", "gpt2", attn_implementation="eager")
    model.generation_config.decoder_start_token_id = None  # BOS stays 1
    model.config.decoder_start_token_id = 7
    model.save_pretrained(tmp_path / "ckpt")
    export_model(str(tmp_path / "ckpt"), tmp_path / "export")
    reference = transformers.VisionEncoderDecoderModel.from_pretrained(
        tmp_path / "ckpt", attn_implementation="eager"
    ).eval()
    pixels = _pixels()
    ours = load(tmp_path / "export").generate(pixels, max_new_tokens=5)
    np.testing.assert_array_equal(ours, _hf(reference, pixels, max_new_tokens=5))
    assert (ours[:, 0] == 1).all()


def test_grayscale_encoder_exports_and_generates(tmp_path):
    """`num_channels=1`: traced, validated and described with one channel (three were
    hard-coded); captioning image files says why it cannot (vedrt's preprocessing is RGB)."""
    torch.manual_seed(0)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        encoder_config("vit", 32, num_channels=1), decoder_config("gpt2")
    )
    model = transformers.VisionEncoderDecoderModel._from_config(config, attn_implementation="eager")
    for c in (model.config, model.generation_config):
        c.decoder_start_token_id, c.pad_token_id, c.eos_token_id = 1, 0, 2
    model.eval()
    export_model(model, tmp_path / "export")
    assert (
        json.loads((tmp_path / "export" / "vedrt.json").read_text())["encoder"]["num_channels"] == 1
    )
    gen = load(tmp_path / "export")
    pixels = _pixels(channels=1)
    for options in ({"max_new_tokens": 5}, {"num_beams": 3, "max_new_tokens": 5}):
        np.testing.assert_array_equal(
            gen.generate(pixels, **options), _hf(model, pixels, **options)
        )
    from PIL import Image

    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "x.png")
    with pytest.raises(InputError, match="1-channel images"):
        gen.caption([tmp_path / "x.png"])


@pytest.mark.parametrize("decoder", ["bert", "roberta", "electra"])
@pytest.mark.parametrize("kind", ["relative_key", "relative_key_query"])
def test_relative_position_decoders_are_refused_by_name(tmp_path, decoder, kind):
    """The generic step has absolute positions only: refused naming the field, with validation
    off too (it exported, and generated other tokens, without a word)."""
    model = tiny_model("vit", decoder, decoder_overrides={"position_embedding_type": kind})
    with pytest.raises(ExportError, match=f"position_embedding_type='{kind}' is not supported"):
        export_model(model, tmp_path / "export", validate=False)
    assert not (tmp_path / "export").exists()


def test_watermarking_config_exports_and_warns(tmp_path):
    """An object-valued generation setting reaches the manifest as JSON (the export died with a
    TypeError), and loading warns that vedrt does not apply it."""
    model = tiny_model("vit", "gpt2")
    model.generation_config.watermarking_config = transformers.WatermarkingConfig(bias=5.0)
    with pytest.warns(UserWarning, match="watermarking_config"):  # validation loads it too
        export_model(model, tmp_path / "export")
    manifest = json.loads((tmp_path / "export" / "vedrt.json").read_text())
    assert manifest["generation_config"]["watermarking_config"]["bias"] == 5.0
    with pytest.warns(UserWarning, match="watermarking_config"):
        load(tmp_path / "export")


@pytest.mark.parametrize("pad", [3, 5, 8])
def test_padding_position_decoder_with_a_high_pad_id_validates(tmp_path, pad):
    """Validation drew token ids that could equal the pad id: transformers' whole-sequence
    forward then numbers RoBERTa positions differently from its own generate(), and the export
    was refused for a difference generation never has."""
    model = tiny_model("vit", "roberta", decoder_overrides={"pad_token_id": pad}, seed=1)
    model = model.to(torch.float32).eval()
    report = export_model(model, tmp_path / "export")
    assert report.validation["passed"]
    gen, pixels = load(tmp_path / "export"), _pixels()
    for options in ({"max_new_tokens": 6}, {"num_beams": 3, "max_new_tokens": 6}):
        np.testing.assert_array_equal(
            gen.generate(pixels, **options), _hf(model, pixels, **options)
        )
