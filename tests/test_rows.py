"""The architecture rows beyond the core matrix, token for token against transformers' eager model.

MBart (Donut/Nougat, with MBart's default *encoder* sizes, which must not leak into the decoder's),
BART's causal decoder, XLM-RoBERTa, ELECTRA in both embedding layouts, Swin v2 and Donut-Swin,
ViT/DeiT at TrOCR's 384x384 and at non-square sizes (Donut's 2560x1920 and a 192x1024 line
image, scaled down), and GPT2 with the attention settings transformers' SDPA path ignores, exported
from an SDPA model object. Weights are scaled up so captions vary between images and steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_export import _initializer_bytes  # noqa: E402
from test_runtime_parity import MATRIX_SETTINGS, _fill, assert_parity, eos_ids  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from vedrt.runtime import load  # noqa: E402

transformers.logging.set_verbosity_error()

# id -> (encoder, decoder, image (height, width), encoder config overrides); Donut rows export
# with Donut's image processor, the others with the exporter's default (a ViT resize)
ROWS = {
    "donut-swin+mbart@2560x1920/40": ("donut-swin", "mbart", (64, 48), {}),
    "swinv2+mbart@36x44": ("swinv2", "mbart", (36, 44), {}),  # padded to whole patches
    "vit+bart": ("vit", "bart", (32, 32), {}),
    "vit+xlm-roberta@192x1024/4": ("vit", "xlm-roberta", (48, 256), {}),
    "vit+electra": ("vit", "electra", (32, 32), {}),
    "vit+electra-proj": ("vit", "electra-proj", (32, 32), {}),
    "deit+trocr@384x384": ("deit", "trocr", (384, 384), {"patch_size": 32}),
}
SETTINGS = MATRIX_SETTINGS + [
    {"num_beams": 4, "length_penalty": 0.0, "max_new_tokens": 8},
    {"num_beams": 3, "no_repeat_ngram_size": 2, "max_new_tokens": 8},
]


def scaled(model, factor: float = 10.0):
    """Larger weights: tiny random models otherwise repeat one token."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(factor)
    return model


def random_pixels(size: tuple[int, int], n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, 3, *size).astype(np.float32)


@pytest.fixture(scope="module")
def row(request, tmp_path_factory):
    from vedrt.export import export_model

    encoder, decoder, size, enc_overrides = ROWS[request.param]
    model = tiny_model(
        encoder,
        decoder,
        seed=1,
        image_size=size,
        attn_implementation="eager",
        encoder_overrides=enc_overrides,
    )
    scaled(model)
    processor = None
    if encoder == "donut-swin":
        processor = transformers.DonutImageProcessor(size={"height": size[0], "width": size[1]})
    out = tmp_path_factory.mktemp("row") / "export"
    report = export_model(model, out, image_processor=processor)
    return model, out, report, size


@pytest.mark.parametrize("row", list(ROWS), indirect=True)
def test_row_exports_validates_and_generates_transformers_tokens(row):
    model, out, report, size = row
    manifest = json.loads((out / "vedrt.json").read_text())
    assert report.validation["passed"], report.validation
    assert manifest["encoder"]["image_size"] == list(size)
    encoder = manifest["encoder"]
    grid = encoder["patch_grid"]
    assert encoder["enc_len"] == grid[0] * grid[1] + encoder["prefix_tokens"]
    # every weight stored once (MBart/BART/ELECTRA tie their heads to the token embedding)
    weights = sum(_initializer_bytes(out / g["file"]) for g in manifest["graphs"].values())
    assert weights <= sum(p.numel() for p in model.parameters()) * 4 * 1.01
    generator = load(out)
    pv = random_pixels(size)
    greedy = generator.generate(pv, max_new_tokens=10)
    assert len(np.unique(greedy[:, 1:])) > 2, greedy  # the weights really make captions vary
    eos = eos_ids(model, pv)
    for setting in SETTINGS:
        assert_parity(model, generator, pv, **_fill(setting, eos))


@pytest.mark.parametrize("row", ["donut-swin+mbart@2560x1920/40"], indirect=True)
def test_mbart_sizes_come_from_the_decoder_fields(row):
    """MBart's defaults describe a 12-layer, 16-head encoder; the decoder here has 2 and 4."""
    model, out, _, _ = row
    config = model.decoder.config
    assert (config.num_hidden_layers, config.num_attention_heads) == (12, 16)
    manifest = json.loads((out / "vedrt.json").read_text())["decoder"]
    assert (manifest["num_layers"], manifest["num_heads"], manifest["head_dim"]) == (2, 4, 8)
    assert manifest["hidden_size"] == 32 and manifest["family"] == "mbart"


