"""Wire data, model and tokenizer into transformers' Seq2SeqTrainer and save a usable checkpoint.

The trainer does the loop, schedule, progress bar, periodic generation-based evaluation and
intermediate checkpoints; this module only supplies the pieces and writes the final folder in
the layout every consumer expects (model, generation config, tokenizer, preprocessor).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vedrt.train.data import Encoded, collate
from vedrt.train.metrics import caption_scores


@dataclass
class TrainPlan:
    out: Path
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: float = 0.05
    weight_decay: float = 0.01
    eval_steps: int = 500
    save_steps: int = 500
    workers: int = 1
    seed: int = 0
    max_tokens: int = 24
    logging_steps: int = 50
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in train_info.json


def train(
    model: Any,
    tokenizer: Any,
    processor: Any,
    train_source: Any,
    valid_source: Any,
    plan: TrainPlan,
    resume: bool = False,
) -> dict[str, Any]:
    """Train and write the checkpoint to `plan.out`; returns the final validation metrics."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    out = Path(plan.out)
    state_dir = out / "trainer-state"  # resumable intermediate checkpoints, not part of the model
    made = [d for d in (out, state_dir) if not d.exists()]  # removed again if left empty
    args = Seq2SeqTrainingArguments(
        output_dir=str(state_dir),
        max_steps=plan.steps,
        per_device_train_batch_size=plan.batch_size,
        per_device_eval_batch_size=max(plan.batch_size, 64),
        learning_rate=plan.lr,
        lr_scheduler_type="cosine",
        warmup_ratio=plan.warmup,
        weight_decay=plan.weight_decay,
        max_grad_norm=1.0,
        logging_steps=plan.logging_steps,
        eval_strategy="steps",
        eval_steps=plan.eval_steps,
        save_strategy="steps",
        save_steps=plan.save_steps,
        save_total_limit=1,
        predict_with_generate=True,
        generation_max_length=plan.max_tokens,
        generation_num_beams=1,
        dataloader_num_workers=plan.workers,
        remove_unused_columns=False,
        report_to=[],
        seed=plan.seed,
        use_cpu=not _cuda(),
    )

    def metrics(pred: Any) -> dict[str, float]:
        ids = np.where(pred.predictions < 0, tokenizer.pad_token_id, pred.predictions)
        labels = np.where(pred.label_ids < 0, tokenizer.pad_token_id, pred.label_ids)
        hyp = tokenizer.batch_decode(ids, skip_special_tokens=True)
        ref = tokenizer.batch_decode(labels, skip_special_tokens=True)
        return caption_scores([h.strip() for h in hyp], [r.strip() for r in ref])

    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=Encoded(train_source, processor, tokenizer, plan.max_tokens),
        eval_dataset=Encoded(valid_source, processor, tokenizer, plan.max_tokens),
        data_collator=collate,
        compute_metrics=metrics,
    )
    start = time.time()
    has_state = resume and any(state_dir.glob("checkpoint-*"))
    if resume and not has_state:  # say so: a silent fresh start looks like a resumed one
        print(
            f"vedrt train: --resume: no saved state in {state_dir}, starting fresh", file=sys.stderr
        )
    try:
        trainer.train(resume_from_checkpoint=True if has_state else None)
    except BaseException:  # Ctrl-C or an error before the first save: no empty folders left
        _remove_if_empty(reversed(made))
        raise
    seconds = time.time() - start
    final = trainer.evaluate()
    out.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(str(out))  # config, generation config, safetensors
    tokenizer.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    info = {
        "train_seconds": round(seconds, 1),
        "steps": plan.steps,
        "batch_size": plan.batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_eval": {k: round(float(v), 4) for k, v in final.items()},
        **plan.extra,
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _remove_if_empty(folders: Any) -> None:
    """Remove the folders this run created that hold nothing; never anything with a file in it."""
    for folder in folders:
        try:
            folder.rmdir()  # fails on a folder with anything in it, which stays
        except OSError:
            pass


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
