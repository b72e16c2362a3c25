"""`vedrt build` where TensorRT or a GPU is missing, and the engine profile/cache-key logic
(pure Python, so tested everywhere). Building and running engines is in test_gpu_cuda.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from vedrt.cli import main
from vedrt.tensorrt.profiles import Limits, engine_file, engine_key, profile_shapes

HAS_TRT_AND_GPU = importlib.util.find_spec("tensorrt") is not None and (
    importlib.util.find_spec("torch") is not None and __import__("torch").cuda.is_available()
)


@pytest.mark.skipif(HAS_TRT_AND_GPU, reason="TensorRT and a GPU are present")
def test_build_without_tensorrt_is_one_line_exit_2(exported):
    _, out = exported("vit", "gpt2")
    proc = subprocess.run(
        # as the `vedrt` console script runs it (`python -m vedrt.cli` would make vedrt.cli
        # `__main__`, a second copy of UsageError that main() does not catch)
        [sys.executable, "-c", "import sys; from vedrt.cli import main; sys.exit(main())"]
        + ["build", str(out), "--fp16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vedrt build: error: ")
    assert "TensorRT" in lines[0] or "GPU" in lines[0]
    assert proc.stdout == ""
    assert not list(out.glob("*.engine"))


def test_build_rejects_bad_input_first(tmp_path, capsys, exported):
    assert main(["build", str(tmp_path / "missing")]) == 2
    assert "vedrt build: error:" in capsys.readouterr().err
    _, out = exported("vit", "gpt2")
    assert main(["build", str(out), "--max-beams", "0"]) == 2
    assert "--max-beams must be >= 1" in capsys.readouterr().err
    assert main(["build", str(out), "--max-new-tokens", "500"]) == 2
    assert "positions" in capsys.readouterr().err


def test_profiles_span_batch_beams_and_cache(exported):
    _, out = exported("vit", "gpt2")
    import json

    manifest = json.loads((out / "vedrt.json").read_text())
    limits = Limits(max_batch=2, max_beams=4, max_new_tokens=16)
    dec = profile_shapes(manifest["graphs"]["decoder"]["inputs"], limits)
    assert dec["past_lengths"] == ((1,), (4,), (8,))  # one position per row
    assert "group_slots" not in dec and dec["encoder_mask"][2][0] == 8  # one mask a group
    assert dec["input_ids"] == ((1, 1), (4, 1), (8, 1))
    lo, opt, hi = dec["self_key.0"]
    assert (lo[0], opt[0], hi[0]) == (1, 4, 8)  # batch x beams
    assert (lo[2], opt[2], hi[2]) == (1, 16, 16)  # cache length
    assert (
        dec["cross_key.0"][0][0] == 1 and dec["cross_key.0"][2][0] == 8
    )  # a group per row at most
    enc = profile_shapes(manifest["graphs"]["encoder"]["inputs"], limits)
    assert enc["pixel_values"] == ((1, 3, 32, 32), (1, 3, 32, 32), (2, 3, 32, 32))


def test_engine_key_changes_with_everything_that_matters():
    shapes = {"x": [[1], [4], [8]]}
    base = engine_key("H100 sm_90", "10.3.0", "fp16", "abc", shapes)
    assert base == engine_key("H100 sm_90", "10.3.0", "fp16", "abc", shapes)
    others = [
        engine_key("A100 sm_80", "10.3.0", "fp16", "abc", shapes),
        engine_key("H100 sm_90", "10.4.0", "fp16", "abc", shapes),
        engine_key("H100 sm_90", "10.3.0", "fp32", "abc", shapes),
        engine_key("H100 sm_90", "10.3.0", "fp16", "abd", shapes),
        engine_key("H100 sm_90", "10.3.0", "fp16", "abc", {"x": [[1], [4], [16]]}),
    ]
    assert base not in others and len(set(others)) == len(others)
    assert engine_file("decoder", "fp16", base) == f"decoder.fp16.{base}.engine"
