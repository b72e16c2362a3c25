"""Runtime defects of issue #9: each test failed before its fix (explain with beams, images,
option validation, manifest consistency, the caption command's output handling)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


# --- 2: --explain with beam search -------------------------------------------------------------


def test_explain_with_beam_search_uses_the_chosen_beams_rows(exported) -> None:
    torch = pytest.importorskip("torch")
    from vedrt.runtime import load
    from vedrt.runtime.explain import token_maps

    shared, export_dir = exported("vit", "gpt2")
    model = copy.deepcopy(shared)
    model.set_attn_implementation("eager")
    gen = load(export_dir, threads=1)
    pv = np.random.RandomState(7).randn(3, 3, 32, 32).astype(np.float32)
    # EOS := a token the first image's best beam writes third, so sequences end early and unevenly
    kwargs = dict(num_beams=4, max_new_tokens=8, no_repeat_ngram_size=1)
    eos = int(gen.generate(pv, **kwargs)[0, 3])
    kwargs |= dict(eos_token_id=eos, pad_token_id=eos)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(
            pixel_values=torch.from_numpy(pv),
            output_attentions=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    ours = gen.generate(pv, return_dict=True, output_attentions=True, **kwargs)
    ref_att = [[a.numpy() for a in layers] for layers in ref.cross_attentions]
    ref_idx = ref.beam_indices.numpy()
    assert (ref_idx < 0).any()  # some sequence ended before the last step
    for i in range(3):
        steps = int((ref_idx[i] >= 0).sum())
        rows = [int(r) for r in ours.beam_indices[i, :steps]]
        assert rows == [int(r) for r in ref_idx[i, :steps]]
        ours_maps = token_maps(ours.cross_attentions, grid=(4, 4), rows=rows)  # IndexError once
        ref_maps = token_maps(ref_att, grid=(4, 4), rows=rows)
        assert ours_maps.shape == (steps, 4, 4)
        np.testing.assert_allclose(ours_maps, ref_maps, atol=1e-4)


def test_caption_explain_with_beams_on_the_shipped_model(tmp_path, capsys) -> None:
    from vedrt.cli import main

    out = tmp_path / "att.png"
    images = [str(EXAMPLES / "scene1.png"), str(EXAMPLES / "scene2.png")]
    assert main(["caption", "--explain", str(out), "--num-beams", "4", *images]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == images
    assert out.is_file() and (tmp_path / "att-2.png").is_file()


# --- 3: decompression bombs and huge images -------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims `width` x `height` (what Pillow reads at open) without the pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat))
    return path


@pytest.mark.parametrize("size", [(30000, 30000), (12000, 9000)])
def test_a_bomb_is_one_bad_image_and_the_others_are_captioned(tmp_path, capsys, size) -> None:
    from vedrt.cli import main

    bomb = _png_header_only(tmp_path / "bomb.png", *size)
    gray = tmp_path / "gray.png"
    with Image.open(EXAMPLES / "scene2.png") as im:
        im.convert("L").save(gray)
    good = str(EXAMPLES / "scene1.png")
    assert main(["caption", good, str(bomb), str(gray)]) == 1
    captured = capsys.readouterr()
    assert [line.split("\t")[0] for line in captured.out.splitlines()] == [good, str(gray)]
    errors = [e for e in captured.err.splitlines() if str(bomb) in e]
    assert len(errors) == 1 and "limit" in errors[0] and "Traceback" not in captured.err


def test_a_huge_jpeg_is_decoded_reduced(tmp_path) -> None:
    from vedrt.runtime import load
    from vedrt.runtime.preprocess import LARGE_PIXELS, load_image

    path = tmp_path / "huge.jpg"
    Image.new("L", (6000, 6000), 90).save(path, quality=90)
    assert 6000 * 6000 > LARGE_PIXELS
    gen = load(ROOT / "vedrt" / "models" / "scenes", threads=1)
    keep = gen.processor.keep_short_side
    image = load_image(path, keep_short_side=keep)
    assert keep <= min(image.size) < 2 * keep  # not 6000x6000 in memory
    assert load_image(path).size == (6000, 6000)  # no processor, no reduction
    pv = gen.preprocess([path])
    assert pv.shape[0] == 1 and np.isfinite(pv).all()


# --- 4: EXIF orientation and 16-bit grayscale -----------------------------------------------------


def test_exif_orientation_is_applied(tmp_path) -> None:
    from vedrt.runtime import load
    from vedrt.runtime.preprocess import load_image

    with Image.open(EXAMPLES / "scene2.png") as im:
        upright = im.convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways writes it
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.png"
    stored.save(path, exif=exif)
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(upright))
    with Image.open(path) as im:  # a PIL image given directly is turned upright too
        np.testing.assert_array_equal(np.asarray(load_image(im)), np.asarray(upright))
    gen = load(ROOT / "vedrt" / "models" / "scenes", threads=1)
    assert gen.caption([path]) == gen.caption([EXAMPLES / "scene2.png"])


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path) -> None:
    from vedrt.runtime import load

    with Image.open(EXAMPLES / "scene2.png") as im:
        gray8 = im.convert("L")
    wide = np.asarray(gray8).astype(np.uint16) * 257  # the same picture with 16 bits per pixel
    path16 = tmp_path / "gray16.png"
    Image.fromarray(wide).save(path16)
    with Image.open(path16) as im:
        assert im.mode.startswith("I")
    gen = load(ROOT / "vedrt" / "models" / "scenes", threads=1)
    pv16 = gen.preprocess([path16])
    pv8 = gen.preprocess([gray8])
    np.testing.assert_array_equal(pv16, pv8)
    as_int32 = Image.fromarray(wide.astype(np.int32))  # mode "I", as older Pillow opens them
    np.testing.assert_array_equal(gen.preprocess([as_int32]), pv8)
    assert gen.caption([path16]) == gen.caption([gray8])


# --- 8: every option validated at the boundary ------------------------------------------------------


@pytest.fixture(scope="module")
def scenes():
    from vedrt.runtime import load

    return load(ROOT / "vedrt" / "models" / "scenes", threads=1)


@pytest.mark.parametrize(
    "overrides,words",
    [
        ({"decoder_start_token_id": 99999}, "decoder_start_token_id: token id 99999"),
        ({"bad_words_ids": [[99999]]}, "bad_words_ids: token id 99999"),
        ({"eos_token_id": [2, 99999]}, "eos_token_id: token id 99999"),
        ({"forced_bos_token_id": -1}, "forced_bos_token_id: token id -1"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": "5"}, "max_new_tokens must be an integer"),
        ({"num_beams": True}, "num_beams must be an integer"),
        ({"num_beams": 2.0}, "num_beams must be an integer"),
        ({"top_k": "50"}, "top_k must be an integer"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"length_penalty": True}, "length_penalty must be a number"),
        ({"do_sample": 1}, "do_sample must be True or False"),
        ({"return_dict": "yes"}, "return_dict must be True or False"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"min_new_tokens": 25, "max_new_tokens": 10}, "min_new_tokens=25"),
        ({"min_new_tokens": -1}, "min_new_tokens must be >= 0"),
    ],
)
def test_bad_option_values_are_input_errors_before_generation(scenes, overrides, words) -> None:
    from vedrt.runtime import InputError

    pixel_values = scenes.preprocess([EXAMPLES / "scene1.png"])
    with pytest.raises(InputError, match=words):
        scenes.options(**overrides)
    with pytest.raises(InputError, match=words):
        scenes.generate(pixel_values, **overrides)


def test_numpy_integers_and_int_floats_are_accepted(scenes) -> None:
    o = scenes.options(max_new_tokens=np.int64(5), num_beams=np.int32(2), temperature=1)
    assert (o.max_new, o.num_beams, o.temperature) == (5, 2, 1.0)


def test_manifest_positions_that_disagree_with_the_graph_fail_at_load(tmp_path) -> None:
    import json
    import shutil

    from vedrt.runtime import InputError, load

    export = tmp_path / "m64"
    shutil.copytree(ROOT / "vedrt" / "models" / "scenes", export)
    manifest = json.loads((export / "vedrt.json").read_text())
    manifest["decoder"]["max_positions"] = 64  # the graph's position table has 32 rows
    (export / "vedrt.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="max_positions=64 does not match the decoder graph"):
        load(export, threads=1)


def test_build_defaults_fit_the_shipped_model(capsys) -> None:
    import argparse

    from vedrt.cli import main
    from vedrt.manifest import read_manifest
    from vedrt.tensorrt import cli as build_cli

    parser = argparse.ArgumentParser()
    build_cli.add_arguments(parser)
    scenes_dir = ROOT / "vedrt" / "models" / "scenes"
    args = parser.parse_args([str(scenes_dir)])
    limits = build_cli._limits(args, read_manifest(scenes_dir).max_positions)
    assert limits.max_new_tokens == 31  # 32 positions: the start token and 31 new ones
    assert build_cli._limits(parser.parse_args([str(scenes_dir)]), 1024).max_new_tokens == 32
    code = main(["build", str(scenes_dir)])  # no TensorRT/GPU here: that is the only complaint
    err = capsys.readouterr().err
    assert "exceeds" not in err
    if code != 0:
        assert code == 2 and len(err.strip().splitlines()) == 1


# --- 5: --threads bounded, default measured ---------------------------------------------------------


def test_threads_above_the_cores_are_refused(capsys) -> None:
    from vedrt.cli import main
    from vedrt.runtime import InputError, load
    from vedrt.runtime.threads import machine_cores

    scenes_dir = ROOT / "vedrt" / "models" / "scenes"
    too_many = machine_cores() + 1
    for bad, words in ((too_many, "more than the"), (True, "non-negative integer"), (-1, "non-")):
        with pytest.raises(InputError, match=words):
            load(scenes_dir, threads=bad)
    assert main(["caption", str(EXAMPLES / "scene1.png"), "--threads", "999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "threads=999 is more than the" in err[0]


def test_default_threads_is_the_measured_one() -> None:
    from vedrt.runtime import load
    from vedrt.runtime.threads import default_threads

    gen = load(ROOT / "vedrt" / "models" / "scenes")
    for session in gen.executor.sessions.values():
        assert session.get_session_options().intra_op_num_threads == default_threads() == 1


def test_cli_and_api_report_a_bad_option_with_the_same_line(scenes, capsys) -> None:
    from vedrt.cli import main
    from vedrt.runtime import InputError

    with pytest.raises(InputError) as api:
        scenes.options(num_beams=0)
    assert main(["caption", str(EXAMPLES / "scene1.png"), "--num-beams", "0"]) == 2
    assert capsys.readouterr().err.strip() == f"vedrt caption: error: {api.value}"


def test_an_unconvertible_mode_is_an_input_error(scenes) -> None:
    from vedrt.runtime import InputError

    with pytest.raises(InputError, match="cannot convert mode La"):
        scenes.caption([Image.new("La", (8, 8))])
