"""Attention maps: the runtime's cross-attention is transformers' (so the maps show what the model
really attended to), and the picture has the documented layout."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vedrt.runtime.explain import LABEL_H, PAD, panel_size, token_maps, write_attention_map


def _fake_attentions(
    steps: int,
    layers: int = 2,
    rows: int = 2,
    heads: int = 3,
    enc_len: int = 17,
    prompt: int = 1,
    seed: int = 0,
) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for step in range(steps):
        new = prompt if step == 0 else 1
        a = rng.random((layers, rows, heads, new, enc_len)).astype(np.float32)
        out.append(list(a / a.sum(-1, keepdims=True)))
    return out


@pytest.mark.runtime
def test_token_maps_drop_prefix_and_pick_rows() -> None:
    att = _fake_attentions(3, prompt=2)
    maps = token_maps(att, grid=(4, 4), rows=[0, 1, 0])
    assert maps.shape == (3, 4, 4)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1, rtol=1e-5)
    expected = att[1][-1][1, :, -1, 1:].mean(0)
    np.testing.assert_allclose(maps[1].ravel(), expected / expected.sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="grid 3x3"):
        token_maps(att, grid=(3, 3))


@pytest.mark.runtime
@pytest.mark.parametrize(
    "size,tokens", [((64, 64), ["a", "Ġsmall", "Ġred", "Ġcircle"]), ((90, 40), ["x"] * 8)]
)
def test_png_has_the_documented_size(
    tmp_path: Path, size: tuple[int, int], tokens: list[str]
) -> None:
    image = Image.new("RGB", size, "white")
    out = write_attention_map(
        image,
        tokens,
        _fake_attentions(len(tokens) + 1),
        tmp_path / "map.png",
        grid=(4, 4),
        cell=96,
        columns=6,
    )
    pw, ph = panel_size(size, 96)
    panels = 1 + len(tokens)
    cols = min(6, panels)
    lines = -(-panels // cols)
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (cols * (pw + PAD) + PAD, lines * (ph + LABEL_H + PAD) + PAD)


def test_runtime_cross_attention_equals_transformers(exported) -> None:
    """Greedy and beam search, every step and layer, within 1e-4."""
    torch = pytest.importorskip("torch")
    import copy

    from vedrt.runtime import load

    shared, export_dir = exported("vit", "gpt2")
    model = copy.deepcopy(shared)  # SDPA returns no attention probabilities; eager does
    model.set_attn_implementation("eager")
    gen = load(export_dir, threads=1)
    pv = np.random.RandomState(3).randn(2, 3, 32, 32).astype(np.float32)
    for beams in (1, 4):
        kwargs = dict(num_beams=beams, max_new_tokens=6)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = model.generate(
                pixel_values=torch.from_numpy(pv),
                output_attentions=True,
                return_dict_in_generate=True,
                **kwargs,
            )
        ours = gen.generate(pv, return_dict=True, output_attentions=True, **kwargs)
        assert len(ours.cross_attentions) == len(ref.cross_attentions)
        for step, (o_layers, r_layers) in enumerate(
            zip(ours.cross_attentions, ref.cross_attentions, strict=True)
        ):
            assert len(o_layers) == len(r_layers)
            for o, r in zip(o_layers, r_layers, strict=True):
                assert o.shape == tuple(r.shape), (beams, step)
                np.testing.assert_allclose(
                    o, r.numpy(), atol=1e-4, err_msg=f"beams={beams} step={step}"
                )


def test_caption_explain_writes_png(exported, tmp_path: Path) -> None:
    """`vedrt caption IMAGE --explain OUT.png` writes one picture of the documented layout."""
    import argparse
    import shutil

    from vedrt.runtime import cli as caption_cli

    parser = argparse.ArgumentParser()
    caption_cli.add_arguments(parser)
    assert "--explain" in parser.format_help()

    from tiny_models import VOCAB
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from vedrt.cli import main

    # The tiny export has no tokenizer; a word-level one over its 96 ids is enough to caption.
    export_dir = tmp_path / "export"
    shutil.copytree(exported("vit", "gpt2")[1], export_dir)
    Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3")).save(
        str(export_dir / "tokenizer.json")
    )
    image = tmp_path / "in.png"
    Image.new("RGB", (50, 40), "white").save(image)
    out = tmp_path / "map.png"
    assert (
        main(
            [
                "caption",
                str(image),
                "--model",
                str(export_dir),
                "--explain",
                str(out),
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    with Image.open(out) as im:
        pw, ph = panel_size((50, 40), 128)
        assert im.format == "PNG" and im.size[1] == ph + LABEL_H + 2 * PAD
