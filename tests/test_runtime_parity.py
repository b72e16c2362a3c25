"""The runtime's tokens are transformers' `generate()` tokens, for every family and many options.

Two kinds of models: the shared tiny models (every encoder x decoder row, a few settings each),
and two "spread" models whose weights are scaled up so that captions differ between images and
tokens within a caption (the shared tiny models tend to repeat one token), which run the full set
of settings. EOS ids are picked from each model's own greedy output, so sequences end at
different steps.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import DECODERS, ENCODERS, tiny_model  # noqa: E402

from vedrt.runtime import load  # noqa: E402

transformers.logging.set_verbosity_error()
BATCH = 3


def pixel_values(n: int = BATCH, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, 3, size, size).astype(np.float32)


def hf_generate(model, pv: np.ndarray, **kwargs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(pixel_values=torch.from_numpy(pv), **kwargs)


def assert_parity(model, generator, pv: np.ndarray, **kwargs) -> None:
    """Same sequences (shape and values); beam search: same sequences_scores within 1e-4."""
    beams = kwargs.get("num_beams", 1) > 1
    ref = hf_generate(
        model,
        pv,
        **kwargs,
        **({"output_scores": True, "return_dict_in_generate": True} if beams else {}),
    )
    ours = generator.generate(pv, **kwargs, return_dict=True)
    ref_seqs = (ref.sequences if beams else ref).numpy()
    assert ours.sequences.dtype == np.int64
    assert ours.sequences.shape == ref_seqs.shape, (kwargs, ours.sequences, ref_seqs)
    np.testing.assert_array_equal(ours.sequences, ref_seqs, err_msg=str(kwargs))
    if beams:
        np.testing.assert_allclose(
            ours.sequences_scores, ref.sequences_scores.numpy(), rtol=1e-5, atol=1e-4
        )


def eos_ids(model, pv: np.ndarray) -> tuple[int, int]:
    """Two tokens the model really emits, early in some rows: EOS candidates that end rows at different steps."""
    greedy = hf_generate(model, pv, max_new_tokens=8).numpy()
    first = int(greedy[0, 2])
    later = [int(t) for t in greedy[:, 3:].ravel() if t != first]
    return first, (later[0] if later else (first + 1) % 96)


def spread_model(encoder: str, decoder: str):
    model = tiny_model(encoder, decoder, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10.0)
    return model


@pytest.fixture(
    scope="module", params=[("vit", "gpt2"), ("deit", "trocr")], ids=lambda p: "-".join(p)
)
def spread(request, tmp_path_factory):
    from vedrt.export import export_model

    model = spread_model(*request.param)
    out = tmp_path_factory.mktemp("spread") / "export"
    export_model(model, out, validate=False)  # validation is the exporter tests' job
    pv = pixel_values(4)
    return model, load(out), pv, eos_ids(model, pv)


FULL_SETTINGS = [
    {},
    {"max_new_tokens": 8},
    {"max_length": 10},
    {"num_beams": 2},
    {"num_beams": 3, "num_return_sequences": 3},
    {"num_beams": 4, "length_penalty": 0.0},
    {"num_beams": 5, "length_penalty": 2.0, "early_stopping": True},
    {"num_beams": 3, "early_stopping": "never", "length_penalty": -1.0},
    {"num_beams": 3, "early_stopping": "never", "length_penalty": 1.5},
    {"num_beams": 4, "early_stopping": False},
    {"no_repeat_ngram_size": 2},
    {"num_beams": 3, "no_repeat_ngram_size": 3},
    {"num_beams": 3, "min_length": 8},
    {"min_new_tokens": 5},
    {"repetition_penalty": 1.5},
    {"num_beams": 3, "repetition_penalty": 1.3},
    {"bad_words_ids": "EOS_AND_PAIR"},
    {"eos_token_id": "EOS"},
    {"eos_token_id": "EOS", "min_new_tokens": 4},
    {"num_beams": 3, "eos_token_id": "EOS_LIST"},
    {"num_beams": 2, "eos_token_id": "EOS", "pad_token_id": 5},
    {"num_beams": 3, "eos_token_id": "EOS", "early_stopping": True},
    {"num_beams": 3, "eos_token_id": "EOS", "early_stopping": "never"},
    {"num_beams": 4, "eos_token_id": "EOS2", "num_return_sequences": 2, "length_penalty": 0.5},
    {"num_beams": 3, "eos_token_id": "EOS", "min_new_tokens": 3, "no_repeat_ngram_size": 2},
    {"forced_eos_token_id": "EOS", "max_new_tokens": 6},
    {"num_beams": 2, "forced_bos_token_id": 5, "forced_eos_token_id": "EOS2", "max_new_tokens": 7},
    {"decoder_start_token_id": 7, "max_new_tokens": 6},
]


def _fill(setting: dict, eos: tuple[int, int]) -> dict:
    values = {
        "EOS": eos[0],
        "EOS2": eos[1],
        "EOS_LIST": [eos[0], eos[1]],
        "EOS_AND_PAIR": [[eos[0]], [eos[1], eos[0]]],
    }
    return {
        k: values.get(v, v) if isinstance(v, str) and v in values else v for k, v in setting.items()
    }


@pytest.mark.parametrize(
    "setting", FULL_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "greedy"
)
def test_spread_models_all_settings(spread, setting):
    model, generator, pv, eos = spread
    assert_parity(model, generator, pv, **_fill(setting, eos))


def test_eos_ends_rows_at_different_steps(spread):
    """The EOS choice really exercises padding: rows finish at different lengths."""
    model, generator, pv, eos = spread
    out = generator.generate(pv, eos_token_id=eos[0], pad_token_id=0)
    ends = {int(np.argmax(row == eos[0])) if eos[0] in row[1:] else len(row) for row in out}
    assert len(ends) > 1, out


MATRIX_SETTINGS = [
    {"max_new_tokens": 10},
    {"num_beams": 3, "eos_token_id": "EOS", "max_new_tokens": 10},
    {
        "num_beams": 2,
        "num_return_sequences": 2,
        "length_penalty": 0.5,
        "eos_token_id": "EOS2",
        "max_new_tokens": 8,
    },
]


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_family(exported, encoder, decoder):
    model, out = exported(encoder, decoder)
    generator = load(out)
    pv = pixel_values()
    eos = eos_ids(model, pv)
    for setting in MATRIX_SETTINGS:
        assert_parity(model, generator, pv, **_fill(setting, eos))


def test_scores_and_cross_attentions_match(spread):
    """output_scores / output_attentions: transformers' per-step layout and values."""
    model, generator, pv, eos = spread
    model = copy.deepcopy(model)  # the fixture is shared by the module: leave it as it was
    model.set_attn_implementation("eager")  # sdpa returns no attention probabilities
    for kwargs in (
        {"max_new_tokens": 6},
        {"max_new_tokens": 6, "num_beams": 3, "eos_token_id": eos[0]},
    ):
        ref = hf_generate(
            model,
            pv,
            output_scores=True,
            output_attentions=True,
            return_dict_in_generate=True,
            **kwargs,
        )
        ours = generator.generate(
            pv, return_dict=True, output_scores=True, output_attentions=True, **kwargs
        )
        assert len(ours.scores) == len(ref.scores)
        for a, b in zip(ours.scores, ref.scores, strict=True):
            np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4)
        assert len(ours.cross_attentions) == len(ref.cross_attentions)
        for step_ours, step_ref in zip(ours.cross_attentions, ref.cross_attentions, strict=True):
            assert isinstance(step_ours, list) and len(step_ours) == len(step_ref)
            for a, b in zip(step_ours, step_ref, strict=True):
                assert a.shape == tuple(b.shape)
                np.testing.assert_allclose(a, b.numpy(), atol=1e-4)


