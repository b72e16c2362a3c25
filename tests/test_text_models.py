"""Text EncoderDecoderModel (bert2bert, roberta2roberta, bert2gpt2, ...): exported and generated
token for token as transformers' `generate(input_ids=..., attention_mask=...)`, over padded
batches whose texts differ in length, greedy and beam search."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import decoder_config  # noqa: E402

from vedrt.runtime import InputError, load  # noqa: E402

transformers.logging.set_verbosity_error()
PAIRS = [
    ("bert", "bert"),
    ("roberta", "roberta"),
    ("bert", "gpt2"),
    ("xlm-roberta", "mbart"),
    ("electra-proj", "electra"),  # an ELECTRA encoder with embeddings_project
]
SETTINGS = [
    {"max_new_tokens": 8},
    {"num_beams": 3, "max_new_tokens": 8},
    {"num_beams": 4, "num_return_sequences": 2, "length_penalty": 0.5, "max_new_tokens": 9},
    {"num_beams": 2, "no_repeat_ngram_size": 2, "max_new_tokens": 8, "early_stopping": True},
]


def encoder_config(name: str):
    config = decoder_config(name if name != "xlm-roberta" else "xlm-roberta")
    config.is_decoder = False
    config.add_cross_attention = False
    return config


def text_model(encoder: str, decoder: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
        encoder_config(encoder), decoder_config(decoder)
    )
    model = transformers.EncoderDecoderModel._from_config(config, attn_implementation="eager")
    with torch.no_grad():  # spread weights: outputs differ between texts and tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 1, 0, 2
    model.generation_config.bos_token_id = 1
    return model.eval()


def padded_batch(seed: int = 0):
    """Three texts of 7, 4 and 6 tokens, right-padded with 0 and masked."""
    rng = np.random.default_rng(seed)
    lengths = (7, 4, 6)
    ids = np.zeros((3, 7), dtype=np.int64)
    mask = np.zeros((3, 7), dtype=np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(5, 90, n)
        mask[row, :n] = 1
    return ids, mask


def hf_generate(model, ids, mask, **kwargs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            return_dict_in_generate=True,
            output_scores=True,
            **kwargs,
        )


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: "2".join(p))
def exported_text(request, tmp_path_factory):
    from vedrt.export import export_model

    model = text_model(*request.param)
    out = tmp_path_factory.mktemp("text") / "export"
    report = export_model(model, out)
    assert report.validation["passed"], report.validation
    return model, load(out)


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_text_generate_matches_transformers(exported_text, setting):
    model, gen = exported_text
    ids, mask = padded_batch()
    ref = hf_generate(model, ids, mask, **setting)
    ours = gen.generate(ids, attention_mask=mask, return_dict=True, **setting)
    np.testing.assert_array_equal(ours.sequences, ref.sequences.numpy(), err_msg=str(setting))
    if setting.get("num_beams", 1) > 1:
        np.testing.assert_allclose(
            ours.sequences_scores, ref.sequences_scores.numpy(), rtol=1e-5, atol=1e-4
        )


@pytest.mark.parametrize("setting", [{}, {"num_beams": 3}, {"pad_token_id": 2}], ids=str)
def test_padded_ids_without_a_mask_are_masked_as_transformers_does(exported_text, setting):
    """No attention_mask: transformers masks the pad id where it occurs and is not an EOS id
    (with pad_token_id=2, the EOS, it masks nothing); so must generate() and the engine."""
    model, gen = exported_text
    ids, _ = padded_batch()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(input_ids=torch.from_numpy(ids), max_new_tokens=6, **setting)
    ours = gen.generate(ids, max_new_tokens=6, **setting)
    np.testing.assert_array_equal(ours, ref.numpy())
    engine = gen.engine(max_rows=12)
    handle = engine.submit(ids, max_new_tokens=6, **setting)
    while not handle.done():
        engine.step()
    np.testing.assert_array_equal(handle.result(), ours)


def test_text_requests_batch_continuously(exported_text):
    """Texts of different lengths in one engine (slots padded to the longest) give their solo
    results."""
    _, gen = exported_text
    ids, mask = padded_batch(seed=1)
    engine = gen.engine(max_rows=8)
    handles = []
    for row in range(3):
        n = int(mask[row].sum())
        handles.append(engine.submit(ids[row : row + 1, :n], num_beams=2, max_new_tokens=7))
        engine.step()
    while not engine.idle():
        engine.step()
    for row, handle in enumerate(handles):
        n = int(mask[row].sum())
        solo = gen.generate(ids[row : row + 1, :n], num_beams=2, max_new_tokens=7)
        np.testing.assert_array_equal(handle.result(), solo)


def test_text_input_errors(exported_text):
    _, gen = exported_text
    ids, mask = padded_batch()
    with pytest.raises(InputError, match="integer"):
        gen.generate(ids.astype(np.float32))
    with pytest.raises(InputError, match="rows have different lengths"):
        gen.generate([[5, 6, 7], [8, 9]])
    as_bool = gen.generate(ids, attention_mask=mask.astype(bool), max_new_tokens=3)
    np.testing.assert_array_equal(as_bool, gen.generate(ids, attention_mask=mask, max_new_tokens=3))
    with pytest.raises(InputError, match="shape"):
        gen.generate(ids, attention_mask=mask[:, :3])
    with pytest.raises(InputError, match="vocabulary"):
        gen.generate(ids + 1000)
    with pytest.raises(InputError, match="at least one token"):
        gen.generate(ids, attention_mask=np.zeros_like(mask))
    with pytest.raises(InputError, match="text model"):
        gen.caption(["x.png"])


def test_gpt2_cannot_be_the_encoder(tmp_path):
    from vedrt.export import ExportError, export_model

    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
        decoder_config("gpt2"), decoder_config("bert")
    )
    model = transformers.EncoderDecoderModel(config=config)
    with pytest.raises(ExportError, match="decoder-only"):
        export_model(model, tmp_path / "out")


def word_tokenizer():
    """A 96-word tokenizer ("[PAD]" 0, "[BOS]" 1, "[EOS]" 2, then w3 .. w95)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, 96)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )


