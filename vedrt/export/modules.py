"""The three graphs as torch modules over a checkpoint's own weights.

The exporter traces these to ONNX, and the GPU torch executor runs them as they are, so both run
the same computation. They hold references to the checkpoint's submodules (no weight copies) and
re-express the decoder as one KV-cached step that transformers' own code cannot give:
- the self-attention cache is a preallocated buffer `[rows, heads, cache_len, head_dim]`, each
  row read up to its own `past_lengths[row]` (a tensor: one graph serves every step, rows of
  different requests sit at different positions, and static-shape engines work); the step
  returns only its new keys/values, which the caller writes in by position;
- the cross-attention keys/values are computed once per image (`CrossKV`) into a pool of image
  slots; rows come in equal-size groups, each reading one image's K/V `[groups, H, S, hd]`, so
  an image's beams share its K/V, which are never expanded per row or reordered. The caller
  hands the pool's slots in place when group g is slot g (one request, a batch admitted
  together), else the groups' K/V gathered once per layout (`KVPool.set_groups`): the step
  itself copies none. `encoder_mask` [groups, enc_len] masks padding of encoder states shorter
  than the slot (text encoders);
- a step is one new token per row (the prompt is the start token alone), and the module is
  written for exactly that: activations are `[N, d]`, so ONNX Runtime fuses every linear layer's
  MatMul and bias Add into one `Gemm` (72 nodes fewer a GPT-2 step, ~0.3 ms at 4 rows), head
  splits and merges are reshapes to constant shapes with no transpose (with one token,
  `[N, H * hd]` and `[N, H, 1, hd]` hold the same order), the new token needs no causal mask,
  and its value is weighted by a product instead of a 1x1 `MatMul`.
  A traced `x.view(b, t, ...)` costs `Shape`, `Gather`, `Unsqueeze` and `Concat` nodes for its
  dynamic sizes; with `t` general they were about a third of the nodes that ONNX Runtime ran
  per step on GPT-2 small (1,969 nodes).
"""

from __future__ import annotations

import torch
from torch import nn

from .architectures import (
    DecoderFamily,
    check_decoder_config,
    decoder_family,
    encoder_family,
    get_path,
    optional_path,
)

# Each row's best TOP_K log-probabilities leave the decoder graph beside its logits: beam search
# needs at most (1 + EOS ids, at least 2) x num_beams candidates from any one row, so with no
# logits processor active the host ranks TOP_K per row instead of the whole vocabulary.
TOP_K = 16
# A tied head's [d, vocab] MatMul weight is split into column blocks this wide. ONNX Runtime holds
# a weight's mapped original and its prepacked copy at once while loading; one block at a time
# bounds that load-time peak (GPT-2's whole head: +154 MB; one block: +25 MB).
HEAD_BLOCK = 8192


def decoder_dims(config) -> tuple[int, int, int]:
    """(layers, heads, head_dim) of a decoder config, from the fields its family names.

    MBart/BART configs describe an encoder too, and their generic `num_hidden_layers` /
    `num_attention_heads` are the encoder's, so the family says which fields are the decoder's.
    """
    family = decoder_family(config.model_type)
    heads = getattr(config, family.num_heads_field)
    layers = getattr(config, family.num_layers_field)
    return layers, heads, decoder_hidden_size(config) // heads


def decoder_hidden_size(config) -> int:
    """The decoder's model width (`d_model` for BART-style configs)."""
    return getattr(config, decoder_family(config.model_type).hidden_size_field)


