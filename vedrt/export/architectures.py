"""The supported encoder and decoder families, as data.

Adding a family means adding a row here (and a parity test), not a class. The decoder rows name
where each piece of a checkpoint's decoder lives; `modules.DecoderStep` assembles one generic
KV-cached step from them. The encoder rows say how the encoder's output tokens map back to image
patches (for attention maps) and how long its output sequence is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EncoderFamily:
    name: str
    model_types: tuple[str, ...]
    prefix_tokens: int  # tokens before the patch tokens (CLS, distillation)
    hierarchical: bool = False  # Swin: patches merged by 2 per stage after the first
    modality: str = "image"  # "text": input_ids + attention_mask (EncoderDecoderModel)
    positions: str = "absolute"  # text encoders: "padding" (RoBERTa) starts after the pad index


@dataclass(frozen=True)
class DecoderFamily:
    name: str
    model_types: tuple[str, ...]
    base: str  # the transformer body inside the *ForCausalLM / *LMHeadModel
    layers: str  # the list of blocks, relative to `base`
    token_embedding: str
    position_embedding: str
    positions: str  # "absolute": past+i; "offset2": past+i+2; "padding": fairseq/RoBERTa rule
    pre_norm: bool  # GPT2: LayerNorm before each sublayer; BERT/TrOCR: after the residual add
    # Per-block paths. A fused self-attention projection is named in `self_qkv`, else q/k/v apart.
    self_qkv: str | None
    self_q: str | None
    self_k: str | None
    self_v: str | None
    self_out: str
    cross_q: str
    cross_kv: str | None  # fused key/value projection (GPT2), else cross_k / cross_v
    cross_k: str | None
    cross_v: str | None
    cross_out: str
    norm_self: str
    norm_cross: str
    norm_ffn: str
    fc1: str
    activation: str
    fc2: str
    conv1d: bool = False  # GPT2's Conv1D stores weights as [in, out]
    token_type_embedding: str | None = None  # BERT adds token type 0 to every position
    embedding_norm: str | None = None
    final_norm: str | None = None
    # LM head: an optional transform (dense, activation, norm) then the vocabulary projection
    head_dense: str | None = None
    head_activation: str | None = None  # a module path, or "gelu" for RoBERTa's hard-wired gelu
    head_norm: str | None = None
    head: str = "lm_head"
    embed_scale_attr: str | None = (
        None  # TrOCR, MBart (scale_embedding): token embeddings x sqrt(d)
    )
    # ELECTRA: a projection from the (smaller) embedding width to the hidden width, present in a
    # checkpoint only when `embedding_size != hidden_size`
    embedding_project: str | None = None
    # The decoder's own size fields. BART-style configs also describe an encoder, and their generic
    # names (`num_hidden_layers`, `num_attention_heads`) are the encoder's.
    num_layers_field: str = "num_hidden_layers"
    num_heads_field: str = "num_attention_heads"
    hidden_size_field: str = "hidden_size"
    # config fields the generic step assumes, with the value it assumes (a field the config does
    # not have is taken to hold it): anything else is refused by name at export
    requires: tuple[tuple[str, Any], ...] = ()


ENCODERS: tuple[EncoderFamily, ...] = (
    EncoderFamily("vit", ("vit",), prefix_tokens=1),
    EncoderFamily("deit", ("deit",), prefix_tokens=2),
    EncoderFamily("beit", ("beit",), prefix_tokens=1),
    EncoderFamily("swin", ("swin", "donut-swin"), prefix_tokens=0, hierarchical=True),
    EncoderFamily("swinv2", ("swinv2",), prefix_tokens=0, hierarchical=True),
    # text EncoderDecoderModel encoders (bert2bert, roberta2roberta, bert2gpt2, ...)
    EncoderFamily("bert", ("bert",), prefix_tokens=0, modality="text"),
    EncoderFamily("roberta", ("roberta",), prefix_tokens=0, modality="text", positions="padding"),
    EncoderFamily(
        "xlm-roberta", ("xlm-roberta",), prefix_tokens=0, modality="text", positions="padding"
    ),
    EncoderFamily("electra", ("electra",), prefix_tokens=0, modality="text"),
)

# decoder-only models people try as encoders: they have no bidirectional encoder to export
NOT_ENCODERS = ("gpt2", "gpt_neo", "gptj", "llama", "opt", "bloom")

_BERT_BLOCK = dict(
    requires=(("position_embedding_type", "absolute"),),  # relative_key*: not in the step
    self_qkv=None,
    self_q="attention.self.query",
    self_k="attention.self.key",
    self_v="attention.self.value",
    self_out="attention.output.dense",
    cross_q="crossattention.self.query",
    cross_kv=None,
    cross_k="crossattention.self.key",
    cross_v="crossattention.self.value",
    cross_out="crossattention.output.dense",
    norm_self="attention.output.LayerNorm",
    norm_cross="crossattention.output.LayerNorm",
    norm_ffn="output.LayerNorm",
    fc1="intermediate.dense",
    activation="intermediate.intermediate_act_fn",
    fc2="output.dense",
    pre_norm=False,
    layers="encoder.layer",
    token_embedding="embeddings.word_embeddings",
    position_embedding="embeddings.position_embeddings",
    token_type_embedding="embeddings.token_type_embeddings",
    embedding_norm="embeddings.LayerNorm",
)

# fairseq-style decoders (TrOCR, BART, MBart): `model.decoder.layers[i]` with q/k/v projections
_BART_BLOCK = dict(
    base="model.decoder",
    layers="layers",
    token_embedding="embed_tokens",
    position_embedding="embed_positions",
    self_qkv=None,
    self_q="self_attn.q_proj",
    self_k="self_attn.k_proj",
    self_v="self_attn.v_proj",
    self_out="self_attn.out_proj",
    cross_q="encoder_attn.q_proj",
    cross_kv=None,
    cross_k="encoder_attn.k_proj",
    cross_v="encoder_attn.v_proj",
    cross_out="encoder_attn.out_proj",
    norm_self="self_attn_layer_norm",
    norm_cross="encoder_attn_layer_norm",
    norm_ffn="final_layer_norm",
    fc1="fc1",
    activation="activation_fn",
    fc2="fc2",
    embedding_norm="layernorm_embedding",
    embed_scale_attr="embed_scale",
    num_layers_field="decoder_layers",
    num_heads_field="decoder_attention_heads",
    hidden_size_field="d_model",
)

# RoBERTa and XLM-RoBERTa: BERT's blocks, fairseq positions, a gelu LM head
_ROBERTA = dict(
    base="roberta",
    positions="padding",
    head_dense="lm_head.dense",
    head_activation="gelu",
    head_norm="lm_head.layer_norm",
    head="lm_head.decoder",
    **_BERT_BLOCK,
)

DECODERS: tuple[DecoderFamily, ...] = (
    DecoderFamily(
        name="gpt2",
        model_types=("gpt2",),
        base="transformer",
        layers="h",
        token_embedding="wte",
        position_embedding="wpe",
        positions="absolute",
        pre_norm=True,
        conv1d=True,
        self_qkv="attn.c_attn",
        self_q=None,
        self_k=None,
        self_v=None,
        self_out="attn.c_proj",
        cross_q="crossattention.q_attn",
        cross_kv="crossattention.c_attn",
        cross_k=None,
        cross_v=None,
        cross_out="crossattention.c_proj",
        norm_self="ln_1",
        norm_cross="ln_cross_attn",
        norm_ffn="ln_2",
        fc1="mlp.c_fc",
        activation="mlp.act",
        fc2="mlp.c_proj",
        final_norm="ln_f",
    ),
    DecoderFamily(
        name="trocr",
        model_types=("trocr",),
        positions="offset2",  # "padding" when the checkpoint uses sinusoidal positions
        pre_norm=False,
        head="output_projection",
        **_BART_BLOCK,
    ),
    DecoderFamily(
        name="mbart",  # Donut, Nougat
        model_types=("mbart",),
        positions="offset2",
        pre_norm=True,
        final_norm="layer_norm",
        **_BART_BLOCK,
    ),
    DecoderFamily(
        name="bart",  # BartForCausalLM
        model_types=("bart",),
        positions="offset2",
        pre_norm=False,
        **_BART_BLOCK,
    ),
    DecoderFamily(
        name="bert",
        model_types=("bert",),
        base="bert",
        positions="absolute",
        head_dense="cls.predictions.transform.dense",
        head_activation="cls.predictions.transform.transform_act_fn",
        head_norm="cls.predictions.transform.LayerNorm",
        head="cls.predictions.decoder",
        **_BERT_BLOCK,
    ),
    DecoderFamily(name="roberta", model_types=("roberta",), **_ROBERTA),
    DecoderFamily(name="xlm-roberta", model_types=("xlm-roberta",), **_ROBERTA),
    DecoderFamily(
        name="electra",  # ElectraForCausalLM: the generator's head, in the embedding width
        model_types=("electra",),
        base="electra",
        positions="absolute",
        embedding_project="embeddings_project",
        head_dense="generator_predictions.dense",
        head_activation="generator_predictions.activation",
        head_norm="generator_predictions.LayerNorm",
        head="generator_lm_head",
        **_BERT_BLOCK,
    ),
)


class UnsupportedArchitecture(ValueError):
    """The checkpoint's encoder or decoder is not one of the families above."""