def test_generate_text_and_the_cli(tmp_path, capsys, monkeypatch):
    import io

    from vedrt.cli import main
    from vedrt.export import export_model

    model, tokenizer = text_model("bert", "gpt2", seed=3), word_tokenizer()
    export_model(model, tmp_path / "export", tokenizer=tokenizer)
    texts = ["w5 w6 w7 w8", "w9 w10", "w11 w12 w13"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**batch, num_beams=3, max_new_tokens=6)
    expected = tokenizer.batch_decode(ref, skip_special_tokens=True)
    gen = load(tmp_path / "export")
    assert gen.generate_text(texts, num_beams=3, max_new_tokens=6) == expected
    args = ["generate", "--model", str(tmp_path / "export"), "--num-beams", "3"]
    assert main([*args, "--max-new-tokens", "6", *texts]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{t}\t{e}" for t, e in zip(texts, expected, strict=True)
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(texts) + "\n"))
    assert main([*args, "--max-new-tokens", "6", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["output"] for line in lines] == expected
    assert main([*args, "--num-beams", "0", "w5"]) == 2
    assert "num_beams" in capsys.readouterr().err
    # one empty or too long text is its own error: the others are still answered, exit 1
    too_long = " ".join(["w5"] * 600)
    assert main([*args, "--max-new-tokens", "6", texts[0], "", too_long, texts[1]]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{texts[0]}\t{expected[0]}", f"{texts[1]}\t{expected[1]}"]
    assert "text 2: empty" in captured.err and "text 3: texts of 600 tokens" in captured.err
    assert "2 of 4 texts failed" in captured.err
    stdin = io.TextIOWrapper(
        io.BytesIO(b"w5 w6 w7 w8\n\xff\xfe\n"), encoding="utf-8", errors="surrogateescape"
    )
    monkeypatch.setattr("sys.stdin", stdin)
    assert main([*args, "--max-new-tokens", "6"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{texts[0]}\t{expected[0]}"]
    assert "line 2: not valid UTF-8" in captured.err


def shifted_tokenizer():
    """Another 96-word tokenizer: the same words, other ids (v3 is 95, v4 is 94, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, **{f"w{i}": 98 - i for i in range(3, 96)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )


def test_encoder_with_its_own_tokenizer(tmp_path):
    """bert2gpt2-style checkpoints tokenize the input with the encoder's tokenizer and decode
    with the decoder's: the export carries both (`encoder_tokenizer/`), and an --overwrite
    re-export accepts that folder as its own."""
    from vedrt.export import export_model

    model = text_model("bert", "gpt2", seed=4)
    encoder_tok, decoder_tok = shifted_tokenizer(), word_tokenizer()
    out = tmp_path / "export"
    export_model(model, out, tokenizer=decoder_tok, encoder_tokenizer=encoder_tok)
    assert (out / "encoder_tokenizer" / "tokenizer.json").is_file()
    texts = ["w5 w6 w7 w8", "w9 w10"]
    batch = encoder_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**batch, num_beams=2, max_new_tokens=6)
    expected = decoder_tok.batch_decode(ref, skip_special_tokens=True)
    assert load(out).generate_text(texts, num_beams=2, max_new_tokens=6) == expected
    export_model(model, out, overwrite=True, tokenizer=decoder_tok, encoder_tokenizer=encoder_tok)


def test_roberta_encoder_length_limit_counts_its_padding_offset(tmp_path):
    """RoBERTa numbers positions from pad + 1, so it places max_position_embeddings - pad - 1
    tokens: one more passed vedrt's check and failed inside ONNX Runtime (a raw Gather error)."""
    from vedrt.export import export_model

    model = text_model("roberta", "gpt2")
    enc = model.config.encoder
    limit = enc.max_position_embeddings - enc.pad_token_id - 1
    export_model(model, tmp_path / "export")
    gen = load(tmp_path / "export")
    assert gen.manifest.encoder["max_positions"] == limit
    ids = np.random.default_rng(0).integers(5, 90, (1, limit + 1))
    with pytest.raises(InputError, match=f"exceed the encoder's {limit} positions"):
        gen.generate(ids, max_new_tokens=2)
    reference = hf_generate(model, ids[:, :limit], np.ones_like(ids[:, :limit]), max_new_tokens=3)
    np.testing.assert_array_equal(
        gen.generate(ids[:, :limit], max_new_tokens=3), reference.sequences
    )


def test_engine_attentions_are_as_wide_as_the_request(exported_text):
    """A text request's cross attentions came back as wide as a longer request in the pool."""
    _, gen = exported_text
    rng = np.random.default_rng(3)
    long_ids, ids = rng.integers(5, 90, (1, 12)), rng.integers(5, 90, (1, 9))
    engine = gen.engine(max_rows=8)
    longer = engine.submit(long_ids, max_new_tokens=8)
    engine.step()
    options = {"max_new_tokens": 4, "return_dict": True, "output_attentions": True}
    handle = engine.submit(ids, **options)
    for _ in range(100):
        engine.step()
        if longer.done() and handle.done():
            break
    solo = gen.generate(ids, **options).cross_attentions
    got = handle.result(0).cross_attentions
    assert [a.shape for a in got[0]] == [a.shape for a in solo[0]]
    np.testing.assert_allclose(got[0][0], solo[0][0], atol=1e-5)


def test_int8_text_export_reports_its_token_agreement(tmp_path):
    """The int8 check drew random images from a text model's manifest (a TypeError ended every
    int8 text export); it now draws texts, some padded, and on the fp32 graphs agrees fully."""
    from vedrt.export import export_model
    from vedrt.export.quantize import token_agreement

    model = text_model("bert", "gpt2")
    export_model(model, tmp_path / "fp32")
    exact = token_agreement(model, tmp_path / "fp32", start_token=1)
    assert exact.sequences_identical == 1.0 and exact.images == 8
    export_model(model, tmp_path / "int8", quantize="int8")
    manifest = json.loads((tmp_path / "int8" / "vedrt.json").read_text())
    agreement = manifest["validation"]["token_agreement"]
    assert manifest["precision"] == "int8" and agreement["images"] == 8
    assert 0.0 <= agreement["sequences_identical"] <= agreement["tokens_agreeing"] <= 1.0
    ids, mask = padded_batch()
    assert load(tmp_path / "int8").generate(ids, attention_mask=mask, num_beams=3).shape[0] == 3
