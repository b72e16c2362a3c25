"""`vedrt train`: train a captioner on synthetic scenes (the default) or on your own data.

The shipped scene model was made with
`OMP_NUM_THREADS=1 vedrt train --out checkpoints/scenes --threads 1` (every other setting is a
default below); see docs/scene-model.md.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from vedrt.data import scenes
from vedrt.errors import UsageError
from vedrt.train.model import Sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for the checkpoint (created)")
    parser.add_argument(
        "--task",
        choices=("scenes", "text"),
        default="scenes",
        help="scenes: an image captioner (default); text: the bert2gpt2-style text model that "
        "rewrites scene captions into a structured form (vedrt/train/text.py; uses --steps, "
        "--batch-size, --lr, --seed, --threads)",
    )
    data = parser.add_argument_group("data (default: synthetic scenes, fresh ones every step)")
    data.add_argument(
        "--data", help="folder with captions.jsonl, a .jsonl file, or a COCO captions .json"
    )
    data.add_argument("--images", help="image folder for a COCO file (default: the file's folder)")
    data.add_argument(
        "--valid-size", type=int, default=200, help="validation captions (default 200)"
    )
    model = parser.add_argument_group("model (default: small BEiT + GPT2 built from configs)")
    model.add_argument("--encoder", help="pretrained encoder folder (with --decoder)")
    model.add_argument("--decoder", help="pretrained decoder folder (with --encoder)")
    model.add_argument(
        "--tokenizer", help="tokenizer folder (default: the decoder's, else a new BPE)"
    )
    model.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="size of a newly trained BPE vocabulary (default 384 for scenes, 4096 otherwise)",
    )
    for f in fields(Sizes):
        model.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            help=f"(default {f.default})",
        )
    loop = parser.add_argument_group("training")
    loop.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default 4000; text: 1500)"
    )
    loop.add_argument("--batch-size", type=int, default=32, help="(default 32)")
    loop.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default 1e-3; text: 2e-3)"
    )
    loop.add_argument(
        "--eval-steps", type=int, default=500, help="validate (and checkpoint) every N steps"
    )
    loop.add_argument("--workers", type=int, default=1, help="data loader processes (default 1)")
    loop.add_argument("--seed", type=int, default=0, help="(default 0)")
    loop.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    loop.add_argument("--resume", action="store_true", help="continue from OUT/trainer-state")


TRAIN_MARKERS = ("train_info.json", "trainer-state")  # what vedrt train writes into OUT


def check_arguments(args: argparse.Namespace) -> None:
    """Every value checked before anything heavy loads, and OUT never a folder of someone
    else's files: training writes config.json, model.safetensors and the tokenizer's files there."""
    for name in ("steps", "batch_size", "eval_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.workers < 0 or args.valid_size < 0:
        raise UsageError("--workers and --valid-size must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in TRAIN_MARKERS):
        raise UsageError(
            f"--out {out}: a folder with files vedrt train did not write; training would replace "
            "them (choose a new or empty folder)"
        )
    for given in (args.encoder, args.decoder, args.tokenizer, args.data):
        if given and Path(given).resolve() == out.resolve():
            raise UsageError(f"--out {out} is also an input: choose another folder")
    if args.task == "text":
        mixed = [
            f"--{n}"
            for n in ("data", "images", "encoder", "decoder", "tokenizer")
            if getattr(args, n)
        ]
        if mixed:
            raise UsageError(
                f"--task text trains on its own data and model ({', '.join(mixed)}: scenes only)"
            )


def run_text(args: argparse.Namespace) -> int:
    import torch

    from vedrt.train.text import train_text

    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps if args.steps is not None else 1500  # the text model's own defaults
    lr = args.lr if args.lr is not None else 2e-3
    info = train_text(Path(args.out), steps, args.batch_size, lr, args.seed)
    print(
        f"saved {args.out}: {info['parameters']:,} parameters, {info['train_seconds']:.0f} s, "
        f"held-out exact match {info['heldout_exact_match_greedy']:.3f} greedy, "
        f"{info['heldout_exact_match_beam4']:.3f} beam 4 ({info['heldout_captions']} captions)"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    if args.task == "text":
        return run_text(args)
    args.steps = args.steps if args.steps is not None else 4000
    args.lr = args.lr if args.lr is not None else 1e-3
    if bool(args.encoder) != bool(args.decoder):
        raise UsageError("--encoder and --decoder go together")
    if args.data:
        from vedrt.train.data import FolderImages, check_images, load_captions, split_items

        items = load_captions(args.data, args.images)
        check_images(items)
        train_items, valid_items = split_items(items, args.valid_size, args.seed)
        train_source, valid_source = FolderImages(train_items), FolderImages(valid_items)
        texts = [it.caption for it in train_items]
        if len(train_items) < 1:
            raise UsageError(f"{args.data}: too few captions to train on")
    else:
        from vedrt.train.data import SceneImages

        # Every training step sees new scenes: the stream is long enough never to repeat.
        train_source = SceneImages(scenes.TRAIN_SEED, args.steps * args.batch_size)
        valid_source = SceneImages(scenes.VALID_SEED, args.valid_size)
        texts = scenes.all_captions()

    import torch

    from vedrt.train import model as build
    from vedrt.train.trainer import TrainPlan, train

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = Sizes(**{f.name: getattr(args, f.name) for f in fields(Sizes)})
    if args.tokenizer or args.encoder:
        tokenizer = build.load_tokenizer(args.tokenizer or args.decoder)
    else:
        tokenizer = build.train_tokenizer(
            texts, args.vocab_size or (384 if not args.data else 4096)
        )
    if args.encoder:
        model = build.model_from_pretrained(args.encoder, args.decoder)
        if model.config.decoder.vocab_size < len(tokenizer):
            raise UsageError(
                f"tokenizer has {len(tokenizer)} tokens, decoder only {model.config.decoder.vocab_size}"
            )
        processor = build.processor_for_pretrained(
            args.encoder, getattr(model.config.encoder, "image_size", 224)
        )
        max_tokens = 64
    else:
        try:
            model = build.model_from_configs(sizes, len(tokenizer), args.seed)
        except ValueError as exc:  # sizes transformers refuses (hidden size vs heads, ...)
            raise UsageError(f"model sizes: {exc}") from None
        processor = build.image_processor(sizes.image_size)
        max_tokens = sizes.max_positions
    build.set_special_ids(model, tokenizer, max_tokens)
    build.fix_loss(model)
    plan = TrainPlan(
        out=Path(args.out),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_steps=args.eval_steps,
        save_steps=args.eval_steps,
        workers=args.workers,
        seed=args.seed,
        max_tokens=max_tokens,
        extra={"data": args.data or "scenes", "sizes": vars(sizes) if not args.encoder else None},
    )
    info = train(model, tokenizer, processor, train_source, valid_source, plan, resume=args.resume)
    ev = info["final_eval"]
    print(
        f"saved {args.out}: {info['parameters']:,} parameters, {info['train_seconds']:.0f} s, "
        f"validation exact match {ev.get('eval_exact_match', float('nan')):.3f}, "
        f"BLEU-4 {ev.get('eval_bleu4', float('nan')):.1f}"
    )
    return 0
