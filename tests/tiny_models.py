"""Tiny random VisionEncoderDecoderModels built from configs (no downloads), one per family.

Shared by the exporter, runtime and GPU tests. Sizes are small enough that a model exports in
seconds, yet every structural feature is present: several layers and heads, an encoder width that
differs from the decoder's (so `enc_to_dec_proj` exists for some rows), tied and untied heads.
"""

from __future__ import annotations

ENCODERS = ("vit", "deit", "beit", "swin")
DECODERS = ("gpt2", "trocr", "bert", "roberta")
# Rows with their own parity tests (tests/test_rows.py) rather than the full encoder x decoder
# matrix. "electra-proj" is ELECTRA with embedding_size != hidden_size (`embeddings_project`).
MORE_ENCODERS = ("swinv2", "donut-swin")
MORE_DECODERS = ("mbart", "bart", "xlm-roberta", "electra", "electra-proj")
VOCAB = 96
IMAGE = 32


def encoder_config(name: str, image_size: int | tuple[int, int] = IMAGE, **overrides):
    """The tiny config of one encoder row; `overrides` replace or add config fields."""
    config = _encoder_config(name, image_size)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _encoder_config(name: str, image_size: int | tuple[int, int]):
    import transformers as T

    common = dict(image_size=image_size, num_channels=3)
    if name == "vit":
        return T.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            patch_size=8,
            **common,
        )
    if name == "deit":
        return T.DeiTConfig(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            patch_size=8,
            **common,
        )
    if name == "beit":
        return T.BeitConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            patch_size=8,
            use_relative_position_bias=True,
            use_mean_pooling=False,
            **common,
        )
    swin = dict(embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=2, patch_size=4)
    if name == "swin":
        return T.SwinConfig(**swin, **common)
    if name == "swinv2":
        return T.Swinv2Config(**swin, **common)
    if name == "donut-swin":
        return T.DonutSwinConfig(**swin, **common)
    raise ValueError(name)


def _bart_style(cls, vocab: int, ids: dict, **extra):
    """A causal BART/MBart decoder; the encoder fields keep their defaults (12 layers, 16 heads),
    as in Donut/Nougat checkpoints, so a size read from the wrong field shows."""
    return cls(
        vocab_size=vocab,
        d_model=32,
        decoder_layers=2,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        is_decoder=True,
        is_encoder_decoder=False,
        add_cross_attention=True,
        **extra,
        **ids,
    )


def decoder_config(name: str, vocab: int = VOCAB, **overrides):
    """The tiny config of one decoder row; `overrides` replace or add config fields."""
    config = _decoder_config(name, vocab)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _decoder_config(name: str, vocab: int):
    import transformers as T

    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name == "gpt2":
        return T.GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            add_cross_attention=True,
            **ids,
        )
    if name == "trocr":
        return T.TrOCRConfig(
            vocab_size=vocab,
            d_model=32,
            hidden_size=32,
            decoder_layers=2,
            decoder_attention_heads=4,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            scale_embedding=True,
            layernorm_embedding=True,
            is_decoder=True,
            add_cross_attention=True,
            **ids,
        )
    if name == "bert":
        return T.BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            is_decoder=True,
            add_cross_attention=True,
            **ids,
        )
    bert_like = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        is_decoder=True,
        add_cross_attention=True,
        **ids,
    )
    if name == "roberta":
        return T.RobertaConfig(max_position_embeddings=80, **bert_like)
    if name == "xlm-roberta":
        return T.XLMRobertaConfig(max_position_embeddings=80, **bert_like)
    if name == "electra":
        return T.ElectraConfig(embedding_size=32, max_position_embeddings=64, **bert_like)
    if name == "electra-proj":
        return T.ElectraConfig(embedding_size=16, max_position_embeddings=64, **bert_like)
    if name == "mbart":
        return _bart_style(T.MBartConfig, vocab, ids, scale_embedding=True)
    if name == "bart":
        return _bart_style(T.BartConfig, vocab, ids, scale_embedding=False)
    raise ValueError(name)


def tiny_model(
    encoder: str = "vit",
    decoder: str = "gpt2",
    seed: int = 0,
    image_size: int | tuple[int, int] = IMAGE,
    attn_implementation: str | None = None,
    decoder_overrides: dict | None = None,
    encoder_overrides: dict | None = None,
):
    """A random VisionEncoderDecoderModel in eval mode with generation ids set.

    `attn_implementation` None keeps transformers' default (SDPA where supported); parity
    references that must be exact ask for "eager"."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    config = T.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        encoder_config(encoder, image_size, **(encoder_overrides or {})),
        decoder_config(decoder, **(decoder_overrides or {})),
    )
    if attn_implementation is None:
        model = T.VisionEncoderDecoderModel(config=config)
    else:
        model = T.VisionEncoderDecoderModel._from_config(
            config, attn_implementation=attn_implementation
        )
    model.config.decoder_start_token_id = 1
    model.config.pad_token_id = 0
    model.config.eos_token_id = 2
    model.generation_config.decoder_start_token_id = 1
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1
    return model.eval()