def test_sampling_is_seeded_and_top_k_1_is_greedy(spread):
    model, generator, pv, _ = spread
    a = generator.generate(pv, do_sample=True, seed=7, max_new_tokens=10)
    b = generator.generate(pv, do_sample=True, seed=7, max_new_tokens=10)
    np.testing.assert_array_equal(a, b)
    others = [
        generator.generate(pv, do_sample=True, seed=s, max_new_tokens=10, temperature=2.0)
        for s in range(4)
    ]
    assert any(not np.array_equal(others[0], o) for o in others[1:])
    greedy = generator.generate(pv, max_new_tokens=10)
    for seed in range(3):
        np.testing.assert_array_equal(
            generator.generate(pv, do_sample=True, top_k=1, seed=seed, max_new_tokens=10), greedy
        )


def next_token_log_probs(model, pv: np.ndarray, sequences: np.ndarray) -> np.ndarray:
    """log p(token | image, prefix) from transformers for every prefix of every row (float64).

    Row r of `sequences` belongs to image r // (rows per image). Entry [r, t] is the distribution
    of the token at position t + 1, computed independently of the runtime.
    """
    per_image = len(sequences) // len(pv)
    images = torch.from_numpy(np.repeat(pv, per_image, axis=0))
    ids = torch.from_numpy(sequences)
    with torch.no_grad():
        logits = model(pixel_values=images, decoder_input_ids=ids).logits.double()
    return torch.log_softmax(logits, dim=-1).numpy()


def generated_steps(sequences: np.ndarray, eos: int = 2):
    """(row, t) of each generated token up to and including the row's first EOS."""
    for row, seq in enumerate(sequences):
        for t in range(1, seq.shape[0]):
            yield row, t
            if seq[t] == eos:
                break


