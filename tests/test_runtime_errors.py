"""Bad input gives one clear line (InputError in Python, exit 2 on the command line), and the
runtime and `vedrt caption` never import torch or transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vedrt.cli import main
from vedrt.runtime import InputError, load

ROOT = Path(__file__).resolve().parent.parent
SCENES = ROOT / "vedrt" / "models" / "scenes"  # the shipped export: no torch needed to test
SIZE = json.loads((SCENES / "vedrt.json").read_text())["encoder"]["image_size"][0]
runtime = pytest.mark.runtime  # also run in CI's runtime-only stage (no torch installed)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A private copy of the shipped scene model (tests break copies, never the original)."""
    copy = tmp_path_factory.mktemp("captioner") / "export"
    shutil.copytree(SCENES, copy)
    return copy


@pytest.fixture(scope="module")
def generator(export_dir):
    return load(export_dir)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    files = {}
    for name, size in [("a.png", (40, 30)), ("b.jpg", (32, 32))]:
        files[name] = d / name
        Image.fromarray(rng.randint(0, 256, (*size, 3), dtype=np.uint8)).save(files[name])
    files["gray.png"] = d / "gray.png"
    Image.fromarray(rng.randint(0, 256, (24, 24), dtype=np.uint8), "L").save(files["gray.png"])
    files["bad.png"] = d / "bad.png"
    files["bad.png"].write_text("this is text")
    files["cut.png"] = d / "cut.png"
    files["cut.png"].write_bytes(files["a.png"].read_bytes()[:100])
    return files


@runtime
def test_caption_paths_and_pil_images(generator, image_files):
    texts = generator.caption(
        [image_files["a.png"], Image.open(image_files["b.jpg"]), image_files["gray.png"]],
        max_new_tokens=5,
    )
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    ids = generator.generate(generator.preprocess([image_files["a.png"]]), max_new_tokens=5)
    assert texts[0] == generator.decode(ids)[0]
    assert generator.caption(image_files["a.png"], max_new_tokens=5) == texts[:1]


@runtime
def test_pixel_values_checks(generator):
    good = np.zeros((2, 3, SIZE, SIZE), np.float32)
    assert generator.generate(good, max_new_tokens=2).shape[0] == 2
    cases = [
        (good.astype(np.float64), "float32"),
        (good[0], rf"shape \[3, {SIZE}, {SIZE}\]"),
        (np.zeros((2, 3, SIZE + 8, SIZE), np.float32), rf"expected \[batch, 3, {SIZE}, {SIZE}\]"),
        (np.zeros((2, 1, SIZE, SIZE), np.float32), "expected"),
        (np.zeros((0, 3, SIZE, SIZE), np.float32), "expected"),
        ([good[0], np.zeros((3, SIZE + 16, SIZE), np.float32)], rf"must be \[3, {SIZE}, {SIZE}\]$"),
        ([], "pixel_values is empty"),
        (good.tolist(), "got a list of list: np.asarray"),
        ("pixels", "numpy array"),
        (
            np.full_like(good, np.nan),
            f"{good.size} non-finite value",
        ),  # they poisoned the next request
        (np.where(np.arange(SIZE) == 3, np.inf, good).astype(np.float32), "non-finite"),
    ]
    for value, words in cases:
        with pytest.raises(InputError, match=words) as info:
            generator.generate(value)
        assert "\n" not in str(info.value)
    stacked = generator.generate([good[0], good[1]], max_new_tokens=2)
    assert stacked.shape[0] == 2


@runtime
def test_option_errors(generator):
    pv = np.zeros((1, 3, SIZE, SIZE), np.float32)
    with pytest.raises(TypeError, match="num_beam"):
        generator.generate(pv, num_beam=3)
    # transformers' name for return_dict is taken as it is
    out = generator.generate(pv, max_new_tokens=2, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 3)
    with pytest.raises(InputError, match="disagree"):
        generator.generate(pv, return_dict_in_generate=True, return_dict=False)
    with pytest.raises(InputError, match="num_return_sequences=4 is larger than num_beams=2"):
        generator.generate(pv, num_beams=2, num_return_sequences=4)
    with pytest.raises(InputError, match="larger than num_beams=1"):
        generator.generate(pv, num_return_sequences=2)
    max_positions = generator.manifest.max_positions
    assert generator.generate(pv, max_new_tokens=max_positions - 1).shape[1] <= max_positions
    with pytest.raises(InputError, match=f"decoder has {max_positions}"):
        generator.generate(pv, max_new_tokens=max_positions)
    with pytest.raises(InputError, match="early_stopping"):
        generator.generate(pv, num_beams=2, early_stopping="sometimes")


