"""`vedrt train --task text`: the shipped text model, a small bert2gpt2-style EncoderDecoderModel.

The task is one this project generates: rewrite a scene caption into a structured form, each
object's words reversed and the relation last,

    "a small red circle above a large blue square" -> "circle red small ; square blue large ; above"

so the decoder must read the encoder through cross-attention (word order changes, nothing is a
prefix copy). The grammar has 1,176 captions; a seeded tenth of them is held out and never seen in
training, so the exact-match score measures composition, not memory. A word-level tokenizer over
the closed vocabulary serves both sides. The loop is plain torch: the loss is computed here, on
labels shifted once (transformers 4.57 shifts twice in some encoder-decoder losses).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from vedrt.data.scenes import all_captions, parse_caption

RELATION_WORDS = {"to the left of": "left", "above": "above"}
SPECIAL = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
HELDOUT_SHARE = 0.1
SPLIT_SEED = 20241125


def structured(caption: str) -> str:
    """The target form of a caption (see the module docstring)."""
    parsed = parse_caption(caption)
    if parsed is None:
        raise ValueError(f"not a scene caption: {caption!r}")
    relation, objects = parsed
    parts = [" ".join(reversed(obj)) for obj in objects]
    if relation is not None:
        parts.append(RELATION_WORDS[relation])
    return " ; ".join(parts)


def pairs() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) pairs: every caption of the grammar, split once by a fixed seed."""
    captions = all_captions()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(captions))
    cut = int(len(captions) * HELDOUT_SHARE)
    held = [(captions[i], structured(captions[i])) for i in order[:cut]]
    train = [(captions[i], structured(captions[i])) for i in order[cut:]]
    return train, held


def build_tokenizer() -> Any:
    """A word-level tokenizer over both forms' words ([PAD] 0, [BOS] 1, [EOS] 2, [UNK] 3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for c in all_captions() for w in (c + " " + structured(c)).split()})
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    vocab.update({w: len(SPECIAL) + i for i, w in enumerate(words)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
    )


def build_model(vocab: int, seed: int, width: int = 64, layers: int = 2) -> Any:
    """BERT encoder + GPT2 decoder with cross-attention, small enough to train on a CPU."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    encoder = T.BertConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * width,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    decoder = T.GPT2Config(
        vocab_size=vocab,
        n_embd=width,
        n_layer=layers,
        n_head=4,
        n_positions=32,
        add_cross_attention=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = T.EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    model = T.EncoderDecoderModel._from_config(config, attn_implementation="eager")
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 1, 0, 2
    model.generation_config.bos_token_id = 1
    model.generation_config.max_length = 16
    return model


def _batch(tokenizer: Any, items: list[tuple[str, str]]) -> dict:
    import torch

    sources = tokenizer([s for s, _ in items], padding=True, return_tensors="pt")
    targets = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for _, t in items]
    length = max(len(t) for t in targets)
    labels = torch.full((len(items), length), -100, dtype=torch.long)
    for row, ids in enumerate(targets):
        labels[row, : len(ids)] = torch.tensor(ids)
    start = torch.full((len(items), 1), tokenizer.bos_token_id, dtype=torch.long)
    decoder_in = torch.cat([start, labels[:, :-1].clamp(min=0)], dim=1)  # shifted once
    return {**sources, "decoder_input_ids": decoder_in, "labels": labels}


def exact_match(model: Any, tokenizer: Any, items: list[tuple[str, str]], beams: int) -> float:
    """Share of `items` whose generated target equals the true one, with transformers."""
    import torch

    model.eval()
    batch = tokenizer([s for s, _ in items], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, num_beams=beams, max_new_tokens=14)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    model.train()
    return float(np.mean([h.strip() == t for h, (_, t) in zip(texts, items, strict=True)]))


def train_text(out: Path, steps: int = 1500, batch_size: int = 32, lr: float = 2e-3, seed: int = 0):
    """Train, score the held-out captions, and save a checkpoint folder; returns its info."""
    import torch

    train_items, held = pairs()
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    rng = np.random.default_rng(seed)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    started, losses = time.time(), []
    model.train()
    for step in range(steps):
        items = [train_items[i] for i in rng.integers(len(train_items), size=batch_size)]
        batch = _batch(tokenizer, items)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{steps}: loss {np.mean(losses[-100:]):.4f}", flush=True)
    seconds = time.time() - started
    info = {
        "task": "scene caption -> structured form (vedrt.train.text)",
        "steps": steps,
        "batch_size": batch_size,
        "train_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "first_loss": round(float(np.mean(losses[:20])), 4),
        "final_loss": round(float(np.mean(losses[-max(1, min(100, steps // 5)) :])), 4),
        "heldout_captions": len(held),
        "heldout_exact_match_greedy": exact_match(model, tokenizer, held, beams=1),
        "heldout_exact_match_beam4": exact_match(model, tokenizer, held, beams=4),
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def evaluate_export(
    export_dir: Path, beams: tuple[int, ...] = (1, 4)
) -> tuple[dict[str, float], int]:
    """Held-out exact match of an export with vedrt's runtime (no torch): ({"beam N": share},
    how many held-out captions)."""
    from vedrt.runtime import load

    _, held = pairs()
    gen = load(export_dir)
    sources = [s for s, _ in held]
    scores = {}
    for beam in beams:
        outputs = gen.generate_text(sources, num_beams=beam, max_new_tokens=14)
        hits = [o.strip() == t for o, (_, t) in zip(outputs, held, strict=True)]
        scores[f"beam {beam}"] = float(np.mean(hits))
    return scores, len(held)
