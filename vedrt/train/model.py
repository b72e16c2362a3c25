"""Build what training needs: tokenizer, image processor and a VisionEncoderDecoderModel.

Everything is standard transformers/tokenizers objects saved in their standard files, so a
checkpoint trained here is loaded with `VisionEncoderDecoderModel.from_pretrained` and
`AutoTokenizer.from_pretrained` like any other, and `vedrt export` needs nothing special.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vedrt.errors import UsageError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


@dataclass
class Sizes:
    """Sizes of a model built from configs. The defaults are the shipped scene model: small
    enough to train on two CPU cores in about half an hour and to caption in milliseconds.

    The default encoder is BEiT, a ViT with a learned relative position bias in every layer: a
    plain ViT from scratch learned shapes slowly (31% exact match after 1,000 steps), and Swin,
    though it learned shapes fast, has no absolute position (transformers' Swin absolute
    embeddings are mis-sized without CLS), so it named two shapes in the wrong order. BEiT gets
    the locality prior from the bias and absolute position from its position embeddings,
    initialised to 2-D sin-cos so that "left" and "above" are readable from the first step.
    For Swin `enc_hidden` is the last stage's width (halved per earlier stage) and `enc_layers`
    the blocks per stage."""

    encoder_type: str = "beit"  # "beit", "vit" or "swin"
    image_size: int = 64
    patch_size: int = 8
    enc_hidden: int = 128
    enc_layers: int = 4
    enc_stages: int = 2  # Swin only
    window: int = 4  # Swin only
    dec_hidden: int = 128
    dec_layers: int = 2
    heads: int = 4
    max_positions: int = 32


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style, no unknown tokens) with <pad>=0, <s>=1, </s>=2."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(
        list(texts),
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        show_progress=False,
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=512,
    )


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None
    if tok.eos_token_id is None:
        raise UsageError(f"{path}: tokenizer has no EOS token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.bos_token_id is None:
        tok.bos_token = tok.eos_token
    return tok


def image_processor(image_size: int) -> Any:
    """Resize to a square, scale to [-1, 1]: ViT's processor, saved as preprocessor_config.json."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        size={"height": image_size, "width": image_size},
        resample=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def set_special_ids(model: Any, tokenizer: Any, max_length: int) -> None:
    """Make `generate()` (ours and transformers') start with BOS and stop at EOS by default."""
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id = tokenizer.bos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
    model.config.decoder.bos_token_id = tokenizer.bos_token_id
    model.config.decoder.eos_token_id = tokenizer.eos_token_id
    model.config.decoder.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.max_length = max_length
    gen.num_beams = 1


def fix_loss(model: Any) -> None:
    """Train on the labels as given: VisionEncoderDecoderModel already shifts them into the
    decoder inputs, but transformers 4.50-4.57 then scores them with ForCausalLMLoss, which shifts
    again, so the model learns to predict the token after next (transformers#40111, fixed
    upstream by #40863). The unshifted cross entropy is the one registered as "ForMaskedLM"."""
    model.loss_type = "ForMaskedLM"


def model_from_configs(sizes: Sizes, vocab_size: int, seed: int = 0) -> Any:
    from transformers import ViTConfig

    if sizes.image_size % sizes.patch_size:
        raise UsageError(
            f"--image-size {sizes.image_size} is not a multiple of --patch-size {sizes.patch_size}"
        )
    if sizes.encoder_type == "swin":
        return _with_decoder(_swin_config(sizes), sizes, vocab_size, seed)
    common = dict(
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        hidden_size=sizes.enc_hidden,
        num_hidden_layers=sizes.enc_layers,
        num_attention_heads=sizes.heads,
        intermediate_size=4 * sizes.enc_hidden,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if sizes.encoder_type == "vit":
        encoder = ViTConfig(**common)
    elif sizes.encoder_type == "beit":
        from transformers import BeitConfig

        encoder = BeitConfig(
            **common,
            use_absolute_position_embeddings=True,
            use_relative_position_bias=True,
            use_mean_pooling=False,
            drop_path_rate=0.0,
        )
    else:
        raise UsageError(f"--encoder-type must be beit, vit or swin, got {sizes.encoder_type!r}")
    model = _with_decoder(encoder, sizes, vocab_size, seed)
    grid = sizes.image_size // sizes.patch_size
    with _no_grad():
        pos = model.encoder.embeddings.position_embeddings  # [1, 1 + grid*grid, hidden]
        pos.zero_()
        pos[0, 1:] = sincos_2d(grid, sizes.enc_hidden)
    return model


def _no_grad() -> Any:
    import torch

    return torch.no_grad()


def sincos_2d(grid: int, dim: int) -> Any:
    """Fixed 2-D sin-cos position codes (as in MAE): half the channels for rows, half for columns."""
    import torch

    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angle = coord[:, None].float() * freq[None]
        parts += [angle.sin(), angle.cos()]
    out = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(out, (0, dim - out.shape[1]))


def _swin_config(sizes: Sizes) -> Any:
    from transformers import SwinConfig

    stages = sizes.enc_stages
    grid = sizes.image_size // sizes.patch_size
    if sizes.enc_hidden % 2 ** (stages - 1) or grid % (sizes.window * 2 ** (stages - 1)):
        raise UsageError(
            f"Swin sizes do not divide: image {sizes.image_size} / patch {sizes.patch_size} must be a "
            f"multiple of window {sizes.window} x 2^{stages - 1}, and --enc-hidden of 2^{stages - 1}"
        )
    return SwinConfig(
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        embed_dim=sizes.enc_hidden // 2 ** (stages - 1),
        depths=[sizes.enc_layers] * stages,
        num_heads=[max(1, sizes.heads // 2 ** (stages - 1 - i)) for i in range(stages)],
        window_size=sizes.window,
        mlp_ratio=2.0,
        drop_path_rate=0.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def _with_decoder(encoder: Any, sizes: Sizes, vocab_size: int, seed: int) -> Any:
    import torch
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    decoder = GPT2Config(
        vocab_size=vocab_size,
        n_embd=sizes.dec_hidden,
        n_layer=sizes.dec_layers,
        n_head=sizes.heads,
        n_positions=sizes.max_positions,
        add_cross_attention=True,
        is_decoder=True,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    torch.manual_seed(seed)
    return VisionEncoderDecoderModel(config=config)


def model_from_pretrained(encoder_dir: str, decoder_dir: str) -> Any:
    from transformers import VisionEncoderDecoderModel

    for what, d in (("--encoder", encoder_dir), ("--decoder", decoder_dir)):
        if not (Path(d) / "config.json").is_file():
            raise UsageError(f"{what} {d}: not a model folder (no config.json)")
    return VisionEncoderDecoderModel.from_encoder_decoder_pretrained(encoder_dir, decoder_dir)


def processor_for_pretrained(encoder_dir: str, image_size: int) -> Any:
    """The encoder's own processor when it ships one (its normalisation was trained with it)."""
    if (Path(encoder_dir) / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(encoder_dir)
    return image_processor(image_size)