def test_top_p_samples_only_from_the_nucleus(spread):
    """Nucleus sampling: a tiny top_p is greedy; a seed repeats; each token lies in the nucleus."""
    model, generator, pv, _ = spread
    greedy = generator.generate(pv, max_new_tokens=10)
    np.testing.assert_array_equal(
        generator.generate(pv, do_sample=True, top_p=1e-6, top_k=0, seed=1, max_new_tokens=10),
        greedy,
    )
    top_p = 0.6
    runs = []
    for seed in range(4):
        options = dict(do_sample=True, top_p=top_p, top_k=0, num_return_sequences=2, seed=seed)
        out = generator.generate(pv, max_new_tokens=10, **options)
        np.testing.assert_array_equal(out, generator.generate(pv, max_new_tokens=10, **options))
        assert out.shape[0] == 2 * len(pv)
        runs.append(out)
    assert any(not np.array_equal(runs[0], r) for r in runs[1:]), "seeds gave one sample"
    excluded = 0  # steps where the nucleus left out tokens worth >= 1% of the mass
    for out in runs:
        log_probs = next_token_log_probs(model, pv, out)
        for row, t in generated_steps(out):
            probs = np.exp(log_probs[row, t - 1])
            token = out[row, t]
            mass_above = probs[probs > probs[token]].sum()
            assert mass_above < top_p + 1e-4, (row, t, token, mass_above)
            order = np.sort(probs)[::-1]
            nucleus = int(np.searchsorted(np.cumsum(order), top_p)) + 1
            excluded += order[nucleus:].sum() >= 0.01
    assert excluded > 10, "the nucleus never cut anything: the test would not catch a bug"


def test_beam_sampling_keeps_to_top_k_and_cools_to_beam_search(spread):
    """Beam sampling: a seed repeats; every token is among its parent's top-k; near-zero
    temperature makes the sampled candidates the best ones, i.e. plain beam search."""
    model, generator, pv, _ = spread
    top_k = 3
    options = dict(do_sample=True, num_beams=3, num_return_sequences=3, top_k=top_k)
    runs = []
    for seed in range(3):
        out = generator.generate(pv, seed=seed, max_new_tokens=8, **options)
        np.testing.assert_array_equal(
            out, generator.generate(pv, seed=seed, max_new_tokens=8, **options)
        )
        assert out.shape[0] == 3 * len(pv)
        log_probs = next_token_log_probs(model, pv, out)
        for row, t in generated_steps(out):
            scores = log_probs[row, t - 1]
            kth = np.sort(scores)[::-1][top_k - 1]
            assert scores[out[row, t]] >= kth - 1e-4, (seed, row, t)
        runs.append(out)
    assert any(not np.array_equal(runs[0], r) for r in runs[1:]), "seeds gave one sample"
    beam = generator.generate(pv, num_beams=3, max_new_tokens=8)
    for seed in range(3):
        cold = generator.generate(
            pv, do_sample=True, num_beams=3, temperature=1e-3, seed=seed, max_new_tokens=8
        )
        np.testing.assert_array_equal(cold, beam)


def test_forbidding_processors_rank_the_graphs_top_k(spread, monkeypatch):
    """A minimum length, n-gram and bad-word bans are read off each row's top-K from the graph
    (no vocabulary-wide log-softmax on the host); when a row keeps too few allowed candidates
    the step takes the whole vocabulary's scores. Tokens and scores stay transformers' both ways."""
    from vedrt.runtime import processors

    model, generator, pv, eos = spread
    taken = []

    def spy(*args):
        out = real(*args)
        taken.append(out is not None)
        return out

    real = processors.forbid_in_top
    monkeypatch.setattr(processors, "forbid_in_top", spy)
    common = {"eos_token_id": eos[0], "max_new_tokens": 9}
    assert_parity(model, generator, pv, num_beams=3, min_new_tokens=5, **common)
    assert_parity(model, generator, pv, no_repeat_ngram_size=2, min_new_tokens=4, **common)
    assert taken and all(taken), taken
    taken.clear()
    vocab = model.config.decoder.vocab_size
    allowed = {eos[0], eos[1], 3, 4}  # fewer than the 6 candidates beam 3 ranks
    banned = [[t] for t in range(vocab) if t not in allowed]
    assert_parity(model, generator, pv, num_beams=3, bad_words_ids=banned, **common)
    assert taken and not any(taken), taken


@pytest.mark.parametrize("setting", [{"max_new_tokens": 3}, {"num_beams": 2, "max_length": 5}])
def test_a_checkpoint_minimum_above_the_limit_generates_as_transformers(spread, setting):
    """The checkpoint's min_length above the call's limit: transformers warns and generates with
    EOS forbidden to the end; so must vedrt (it refused the call before). The fixture's model
    and generator are left as they are: copies carry the checkpoint's minimum."""
    import copy

    from vedrt.runtime.generator import Generator

    model, generator, pv, (eos, _) = spread
    config = copy.deepcopy(model.generation_config)
    config.min_length = 10
    ref = hf_generate(model, pv, generation_config=config, eos_token_id=eos, **setting)
    ours = Generator(generator.manifest, generator.executor)
    ours.generation_config = {**generator.generation_config, "min_length": 10}
    with pytest.warns(UserWarning, match="min_length=10"):
        sequences = ours.generate(pv, eos_token_id=eos, **setting)
    np.testing.assert_array_equal(sequences, ref.numpy(), err_msg=str(setting))