def _supported(rows) -> str:
    return ", ".join(t for row in rows for t in row.model_types)


def encoder_family(model_type: str) -> EncoderFamily:
    for row in ENCODERS:
        if model_type in row.model_types:
            return row
    if model_type in NOT_ENCODERS:
        raise UnsupportedArchitecture(
            f"{model_type!r} is a decoder-only model and cannot be the encoder (it may be the "
            f"decoder, as in bert2gpt2); supported encoders: {_supported(ENCODERS)}"
        )
    raise UnsupportedArchitecture(
        f"unsupported encoder {model_type!r}; supported encoders: {_supported(ENCODERS)}"
    )


def decoder_family(model_type: str) -> DecoderFamily:
    for row in DECODERS:
        if model_type in row.model_types:
            return row
    raise UnsupportedArchitecture(
        f"unsupported decoder {model_type!r}; supported decoders: {_supported(DECODERS)}"
    )


def check_decoder_config(config, family: DecoderFamily) -> None:
    """Refuse, naming the field, a decoder setting the generic step does not implement."""
    for field_name, value in family.requires:
        found = getattr(config, field_name, value)
        if found != value:
            raise UnsupportedArchitecture(
                f"decoder {field_name}={found!r} is not supported ({family.name} decoders: "
                f"{field_name}={value!r} only)"
            )


def get_path(root, path: str):
    """Follow a dotted attribute path (`attention.self.query`) from a module."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def optional_path(root, path: str | None):
    """`get_path`, or None for a piece the row names but this checkpoint leaves out."""
    if path is None:
        return None
    try:
        return get_path(root, path)
    except AttributeError:
        return None
