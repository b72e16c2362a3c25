"""The search and engine on torch ops (vedrt.gpu.ops) with the torch executor, on the CPU:
token-for-token transformers `generate()`, for greedy and beam search with every option.

These need no GPU: the search is the runtime's own code over torch tensors on any device, and the
torch executor runs the exporter's own modules. What only a GPU can show (CUDA graphs, fp16, TensorRT, ORT CUDA) is in
test_gpu_cuda.py.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import tiny_model  # noqa: E402

from vedrt.runtime import InputError, load  # noqa: E402

transformers.logging.set_verbosity_error()


def pixel_values(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, 3, 32, 32).astype(np.float32)


def hf_generate(model, pv: np.ndarray, **kwargs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(
            pixel_values=torch.from_numpy(pv),
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )


def spread_model(encoder: str, decoder: str):
    """Weights scaled up so captions differ between images and tokens within one."""
    model = tiny_model(encoder, decoder, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10.0)
    return model


@pytest.fixture(scope="module", params=[("vit", "gpt2"), ("deit", "trocr")], ids="-".join)
def spread(request, tmp_path_factory):
    from vedrt.export import export_model

    model = spread_model(*request.param)
    out = tmp_path_factory.mktemp("gpu-spread") / "export"
    export_model(model, out, validate=False)
    pv = pixel_values(4)
    greedy = hf_generate(model, pv, max_new_tokens=8).sequences.numpy()
    first = int(greedy[0, 2])
    later = [int(t) for t in greedy[:, 3:].ravel() if t != first]
    eos = (first, later[0] if later else (first + 1) % 96)
    generator = load(out, backend="torch", device="cpu", checkpoint=model)
    return model, generator, pv, eos, out


SETTINGS = [
    {"max_new_tokens": 8},
    {"max_new_tokens": 9, "eos_token_id": "EOS"},
    {"num_beams": 4, "max_new_tokens": 8},
    {"num_beams": 4, "eos_token_id": "EOS", "max_new_tokens": 10},
    {"num_beams": 4, "eos_token_id": "EOS2", "num_return_sequences": 3, "length_penalty": 0.5},
    {"num_beams": 3, "eos_token_id": "EOS", "early_stopping": True, "length_penalty": 2.0},
    {"num_beams": 3, "eos_token_id": "EOS", "early_stopping": "never", "max_new_tokens": 9},
    {"num_beams": 4, "eos_token_id": ["EOS", "EOS2"], "length_penalty": -1.0, "max_new_tokens": 9},
    {"num_beams": 3, "eos_token_id": "EOS", "min_new_tokens": 3, "no_repeat_ngram_size": 2},
    {
        "num_beams": 2,
        "repetition_penalty": 1.5,
        "bad_words_ids": [[7], [3, 4]],
        "max_new_tokens": 7,
    },
    {"eos_token_id": "EOS", "repetition_penalty": 1.3, "no_repeat_ngram_size": 2},
    {"num_beams": 2, "forced_bos_token_id": 5, "forced_eos_token_id": "EOS2", "max_new_tokens": 7},
]


def resolve(kwargs: dict, eos: tuple[int, int]) -> dict:
    names = {"EOS": eos[0], "EOS2": eos[1]}

    def sub(v):
        if isinstance(v, list):
            return [sub(x) for x in v]
        return names.get(v, v) if isinstance(v, str) else v

    return {k: sub(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_device_loop_matches_generate(spread, setting):
    model, generator, pv, eos, _ = spread
    kwargs = resolve(setting, eos)
    ref = hf_generate(model, pv, **kwargs)
    ours = generator.generate(pv, **kwargs, return_dict=True)
    np.testing.assert_array_equal(ours.sequences, ref.sequences.numpy(), err_msg=str(kwargs))
    if kwargs.get("num_beams", 1) > 1:
        np.testing.assert_allclose(
            ours.sequences_scores, ref.sequences_scores.numpy(), rtol=1e-5, atol=1e-4
        )
        np.testing.assert_array_equal(ours.beam_indices, ref.beam_indices.numpy())


def test_scores_and_attentions_match_the_cpu_runtime(spread):
    model, generator, pv, eos, out = spread
    kwargs = {"num_beams": 3, "eos_token_id": eos[0], "max_new_tokens": 6}
    ref = hf_generate(model, pv[:2], **kwargs)
    ours = generator.generate(
        pv[:2], **kwargs, return_dict=True, output_scores=True, output_attentions=True
    )
    assert len(ours.scores) == len(ref.scores)
    for a, b in zip(ours.scores, ref.scores, strict=True):
        finite = np.isfinite(b.numpy())
        np.testing.assert_allclose(a[finite], b.numpy()[finite], rtol=1e-4, atol=1e-4)
    cpu = load(out).generate(pv[:2], **kwargs, return_dict=True, output_attentions=True)
    assert len(ours.cross_attentions) == len(cpu.cross_attentions)
    for a, b in zip(ours.cross_attentions, cpu.cross_attentions, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-5)


def test_caption_paths_are_the_runtime_s(spread):
    """The GPU generator is the runtime's Generator: options and input checks are shared."""
    _, generator, pv, _, _ = spread
    with pytest.raises(InputError, match="pixel_values"):
        generator.generate(pv[:, :, :16])
    with pytest.raises(TypeError, match="unexpected keyword"):
        generator.generate(pv, num_beam=2)
    assert type(generator).__name__ == "Generator"  # one Generator class for every backend


