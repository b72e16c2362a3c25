"""`vedrt train --task text`: the text task's data, a short training run, and its export."""

from __future__ import annotations

import pytest

from vedrt.train.text import HELDOUT_SHARE, pairs, structured


def test_structured_form_and_split():
    assert structured("a small red circle") == "circle red small"
    assert (
        structured("a small red circle to the left of a large blue square")
        == "circle red small ; square blue large ; left"
    )
    with pytest.raises(ValueError):
        structured("a purple circle")
    train, held = pairs()
    assert len(held) == int(1176 * HELDOUT_SHARE) and len(train) + len(held) == 1176
    assert not {s for s, _ in train} & {s for s, _ in held}  # held-out captions never trained on


def test_short_text_training_lowers_the_loss_and_exports(tmp_path, capsys):
    pytest.importorskip("torch")
    from vedrt.cli import main

    out = tmp_path / "ckpt"
    code = main(["train", "--task", "text", "--out", str(out), "--steps", "120", "--threads", "1"])
    assert code == 0
    import json

    info = json.loads((out / "train_info.json").read_text())
    assert info["final_loss"] < 0.5 * info["first_loss"], info
    assert main(["export", str(out), str(tmp_path / "export")]) == 0
    assert main(["eval", "--model", str(tmp_path / "export"), "--beams", "1"]) == 0
    assert "held-out exact match" in capsys.readouterr().out


@pytest.mark.runtime
def test_shipped_text_model_rewrites_held_out_captions():
    """The shipped model (vedrt/models/text) on captions it never saw in training, batched with
    texts of other lengths (its tokenizer.json was saved with padding on: the runtime must
    still mask exactly each text's own tokens)."""
    from pathlib import Path

    from vedrt.runtime import load

    model = Path(__file__).resolve().parents[1] / "vedrt" / "models" / "text"
    gen = load(model)
    _, held = pairs()
    short = [p for p in held if ";" not in p[1]][:2]
    long = [p for p in held if ";" in p[1]][:3]
    items = short + long
    outputs = gen.generate_text([s for s, _ in items], num_beams=4)
    assert outputs == [t for _, t in items]
    assert gen.generate_text([short[0][0]]) == [short[0][1]]