def _split_seq_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[B, S, H * hd] -> [B, H, S, hd] (the encoder's states: any length)."""
    return x.reshape(x.shape[0], -1, heads, head_dim).transpose(1, 2)


def _split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[N, H * hd] -> [N, H, 1, hd] (one token per row: no transpose needed)."""
    return x.reshape(-1, heads, 1, head_dim)


def _merge_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[N, H, 1, hd] -> [N, H * hd]."""
    return x.reshape(-1, heads * head_dim)


class EncoderGraph(nn.Module):
    """pixel_values -> the states the decoder cross-attends to (after `enc_to_dec_proj`)."""

    def __init__(self, model):
        super().__init__()
        self.encoder = model.encoder
        self.proj = getattr(model, "enc_to_dec_proj", None)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.encoder(pixel_values=pixel_values, return_dict=True).last_hidden_state
        return self.proj(states) if self.proj is not None else states


class TextEncoderGraph(EncoderGraph):
    """input_ids + attention_mask -> the states of a text EncoderDecoderModel's encoder."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        states = out.last_hidden_state
        return self.proj(states) if self.proj is not None else states


class CrossKV(nn.Module):
    """encoder states -> every layer's cross-attention keys and values, once per image."""

    def __init__(self, model):
        super().__init__()
        decoder = model.decoder
        self.family = decoder_family(decoder.config.model_type)
        self.layers_, self.heads, self.head_dim = decoder_dims(decoder.config)
        base = get_path(decoder, self.family.base)
        self.blocks = get_path(base, self.family.layers)

    def forward(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.family
        out = []
        for block in self.blocks:
            if f.cross_kv is not None:
                k, v = get_path(block, f.cross_kv)(encoder_hidden_states).chunk(2, dim=-1)
            else:
                k = get_path(block, f.cross_k)(encoder_hidden_states)
                v = get_path(block, f.cross_v)(encoder_hidden_states)
            h, hd = self.heads, self.head_dim
            out += [_split_seq_heads(k, h, hd), _split_seq_heads(v, h, hd)]
        return tuple(out)


def _attention_scale(config, family: DecoderFamily, layer: int, head_dim: int) -> float:
    scale = head_dim**-0.5
    if family.name == "gpt2":
        if not config.scale_attn_weights:
            scale = 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer + 1)
    return scale


class DecoderStep(nn.Module):
    """One decoder step over a preallocated self-attention cache; see the module docstring.

    forward(input_ids [N,1], past_lengths [N], self_cache (k0, v0, k1, v1, ...) each [N,H,L,hd],
            cross (k0, v0, ...) each [G,H,S,hd] (N = G * rows per group), encoder_mask [G,S]) ->
        (logits [N,V], new k0, new v0, ... [N,H,1,hd], cross_attn0, ... [N,H,1,S],
         top_logprobs [N,K] float32, top_ids [N,K]: the best K of log_softmax(logits), best first)
    """

    def __init__(self, model, split_head: bool = True):
        """`split_head=False` (the torch executor): a head tied to the token embedding stays that
        one matrix, applied as transformers applies it; the ONNX export splits a transposed copy
        into column blocks (`_init_head`)."""
        super().__init__()
        decoder = model.decoder
        config = decoder.config
        f = self.family = decoder_family(config.model_type)
        check_decoder_config(config, f)  # the torch executor builds this step too
        self.image_encoder = encoder_family(model.config.encoder.model_type).modality == "image"
        self.num_layers, self.heads, self.head_dim = decoder_dims(config)
        self.top_k = min(TOP_K, config.vocab_size)
        base = get_path(decoder, f.base)
        self.blocks = get_path(base, f.layers)
        self.scales = [
            _attention_scale(config, f, i, self.head_dim) for i in range(self.num_layers)
        ]
        self.token_embedding = get_path(base, f.token_embedding)
        self.embed_scale = float(
            getattr(self.token_embedding, f.embed_scale_attr or "", 1.0) or 1.0
        )
        self.positions = f.positions
        self.padding_idx = config.pad_token_id if config.pad_token_id is not None else 1
        pos = get_path(base, f.position_embedding)
        if isinstance(pos, nn.Embedding):
            self.position_table = pos.weight
        else:  # TrOCR's sinusoidal table: a plain tensor indexed by the padding rule
            self.register_buffer("position_table", pos.weights.clone(), persistent=False)
            self.positions = "padding"
        tte = get_path(base, f.token_type_embedding) if f.token_type_embedding else None
        row = tte.weight.detach()[0].clone() if tte is not None else None
        self.register_buffer("token_type_row", row, persistent=False)
        self.embedding_norm = get_path(base, f.embedding_norm) if f.embedding_norm else None
        self.embedding_project = optional_path(base, f.embedding_project)
        self.final_norm = get_path(base, f.final_norm) if f.final_norm else None
        self.head_dense = get_path(decoder, f.head_dense) if f.head_dense else None
        if f.head_activation == "gelu":
            self.head_activation = nn.GELU()
        elif f.head_activation:
            self.head_activation = get_path(decoder, f.head_activation)
        self.head_norm = get_path(decoder, f.head_norm) if f.head_norm else None
        self._init_head(get_path(decoder, f.head), split_head)
        self.qkv = (
            None if f.self_qkv is not None else nn.ModuleList(map(self._fused_qkv, self.blocks))
        )

    def _fused_qkv(self, block) -> nn.Linear:
        """One projection for a block's separate query, key and value: the step then makes them
        with one Gemm, one Reshape and one Split instead of three of each (each output column is
        the same dot product as before, so the values are the same). Missing biases are zeros."""
        f = self.family
        parts = [get_path(block, path) for path in (f.self_q, f.self_k, f.self_v)]
        weight = torch.cat([p.weight.detach() for p in parts], dim=0)
        bias = torch.cat(
            [
                p.bias.detach()
                if p.bias is not None
                else torch.zeros(p.out_features, dtype=weight.dtype)
                for p in parts
            ]
        )
        fused = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
        fused.weight, fused.bias = nn.Parameter(weight, False), nn.Parameter(bias, False)
        return fused

    def release_unfused(self) -> None:
        """Free the separate query/key/value weights that `_fused_qkv` copied: the step reads
        only the fused ones. For a model this step owns (the torch executor's own copy): the
        model's decoder layers can no longer run by themselves afterwards."""
        if self.qkv is None:
            return
        f = self.family
        for block in self.blocks:
            for path in (f.self_q, f.self_k, f.self_v):
                linear = get_path(block, path)
                empty = linear.weight.new_empty(0)
                linear.weight = nn.Parameter(empty, requires_grad=False)
                if linear.bias is not None:
                    linear.bias = nn.Parameter(empty.clone(), requires_grad=False)

    def _init_head(self, head: nn.Linear, split: bool) -> None:
        # A head tied to the token embedding is exported as two initializers on purpose: the
        # [vocab, d] table read only by the token Gather, and its [d, vocab] transpose read only
        # by the head MatMul (in HEAD_BLOCK column blocks). ONNX Runtime prepacks the MatMul's
        # copy and releases the original, and a lookup touches only its tokens' rows of the
        # table, so neither is resident in full (one shared matrix kept GPT-2's 154 MB head
        # resident twice). It costs the table's size on disk; int8 shares it again (quantize.py).
        self.tied = head.weight is self.token_embedding.weight and split
        if self.tied:
            columns = head.weight.detach().t().split(HEAD_BLOCK, dim=1)
            self.head_blocks = nn.ParameterList(
                nn.Parameter(block.contiguous(), requires_grad=False) for block in columns
            )
        else:
            self.head = head
        self.head_bias = head.bias if self.tied else None

    def embed(self, input_ids: torch.Tensor, past_lengths: torch.Tensor) -> torch.Tensor:
        """[N, 1] token ids -> [N, d]: each row's one new token at its own position."""
        ids = input_ids.reshape(-1)
        tokens = nn.functional.embedding(ids, self.token_embedding.weight)
        tokens = tokens * self.embed_scale if self.embed_scale != 1.0 else tokens
        if self.positions == "padding":  # transformers' cumsum over the one token is `keep`
            keep = (ids != self.padding_idx).long()
            positions = (keep + past_lengths) * keep + self.padding_idx
        else:
            positions = past_lengths + 2 if self.positions == "offset2" else past_lengths
        x = tokens + nn.functional.embedding(positions, self.position_table)
        if self.token_type_row is not None:
            x = x + self.token_type_row
        x = self.embedding_norm(x) if self.embedding_norm is not None else x
        return self.embedding_project(x) if self.embedding_project is not None else x

    def self_attention(self, i, block, x, past_masked, cache_k, cache_v, scale):
        f = self.family
        project = get_path(block, f.self_qkv) if self.qkv is None else self.qkv[i]
        # [N, 3d] viewed as [N, 3H, 1, hd]: one Reshape and one Split make q, k and v
        qkv = _split_heads(project(x), 3 * self.heads, self.head_dim)
        q, k, v = qkv.chunk(3, dim=1)
        # Scores against the cache (masked past each row's own length) and against this step's
        # own token, softmaxed together: the cache is read in place, never concatenated.
        neg = torch.finfo(q.dtype).min
        past_scores = torch.matmul(q, cache_k.transpose(-1, -2)) * scale
        past_scores = past_scores.masked_fill(past_masked, neg)
        new_scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [N,H,1,1]
        probs = torch.softmax(torch.cat([past_scores, new_scores], dim=-1), dim=-1)
        # the new token's weight times its value: a 1-term sum, so a product gives the same bits
        out = torch.matmul(probs[..., :-1], cache_v) + probs[..., -1:] * v
        return get_path(block, f.self_out)(_merge_heads(out, self.heads, self.head_dim)), k, v

    def cross_attention(self, block, x, cross_k, cross_v, masks, scale):
        """Rows come in groups of equal size, each group reading one image slot's K/V.

        `cross_k` is each group's image K/V ([G, H, S, hd]);
        folding a group's rows into the query length makes one batched product per group, so
        the beams of an image read its keys and values once and they are never copied per row.
        """
        f, h, hd = self.family, self.heads, self.head_dim
        _, cross_bias, encoder_mask = masks
        # the group count read off the one mask every layer shares, not off each layer's K: the
        # graph then computes the query's shape once, not a Shape/Gather/Concat per layer
        g = encoder_mask.shape[0]
        q = get_path(block, f.cross_q)(x).reshape(g, -1, h, hd).transpose(1, 2)  # [G,H,R,hd]
        scores = torch.matmul(q, cross_k.transpose(-1, -2)) * scale
        scores = scores + cross_bias if cross_bias is not None else scores
        probs = torch.softmax(scores, dim=-1)  # [G,H,R,S]
        out = torch.matmul(probs, cross_v).transpose(1, 2).reshape(-1, h * hd)  # [N,d]
        probs = probs.transpose(1, 2).reshape(-1, h, 1, probs.shape[-1])  # [N,H,1,S]
        return get_path(block, f.cross_out)(out), probs

    def block_forward(self, i, block, x, masks, cache_k, cache_v, cross_k, cross_v):
        f = self.family

        def norm(name, y):
            return get_path(block, name)(y)

        def ffn(y):
            return get_path(block, f.fc2)(get_path(block, f.activation)(get_path(block, f.fc1)(y)))

        scale = self.scales[i]
        if f.pre_norm:
            a, k, v = self.self_attention(
                i, block, norm(f.norm_self, x), masks[0], cache_k, cache_v, scale
            )
            x = x + a
            c, probs = self.cross_attention(
                block, norm(f.norm_cross, x), cross_k, cross_v, masks, scale
            )
            x = x + c
            x = x + ffn(norm(f.norm_ffn, x))
        else:
            a, k, v = self.self_attention(i, block, x, masks[0], cache_k, cache_v, scale)
            x = norm(f.norm_self, x + a)
            c, probs = self.cross_attention(block, x, cross_k, cross_v, masks, scale)
            x = norm(f.norm_cross, x + c)
            x = norm(f.norm_ffn, x + ffn(x))
        return x, k, v, probs

    def logits(self, last: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            last = self.final_norm(last)
        if self.head_dense is not None:
            last = self.head_norm(self.head_activation(self.head_dense(last)))
        if not self.tied:
            return self.head(last)
        blocks = [torch.matmul(last, weight) for weight in self.head_blocks]
        logits = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)
        return logits + self.head_bias if self.head_bias is not None else logits

    def masks(self, past_lengths, cache_len: int, encoder_mask, dtype):
        """Built once per step, shared by every layer: which cache positions each row has not
        filled yet ([N,1,1,L] bool), the additive cross-attention bias of each group's encoder
        states ([G,1,1,S], transformers' `(1 - mask) * finfo.min`) and the mask itself. Images
        have no bias: every encoder position is real (transformers passes no mask either), and
        adding zeros would cost every layer an Add."""
        positions = torch.arange(cache_len, device=past_lengths.device).unsqueeze(0)
        past_masked = (positions >= past_lengths.unsqueeze(1))[:, None, None, :]
        if self.image_encoder:
            return past_masked, None, encoder_mask
        keep = encoder_mask.to(dtype)
        cross_bias = ((1.0 - keep) * torch.finfo(dtype).min)[:, None, None, :]
        return past_masked, cross_bias, encoder_mask

    def forward(self, input_ids, past_lengths, self_cache, cross, encoder_mask):
        x = self.embed(input_ids, past_lengths)
        masks = self.masks(past_lengths, self_cache[0].shape[2], encoder_mask, x.dtype)
        new_kv, attn = [], []
        for i, block in enumerate(self.blocks):
            x, k, v, probs = self.block_forward(
                i,
                block,
                x,
                masks,
                self_cache[2 * i],
                self_cache[2 * i + 1],
                cross[2 * i],
                cross[2 * i + 1],
            )
            new_kv += [k, v]
            attn.append(probs)
        logits = self.logits(x)
        top = torch.topk(torch.log_softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        return (logits, *new_kv, *attn, top.values, top.indices)