def test_sampling_on_torch_ops_is_the_numpy_runtime_s(spread):
    """The Gumbel noise comes from numpy's generator on every backend: same seed, same samples
    (the logits differ by float noise only, far below the gaps between sampled scores)."""
    _, generator, pv, eos, out = spread
    cpu = load(out)
    for kwargs in (
        {"do_sample": True, "seed": 3, "top_k": 5, "max_new_tokens": 8},
        {"do_sample": True, "seed": 4, "num_beams": 3, "top_p": 0.9, "max_new_tokens": 8},
        {"do_sample": True, "seed": 5, "num_return_sequences": 2, "temperature": 0.7},
    ):
        ours = generator.generate(pv, eos_token_id=eos[0], **kwargs)
        np.testing.assert_array_equal(ours, cpu.generate(pv, eos_token_id=eos[0], **kwargs))


def test_pool_is_reused_and_cross_kv_is_per_image(spread):
    _, generator, pv, _, _ = spread
    encoded = generator.executor.encode(pv[:2])
    assert all(c.shape[0] == 2 for c in encoded.cross)  # never expanded to batch * beams
    engine = generator.engine(max_rows=8)
    first = engine.submit(pv[:2], num_beams=4, max_new_tokens=12)
    while not first.done():
        engine.step()
    pool = engine.pool
    assert isinstance(pool.cache, torch.Tensor) and pool.cross.shape[1] == 2  # slots, per image
    second = engine.submit(pv[2:4], num_beams=4, max_new_tokens=12)
    while not second.done():
        engine.step()
    assert engine.pool is pool and pool.version == 0  # no reallocation for the second request
    np.testing.assert_array_equal(
        second.result(), generator.generate(pv[2:4], num_beams=4, max_new_tokens=12)
    )


def test_checkpoint_from_directories(spread, tmp_path):
    model, _, pv, eos, out = spread
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    kwargs = {"num_beams": 3, "eos_token_id": eos[0], "max_new_tokens": 6}
    ref = hf_generate(model, pv, **kwargs).sequences.numpy()
    from_dir = load(out, backend="torch", device="cpu", checkpoint=str(ckpt))
    np.testing.assert_array_equal(from_dir.generate(pv, **kwargs), ref)
    export = tmp_path / "export"
    shutil.copytree(out, export)
    shutil.copy2(ckpt / "model.safetensors", export / "model.safetensors")
    in_export = load(export, backend="torch", device="cpu")  # weights beside the graphs
    np.testing.assert_array_equal(in_export.generate(pv, **kwargs), ref)