def _break(export_dir: Path, tmp_path: Path, how: str) -> Path:
    broken = tmp_path / how
    shutil.copytree(export_dir, broken)
    if how == "no-manifest":
        (broken / "vedrt.json").unlink()
    elif how == "bad-json":
        (broken / "vedrt.json").write_text("{ nope")
    elif how == "wrong-structure":
        (broken / "vedrt.json").write_text(json.dumps({"format_version": 1, "graphs": []}))
    elif how == "missing-field":
        data = json.loads((broken / "vedrt.json").read_text())
        del data["decoder"]["num_heads"]
        (broken / "vedrt.json").write_text(json.dumps(data))
    elif how == "no-decoder":
        (broken / "decoder.onnx").unlink()
    elif how == "corrupt-decoder":
        (broken / "decoder.onnx").write_bytes(b"\x00garbage" * 100)
    elif how == "no-lean-decoder":
        (broken / "decoder_no_attentions.onnx").unlink()
    elif how == "corrupt-lean-decoder":
        (broken / "decoder_no_attentions.onnx").write_bytes(b"\x00garbage" * 100)
    elif how == "truncated-encoder":
        data = (broken / "encoder.onnx").read_bytes()
        (broken / "encoder.onnx").write_bytes(data[: len(data) // 3])
    elif how == "future-version":
        data = json.loads((broken / "vedrt.json").read_text())
        data["format_version"] = 99
        (broken / "vedrt.json").write_text(json.dumps(data))
    return broken


BROKEN = [
    "no-manifest",
    "bad-json",
    "wrong-structure",
    "missing-field",
    "no-decoder",
    "corrupt-decoder",
    "no-lean-decoder",
    "corrupt-lean-decoder",
    "truncated-encoder",
    "future-version",
]


@runtime
@pytest.mark.parametrize("how", BROKEN)
def test_broken_export_dirs(export_dir, tmp_path, how):
    broken = _break(export_dir, tmp_path, how)
    with pytest.raises(InputError) as info:
        load(broken)
    assert "\n" not in str(info.value)


@runtime
def test_an_export_without_the_lean_step_graph_still_runs(export_dir, tmp_path, generator):
    """Exports from before 2026-12-06 have only decoder.onnx: it is stepped, attentions and all."""
    old = tmp_path / "old"
    shutil.copytree(export_dir, old)
    (old / "decoder_no_attentions.onnx").unlink()
    data = json.loads((old / "vedrt.json").read_text())
    del data["graphs"]["decoder"]["file_without_attentions"]
    (old / "vedrt.json").write_text(json.dumps(data))
    gen = load(old, threads=1)
    pv = generator.preprocess(sorted((ROOT / "examples").glob("*.png"))[:2])
    options = {"num_beams": 3, "return_dict": True, "output_attentions": True}
    ours, theirs = gen.generate(pv, **options), generator.generate(pv, **options)
    np.testing.assert_array_equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.cross_attentions, theirs.cross_attentions, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


@runtime
def test_missing_export_dir(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load(tmp_path / "nowhere")
    with pytest.raises(InputError, match="backend"):
        load(tmp_path, backend="tensorflow")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vedrt.cli", "caption", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@runtime
def test_cli_captions_and_reports_bad_images(export_dir, image_files):
    f = image_files
    result = run_cli(
        f["a.png"],
        f["bad.png"],
        f["b.jpg"],
        f["cut.png"],
        "--model",
        export_dir,
        "--max-new-tokens",
        "4",
    )
    assert result.returncode == 1  # issue #9: 1 when an image failed, 2 for usage errors
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(f["a.png"]), str(f["b.jpg"])]
    errors = result.stderr.splitlines()
    assert any(str(f["bad.png"]) in e for e in errors) and any(
        str(f["cut.png"]) in e for e in errors
    )
    assert "Traceback" not in result.stderr


@runtime
def test_cli_json_beams_threads(export_dir, image_files):
    result = run_cli(
        image_files["a.png"],
        "--model",
        export_dir,
        "--json",
        "--num-beams",
        "3",
        "--threads",
        "1",
        "--max-new-tokens",
        "4",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["image"] == str(image_files["a.png"]) and isinstance(record["caption"], str)


@runtime
@pytest.mark.parametrize("beams", ["1", "3"])
def test_cli_explain_writes_attention_maps(export_dir, image_files, tmp_path, beams):
    out = tmp_path / "map.png"
    f = image_files
    result = run_cli(
        f["a.png"],
        f["b.jpg"],
        "--model",
        export_dir,
        "--explain",
        out,
        "--num-beams",
        beams,
        "--max-new-tokens",
        "4",
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    for path in (out, tmp_path / "map-2.png"):
        assert Image.open(path).size[0] > 0


@runtime
@pytest.mark.parametrize(
    "args,words",
    [
        (["--model", "/nonexistent/export"], "not found"),
        (["--max-new-tokens", "0"], "must be >= 1"),
        (["--max-new-tokens", "500"], "positions"),
    ],
)
def test_cli_usage_errors(export_dir, image_files, args, words, capsys):
    if "--model" not in args:
        args = [*args, "--model", str(export_dir)]
    assert main(["caption", str(image_files["a.png"]), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


@runtime
def test_cli_without_model_or_images(monkeypatch, tmp_path, capsys, image_files):
    import vedrt.runtime.cli as caption_cli

    monkeypatch.setattr(caption_cli, "DEFAULT_MODEL", tmp_path / "scenes")
    assert main(["caption", str(image_files["a.png"])]) == 2
    assert "default scene model is not installed" in capsys.readouterr().err
    assert main(["caption"]) == 2
    assert "no images" in capsys.readouterr().err


def test_cli_export_without_tokenizer(exported, image_files, capsys):
    _, out = exported("vit", "gpt2")
    if (out / "tokenizer.json").exists():
        pytest.skip("the shared export has a tokenizer")
    assert main(["caption", str(image_files["a.png"]), "--model", str(out)]) == 2
    assert "tokenizer" in capsys.readouterr().err


@runtime
def test_no_torch_or_transformers_imported(export_dir, image_files):
    code = (
        "import sys\n"
        "import vedrt.runtime\n"
        "from vedrt.cli import main\n"
        f"rc = main(['caption', {str(image_files['a.png'])!r}, '--model', {str(export_dir)!r}, '--max-new-tokens', '3'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules)\n"
        "print('HEAVY', heavy, 'RC', rc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert "HEAVY [] RC 0" in result.stdout, result.stdout + result.stderr


@runtime
def test_engine_api_edges(generator):
    """What a Future-style handle and an engine promise beyond the common path."""
    good = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    solo = generator.generate(good, num_beams=2)
    engine = generator.engine(max_rows=np.int64(4))  # numpy integers are integers
    buffer = good.copy()
    handle = engine.submit(buffer, num_beams=2)
    buffer[:] = 0  # the caller reuses its buffer before the request runs: it was read later
    while not handle.done():
        engine.step()
    np.testing.assert_array_equal(handle.result(0), solo)
    assert not handle.cancelled() and not handle.running()
    handle.add_done_callback(lambda h: 1 / 0)  # logged, not raised into the caller
    engine.stop()
    with pytest.raises(RuntimeError, match="make a new one"):
        engine.start()


@runtime
def test_a_cache_too_big_for_memory_names_the_options(generator, monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 59.1 GiB")

    monkeypatch.setattr(generator.executor, "new_pool", no_memory)
    with pytest.raises(InputError, match="does not fit in memory: ask for fewer beams"):
        generator.generate(np.zeros((1, 3, SIZE, SIZE), np.float32), num_beams=6)


@runtime
def test_one_string_is_one_text():
    """A string given to generate_text was split into characters ("text 1: empty")."""
    gen = load(ROOT / "vedrt" / "models" / "text")
    text = "a large green triangle to the left of a small yellow circle"
    assert gen.generate_text(text, num_beams=2) == gen.generate_text([text], num_beams=2)


@runtime
def test_a_request_that_overflows_inside_the_model_fails_alone(export_dir):
    """Finite pixel values can still overflow to NaN inside the model (3e38 is a float32): that
    request fails with one line, and the NaN it wrote to the cache rows and image slots no longer
    reaches the requests beside it, after it, or the next generate()."""
    gen = load(export_dir)
    rng = np.random.default_rng(1)
    good = rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    huge = np.full((1, 3, SIZE, SIZE), 3e38, np.float32)
    solo = [gen.generate(good[i : i + 1], num_beams=2) for i in range(2)]
    engine = gen.engine(max_rows=6)
    first = engine.submit(good[:1], num_beams=2)
    bad = engine.submit(huge, num_beams=2)  # the same options: one search with `first`
    for _ in range(200):
        engine.step()
        if first.done() and bad.done():
            break
    with pytest.raises(InputError, match="NaN or infinite"):
        bad.result(0)
    np.testing.assert_array_equal(first.result(0), solo[0])
    after = engine.submit(good[1:], num_beams=2)  # takes the rows and slot the bad one left
    while not after.done():
        engine.step()
    np.testing.assert_array_equal(after.result(0), solo[1])
    with pytest.raises(InputError, match="NaN or infinite"):
        gen.generate(huge, num_beams=2)
    np.testing.assert_array_equal(gen.generate(good[1:], num_beams=2), solo[1])  # spare engine
