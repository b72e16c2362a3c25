"""The runtime's numpy/PIL preprocessing gives transformers' pixel values (within 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vedrt.runtime.errors import InputError
from vedrt.runtime.preprocess import ImageProcessor, load_image

transformers = pytest.importorskip("transformers")


def images() -> list[Image.Image]:
    rng = np.random.RandomState(0)
    out = []
    for h, w in [(48, 64), (64, 48), (31, 97), (224, 224), (20, 12)]:
        out.append(Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)))
    smooth = np.linspace(0, 255, 80 * 60 * 3).reshape(80, 60, 3).astype(np.uint8)
    out.append(Image.fromarray(smooth))
    return out


def odd_modes() -> list[Image.Image]:
    rng = np.random.RandomState(1)
    rgba = Image.fromarray(rng.randint(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.randint(0, 256, (40, 50), dtype=np.uint8), "L")
    palette = Image.fromarray(rng.randint(0, 256, (40, 50, 3), dtype=np.uint8)).convert("P")
    return [rgba, gray, palette]


PROCESSORS = {
    "vit-default": lambda T: T.ViTImageProcessor(),
    "vit-small-bicubic": lambda T: T.ViTImageProcessor(
        size={"height": 32, "width": 40}, resample=3
    ),
    "vit-no-normalize": lambda T: T.ViTImageProcessor(
        size={"height": 30, "width": 30}, do_normalize=False
    ),
    "deit": lambda T: T.DeiTImageProcessor(
        size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}
    ),
    "deit-crop-pads": lambda T: T.DeiTImageProcessor(
        size={"height": 20, "width": 20}, crop_size={"height": 24, "width": 22}
    ),
    "beit": lambda T: T.BeitImageProcessor(
        size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32}
    ),
    "donut": lambda T: T.DonutImageProcessor(size={"height": 64, "width": 48}),
    "donut-align": lambda T: T.DonutImageProcessor(
        size={"height": 48, "width": 64}, do_align_long_axis=True, resample=3
    ),
}


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_matches_transformers(name, tmp_path):
    hf = PROCESSORS[name](transformers)
    hf.to_json_file(str(tmp_path / "preprocessor_config.json"))
    ours = ImageProcessor.from_file(tmp_path / "preprocessor_config.json")
    for image in images():
        expected = hf(image, return_tensors="np")["pixel_values"]
        got = ours([image])
        assert got.dtype == np.float32 and got.shape == expected.shape, (name, image.size)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["vit-default", "deit", "donut"])
def test_other_modes_become_rgb(name, tmp_path):
    hf = PROCESSORS[name](transformers)
    hf.to_json_file(str(tmp_path / "preprocessor_config.json"))
    ours = ImageProcessor.from_file(tmp_path / "preprocessor_config.json")
    for image in odd_modes():
        expected = hf(image.convert("RGB"), return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(ours([image]), expected, atol=1e-5, rtol=0)


def test_batch_of_different_sizes_stacks(tmp_path):
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).to_json_file(
        str(tmp_path / "p.json")
    )
    ours = ImageProcessor.from_file(tmp_path / "p.json")
    assert ours(images()).shape == (len(images()), 3, 32, 32)


def test_bad_image_files(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(good)
    assert load_image(good).size == (20, 20)
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    truncated = tmp_path / "cut.png"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    jpeg = tmp_path / "cut.jpg"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    for path, words in [
        (text, "not an image"),
        (truncated, "truncated"),
        (jpeg, "truncated"),
        (tmp_path / "missing.png", "no such file"),
        (tmp_path, "directory"),
    ]:
        with pytest.raises(InputError, match=words) as info:
            load_image(path)
        assert "\n" not in str(info.value)


def test_corrupt_processor_config(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="corrupt"):
        ImageProcessor.from_file(path)
    with pytest.raises(InputError, match="missing"):
        ImageProcessor.from_file(tmp_path / "nope.json")


def page_images() -> list[Image.Image]:
    """Pages with white margins around darker content, as NougatImageProcessor expects."""
    rng = np.random.RandomState(5)
    out = []
    for (h, w), (top, left, bottom, right) in [
        ((90, 70), (10, 7, 80, 60)),
        ((50, 120), (3, 30, 47, 100)),
        ((64, 48), (0, 0, 64, 48)),
    ]:
        page = np.full((h, w, 3), 250, dtype=np.uint8)
        page[top:bottom, left:right] = rng.randint(0, 256, (bottom - top, right - left, 3))
        out.append(Image.fromarray(page))
    out.append(Image.fromarray(np.full((30, 40, 3), 255, dtype=np.uint8)))  # blank: no crop
    return out


@pytest.mark.parametrize(
    "size, options",
    [((64, 48), {}), ((48, 80), {"do_align_long_axis": True, "resample": 3})],
    ids=["portrait", "landscape-aligned"],
)
def test_nougat_crops_margins_like_transformers(tmp_path, size, options):
    hf = transformers.NougatImageProcessor(size={"height": size[0], "width": size[1]}, **options)
    hf.to_json_file(str(tmp_path / "preprocessor_config.json"))
    ours = ImageProcessor.from_file(tmp_path / "preprocessor_config.json")
    for image in page_images() + images():
        expected = hf(image, return_tensors="np")["pixel_values"]
        got = ours([image])
        assert got.shape == expected.shape == (1, 3, *size), image.size
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_unsupported_processor_class_is_one_clear_error(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text('{"image_processor_type": "LayoutLMv3ImageProcessor"}')
    with pytest.raises(InputError, match="image processor 'LayoutLMv3ImageProcessor' is not supp"):
        ImageProcessor.from_file(path)
    path.write_text('{"feature_extractor_type": "DeiTFeatureExtractor", "size": 40}')
    assert ImageProcessor.from_file(path).do_center_crop  # the DeiT steps, not ViT's


def test_images_from_bytes_and_file_objects(tmp_path):
    """Image bytes (what a server or a download holds) and open binary files decode like the
    path; anything else is one clear error, not a pathlib TypeError."""
    import io

    rng = np.random.RandomState(3)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.randint(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
    expected = np.asarray(load_image(path))
    data = path.read_bytes()
    with open(path, "rb") as handle:
        from_file = np.asarray(load_image(handle))
    for got in (load_image(data), load_image(io.BytesIO(data)), load_image(bytearray(data))):
        np.testing.assert_array_equal(np.asarray(got), expected)
    np.testing.assert_array_equal(from_file, expected)
    with pytest.raises(InputError, match="image bytes: unreadable or truncated") as info:
        load_image(data[: len(data) // 2])
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="cannot read an image from a ndarray") as info:
        load_image(expected)
    assert "\n" not in str(info.value)


def test_caption_takes_one_image_as_bytes():
    from pathlib import Path

    from vedrt import models
    from vedrt.runtime import load

    gen = load(models.path("scenes"))
    path = Path(__file__).resolve().parent.parent / "examples" / "scene1.png"
    assert gen.caption(path.read_bytes()) == gen.caption(path) == ["a small red circle"]


def test_a_decoder_failure_on_crafted_input_is_one_clear_error() -> None:
    """Pillow raises more than OSError on malformed files (NotImplementedError for this fuzzed
    DDS): still an InputError naming the image, never a crash of the caller."""
    from pathlib import Path

    blob = (Path(__file__).parent / "data" / "mutated.dds").read_bytes()
    with pytest.raises(InputError, match="image bytes: unreadable image \\(NotImplementedError"):
        load_image(blob)