def test_electra_layouts_differ_in_the_embedding_projection():
    """The two ELECTRA rows really exercise both layouts (with and without embeddings_project)."""
    plain = tiny_model("vit", "electra").decoder.electra
    projected = tiny_model("vit", "electra-proj").decoder.electra
    assert not hasattr(plain, "embeddings_project")
    assert projected.embeddings_project.in_features == 16


@pytest.mark.parametrize(
    "flags, settings",
    [
        ({"scale_attn_by_inverse_layer_idx": True}, SETTINGS),
        ({"scale_attn_by_inverse_layer_idx": True, "scale_attn_weights": False}, SETTINGS[:2]),
    ],
    ids=["inverse-layer-idx", "inverse-layer-idx+unscaled"],
)
def test_gpt2_sdpa_object_validates_against_eager(flags, settings, tmp_path):
    """transformers 4.57's SDPA path ignores these settings; the reference is eager attention."""
    from vedrt.export import export_model

    overrides = {"initializer_range": 0.3, "n_layer": 3, **flags}
    model = tiny_model("vit", "gpt2", seed=2, decoder_overrides=overrides)
    assert model.config.decoder._attn_implementation == "sdpa"
    eager = tiny_model("vit", "gpt2", attn_implementation="eager", decoder_overrides=overrides)
    eager.load_state_dict(model.state_dict())
    pv = random_pixels((32, 32))
    ids = torch.tensor([[1, 5, 9, 7]] * len(pv))
    with torch.no_grad():
        sdpa_logits = model(pixel_values=torch.from_numpy(pv), decoder_input_ids=ids).logits
        eager_logits = eager(pixel_values=torch.from_numpy(pv), decoder_input_ids=ids).logits
    assert float((sdpa_logits - eager_logits).abs().max()) > 0.1  # the weights make it matter

    report = export_model(model, tmp_path / "export")
    assert report.validation["passed"], report.validation
    # the caller's object is as it was: still SDPA, still SDPA's logits
    for config in (model.config, model.config.encoder, model.config.decoder):
        assert config._attn_implementation == "sdpa"
    with torch.no_grad():
        again = model(pixel_values=torch.from_numpy(pv), decoder_input_ids=ids).logits
    torch.testing.assert_close(again, sdpa_logits, rtol=0, atol=0)

    generator = load(tmp_path / "export")
    eos = eos_ids(eager, pv)
    for setting in settings:
        assert_parity(eager, generator, pv, **_fill(setting, eos))


def assert_preprocesses_like(row, processor, seed: int, shapes, **options) -> None:
    """Random images of `shapes` (height, width) through the export's processor equal the
    transformers `processor`'s, and the model then generates as transformers does."""
    from PIL import Image

    model, out, _, size = row
    rng = np.random.RandomState(seed)
    images = [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    generator = load(out)
    ours = generator.preprocess(images)
    ref = processor.from_pretrained(out)(images, return_tensors="np")
    assert ours.shape == (3, 3, *size)
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-5, rtol=0)
    assert_parity(model, generator, ours, max_new_tokens=8, **options)


@pytest.mark.parametrize("row", ["vit+xlm-roberta@192x1024/4"], indirect=True)
def test_non_square_images_preprocess_like_transformers(row):
    """The processor the export writes resizes to (height, width), as transformers' does."""
    shapes = [(100, 500), (300, 90), (48, 256)]
    assert_preprocesses_like(row, transformers.ViTImageProcessor, 3, shapes)


@pytest.mark.parametrize("row", ["donut-swin+mbart@2560x1920/40"], indirect=True)
def test_donut_processor_with_a_non_square_size(row):
    """Donut's geometry (resize, thumbnail, pad) at a non-square size travels with the export."""
    shapes = [(200, 80), (50, 120), (64, 48)]
    assert_preprocesses_like(row, transformers.DonutImageProcessor, 4, shapes, num_beams=2)


def test_unsupported_decoder_fails_at_once_listing_every_row(tmp_path, monkeypatch):
    import transformers as T

    from vedrt.export import ExportError, export_model, exporter

    def no_graphs(*args, **kwargs):
        raise AssertionError("graphs traced for an unsupported decoder")

    monkeypatch.setattr(exporter, "export_graphs", no_graphs)
    decoder = T.PegasusConfig(
        vocab_size=96,
        d_model=16,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=16,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=16,
        is_decoder=True,
        add_cross_attention=True,
    )
    config = T.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        tiny_model().encoder.config, decoder
    )
    model = T.VisionEncoderDecoderModel(config=config)
    with pytest.raises(ExportError) as err:
        export_model(model, tmp_path / "out")
    message = str(err.value)
    assert message.startswith("unsupported decoder 'pegasus'; supported decoders: ")
    for name in ("gpt2", "trocr", "bert", "roberta", "mbart", "bart", "xlm-roberta", "electra"):
        assert name in message.split(": ", 1)[1].split(", ")
    assert not (tmp_path / "out").exists()
