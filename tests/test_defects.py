"""Runtime defects of issue #9: each test failed before its fix (explain with beams, images,
option validation, manifest consistency, the caption command's output handling)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


# --- 2: --explain with beam search -------------------------------------------------------------


def test_explain_with_beam_search_uses_the_chosen_beams_rows(exported) -> None:
    torch = pytest.importorskip("torch")
    from vedrt.runtime import load
    from vedrt.runtime.explain import token_maps

    shared, export_dir = exported("vit", "gpt2")
    model = copy.deepcopy(shared)
    model.set_attn_implementation("eager")
    model.generation_config.eos_token_id = 5  # sequences end early, at different steps
    model.generation_config.pad_token_id = 5
    gen = load(export_dir, threads=1)
    pv = np.random.RandomState(7).randn(3, 3, 32, 32).astype(np.float32)
    kwargs = dict(num_beams=4, max_new_tokens=8, eos_token_id=5, pad_token_id=5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(
            pixel_values=torch.from_numpy(pv),
            output_attentions=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    ours = gen.generate(pv, return_dict=True, output_attentions=True, **kwargs)
    ref_att = [[a.numpy() for a in layers] for layers in ref.cross_attentions]
    ref_idx = ref.beam_indices.numpy()
    for i in range(3):
        steps = int((ref_idx[i] >= 0).sum())
        rows = [int(r) for r in ours.beam_indices[i, :steps]]
        assert rows == [int(r) for r in ref_idx[i, :steps]]
        ours_maps = token_maps(ours.cross_attentions, grid=(4, 4), rows=rows)
        ref_maps = token_maps(ref_att, grid=(4, 4), rows=rows)
        assert ours_maps.shape == (steps, 4, 4)
        np.testing.assert_allclose(ours_maps, ref_maps, atol=1e-4)


def test_caption_explain_with_beams_on_the_shipped_model(tmp_path, capsys) -> None:
    from vedrt.cli import main

    out = tmp_path / "att.png"
    images = [str(EXAMPLES / "scene1.png"), str(EXAMPLES / "scene2.png")]
    assert main(["caption", "--explain", str(out), "--num-beams", "4", *images]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == images
    assert out.is_file() and (tmp_path / "att-2.png").is_file()
