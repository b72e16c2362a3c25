"""Caption scores shared by training-time validation and `vedrt eval`."""

from __future__ import annotations

import numpy as np


def caption_scores(
    predictions: list[str], references: list[list[str]] | list[str]
) -> dict[str, float]:
    """Exact match (against any reference) and corpus BLEU-4 with sacrebleu's defaults.

    Exact match is the scene task's real measure (a caption is right or wrong); BLEU-4 is there
    for users' data, where several captions per image are normal. Images with fewer references
    repeat their first one, which leaves BLEU unchanged (clipping uses the maximum over refs)."""
    import sacrebleu

    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(refs) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(refs)} references")
    if not refs:
        return {"exact_match": float("nan"), "bleu4": float("nan")}
    exact = float(
        np.mean(
            [p.strip() in {r.strip() for r in rs} for p, rs in zip(predictions, refs, strict=True)]
        )
    )
    width = max(len(rs) for rs in refs)
    streams = [[rs[k] if k < len(rs) else rs[0] for rs in refs] for k in range(width)]
    bleu = sacrebleu.corpus_bleu(predictions, streams).score
    return {"exact_match": exact, "bleu4": float(bleu)}
