"""The GPU code paths on a real device: torch executor (eager and CUDA graphs, fp32 and fp16),
ONNX Runtime CUDA with IO binding, TensorRT engines. All marked `gpu`: they skip cleanly where
torch sees no CUDA device (conftest.py), and each backend's extra package is importorskip'd.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import tiny_model  # noqa: E402

from vedrt.runtime import load  # noqa: E402

pytestmark = pytest.mark.gpu

SETTINGS = [
    {"max_new_tokens": 8},
    {"num_beams": 4, "max_new_tokens": 10},
    {"num_beams": 4, "num_return_sequences": 2, "length_penalty": 0.5, "max_new_tokens": 9},
    {"num_beams": 3, "early_stopping": True, "max_new_tokens": 9},
]


def pixel_values(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, 3, 32, 32).astype(np.float32)


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    """A tiny ViT-GPT2 with weights scaled so tokens vary, its export and an EOS it emits."""
    from vedrt.export import export_model

    model = tiny_model("vit", "gpt2", seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10.0)
    out = tmp_path_factory.mktemp("gpu-cuda") / "export"
    export_model(model, out, validate=False)
    pv = pixel_values()
    eos = int(load(out).generate(pv, max_new_tokens=4)[0, 2])
    return model, out, pv, eos


def hf_cuda(model, pv, **kwargs) -> np.ndarray:
    model = model.to("cuda")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(pixel_values=torch.from_numpy(pv).cuda(), **kwargs)
        return out.cpu().numpy()
    finally:
        model.to("cpu")


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_torch_cuda_matches_generate_on_cuda(spread, setting, graphs):
    model, out, pv, eos = spread
    gen = load(out, backend="torch", device="cuda", checkpoint=model, cuda_graphs=graphs)
    kwargs = {**setting, "eos_token_id": eos}
    np.testing.assert_array_equal(gen.generate(pv, **kwargs), hf_cuda(model, pv, **kwargs))


def test_cuda_graphs_replay_exactly_what_eager_computes(spread):
    model, out, pv, eos = spread
    kwargs = {"num_beams": 4, "max_new_tokens": 10, "eos_token_id": eos, "return_dict": True}
    eager = load(out, backend="torch", device="cuda", checkpoint=model, cuda_graphs=False)
    graphs = load(out, backend="torch", device="cuda", checkpoint=model, cuda_graphs=True)
    a, b = eager.generate(pv, **kwargs), graphs.generate(pv, **kwargs)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    np.testing.assert_array_equal(a.sequences_scores, b.sequences_scores)
    again = graphs.generate(pv, **kwargs)  # buffers and graphs reused: same again
    np.testing.assert_array_equal(again.sequences, b.sequences)


def test_fp16_stays_close_to_fp32(exported):
    from vedrt.gpu.compare import compare

    model, out = exported("vit", "gpt2")
    fp16 = load(out, backend="torch", device="cuda", checkpoint=model, precision="fp16")
    result = compare(load(out), fp16, pixel_values(4), num_beams=4, max_new_tokens=8)
    assert result.max_logit_error < 0.05, result.summary()
    assert result.token_agreement >= 0.75, result.summary()


def test_onnxruntime_cuda_matches_the_cpu_runtime(spread):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider")
    _, out, pv, eos = spread
    gen = load(out, backend="onnxruntime", device="cuda")
    assert type(gen).__name__ == "Generator"
    for setting in SETTINGS:
        kwargs = {**setting, "eos_token_id": eos}
        np.testing.assert_array_equal(gen.generate(pv, **kwargs), load(out).generate(pv, **kwargs))


@pytest.fixture(scope="module")
def trt_export(spread, tmp_path_factory):
    pytest.importorskip("tensorrt")
    import shutil

    _, out, pv, eos = spread
    copy = tmp_path_factory.mktemp("trt") / "export"
    shutil.copytree(out, copy)
    return copy, pv, eos


def test_tensorrt_fp32_engines_match_the_cpu_runtime(trt_export):
    from vedrt.manifest import read_manifest
    from vedrt.tensorrt.build import build_engines
    from vedrt.tensorrt.profiles import Limits

    out, pv, eos = trt_export
    raw = read_manifest(out).raw
    limits = Limits(max_batch=4, max_beams=4, max_new_tokens=16)
    report = build_engines(out, raw, limits, fp16=False)
    assert not report.reused and (out / "tensorrt.timing_cache").is_file()
    assert build_engines(out, raw, limits, fp16=False).reused == ["encoder", "cross_kv", "decoder"]
    gen = load(out, backend="tensorrt", device="cuda")
    for setting in SETTINGS:
        kwargs = {**setting, "eos_token_id": eos}
        np.testing.assert_array_equal(gen.generate(pv, **kwargs), load(out).generate(pv, **kwargs))
    from vedrt.runtime import InputError

    with pytest.raises(InputError, match="limits"):
        gen.generate(pv, num_beams=8, max_new_tokens=4)


def test_vedrt_build_fp16_builds_and_checks(trt_export, capsys):
    import json

    from vedrt.cli import main

    out, pv, eos = trt_export
    args = ["build", str(out), "--fp16", "--max-batch", "2", "--max-new-tokens", "12"]
    assert main([*args, "--check-images", "4"]) == 0
    printed = capsys.readouterr().out
    assert "check vs fp32 graphs" in printed
    index = json.loads((out / "tensorrt.json").read_text())
    assert set(index["engines"]["fp16"]) == {"encoder", "cross_kv", "decoder"}
    assert index["check"]["fp16"]["rows"] == 4
    gen = load(out, backend="tensorrt", device="cuda", precision="fp16")
    assert gen.generate(pv[:2], num_beams=4, max_new_tokens=12).shape[0] == 2
