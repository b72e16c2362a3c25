"""The README's Python example runs as written, from the repository root (issue #9, defect 9)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python_block(section: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)
    assert blocks, f"README section {section!r} has no python block"
    return blocks[0]


def test_generate_from_python_example_runs_as_written(monkeypatch, capsys) -> None:
    code = _python_block("Generate from Python")
    assert "gen.preprocess" in code and "threads=4" not in code
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102  (the point of the test)
    printed = capsys.readouterr().out
    assert "a small red circle" in printed
    assert namespace["ids"].shape[0] == 2 and namespace["out"].sequences_scores.shape == (2,)


def test_quick_start_shows_the_venv_and_version() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = text[text.index("## Quick start") : text.index("## Export your own")]
    assert "python3.11 -m venv .venv && . .venv/bin/activate" in quick
    assert "vedrt --version" in quick


def test_engine_example_runs_after_the_python_example(monkeypatch, capsys) -> None:
    """The engine snippet in "How it works" continues the "Generate from Python" session."""
    import numpy as np

    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    for section in ("Generate from Python", "How it works"):
        code = _python_block(section)
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102  (the point of the test)
    capsys.readouterr()
    gen, pixels = namespace["gen"], namespace["pixel_values"]
    np.testing.assert_array_equal(namespace["ids"], gen.generate(pixels, num_beams=4))
    assert namespace["engine"].idle()


def test_text_model_example_runs_as_written(monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    code = _python_block("Text models (EncoderDecoderModel)")
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102  (the point of the test)
    printed = capsys.readouterr().out
    assert "triangle green large ; circle yellow small ; left" in printed