def test_load_errors(exported, tmp_path):
    model, out = exported("vit", "gpt2")
    with pytest.raises(InputError, match="checkpoint's weights"):
        load(out, backend="torch", device="cpu")
    with pytest.raises(InputError, match="does not match"):
        load(out, backend="torch", device="cpu", checkpoint=tiny_model("vit", "trocr"))
    # a decoder like the export's on another encoder, patch size or position table loaded and
    # generated other tokens (only the decoder's sizes were compared)
    others = [
        (tiny_model("swin", "gpt2"), "encoder.model_type: export 'vit', checkpoint 'swin'"),
        (tiny_model("vit", "gpt2", encoder_overrides={"patch_size": 4}), "encoder.patch_size"),
        (tiny_model("vit", "gpt2", decoder_overrides={"n_positions": 32}), "decoder.n_positions"),
    ]
    for other, words in others:
        with pytest.raises(InputError, match=words):
            load(out, backend="torch", device="cpu", checkpoint=other)
    with pytest.raises(InputError, match="not a directory"):
        load(out, backend="torch", device="cpu", checkpoint=str(tmp_path / "nothing"))
    with pytest.raises(InputError, match="precision"):
        load(out, backend="torch", device="cpu", checkpoint=model, precision="int4")
    with pytest.raises(InputError, match="cuda"):
        load(out, backend="tensorrt", device="cpu")
    with pytest.raises(InputError, match="unknown device"):
        load(out, backend="torch", device="tpu", checkpoint=model)
    with pytest.raises(TypeError, match="unexpected keyword"):
        load(out, precision="fp16")  # the CPU runtime takes no GPU options
    with pytest.raises(InputError, match="unknown backend"):
        load(out, backend="tensorflow")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            load(out, backend="torch", device="cuda", checkpoint=model)


def test_compare_reports_agreement_with_the_fp32_graphs(spread):
    from vedrt.gpu.compare import compare

    _, generator, pv, _, out = spread
    result = compare(load(out), generator, pv, num_beams=4, max_new_tokens=8)
    assert result.rows == len(pv)
    assert result.max_logit_error < 1e-3
    assert result.sequence_agreement == result.token_agreement == 1.0


def _held_bytes(modules) -> int:
    """Bytes of the distinct tensors (parameters and buffers) some modules hold."""
    storages = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("decoder", ["gpt2", "trocr"])
def test_the_torch_executor_holds_each_weight_once(decoder, tmp_path):
    """From a checkpoint directory (the executor's own model): a head tied to the embedding is
    the embedding's own matrix (no transposed copy, as the ONNX export keeps), and TrOCR's
    separate q/k/v are freed once fused, so the executor holds no more than the model did."""
    from vedrt.export import export_model

    model = spread_model("vit", decoder)
    model.save_pretrained(tmp_path / "checkpoint")
    export_model(model, tmp_path / "export", validate=False)
    generator = load(
        tmp_path / "export", backend="torch", device="cpu", checkpoint=tmp_path / "checkpoint"
    )
    executor = generator.executor
    held = _held_bytes([executor.encoder, executor.text_encoder, executor.cross_kv, executor.step])
    assert held <= _held_bytes([model])
    pv = pixel_values(2)
    ours = generator.generate(pv, num_beams=3, max_new_tokens=6)
    np.testing.assert_array_equal(
        ours, hf_generate(model, pv, num_beams=3, max_new_tokens=6).sequences.numpy()
    )


def test_torch_backend_on_an_int8_export_says_it_runs_the_checkpoint(exported, tmp_path):
    model, out = exported("vit", "gpt2")
    copy = tmp_path / "int8"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "vedrt.json").read_text())
    (copy / "vedrt.json").write_text(json.dumps({**manifest, "precision": "int8"}))
    with pytest.warns(UserWarning, match="int8 export; backend='torch' runs the checkpoint"):
        load(copy, backend="torch", device="cpu", checkpoint=model)
