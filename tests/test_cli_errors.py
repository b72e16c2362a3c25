"""The command line ends in one line, never a traceback (issue #9, defect 8): missing extras in a
runtime-only install, a closed or full stdout, an attention map that cannot be written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IMAGES = [str(ROOT / "examples" / f"scene{i}.png") for i in (1, 2, 3)]
# A runtime-only install, simulated: these imports fail as if the packages were not there.
RUNTIME_ONLY = """
import sys
for name in ("torch", "transformers", "onnx", "onnxscript", "accelerate", "sacrebleu", "psutil",
             "optimum", "tensorrt", "starlette", "uvicorn", "prometheus_client"):
    sys.modules[name] = None
from vedrt.cli import main
sys.exit(main(sys.argv[1:]))
"""
FULL = "import sys\nfrom vedrt.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def _vedrt(*args: str, runtime_only: bool = False, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = RUNTIME_ONLY if runtime_only else FULL
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        **({"capture_output": True} | kwargs),
    )


@pytest.mark.parametrize(
    "args,extra",
    [
        (["train", "--out", "never-written"], "vedrt[train]"),
        (["eval"], "vedrt[train]"),
        (["eval", "--checkpoint", "checkpoints/scenes"], "vedrt[train]"),
        (["bench"], "vedrt[export,bench]"),
        (["export", "checkpoints/scenes", "never-written"], "vedrt[export]"),
        (["serve", "--port", "0"], "vedrt[serve]"),
    ],
)
def test_missing_extras_are_named_in_one_line(args, extra) -> None:
    result = _vedrt(*args, runtime_only=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and extra in lines[0] and "Traceback" not in result.stderr
    assert "-c .ci/constraints.txt" in lines[0]  # a clone installs with CI's pins
    assert result.stdout == ""  # nothing ran: eval printed no scores, export no stages
    assert not (ROOT / "never-written").exists()


def test_export_help_without_onnx() -> None:
    result = _vedrt("export", "--help", runtime_only=True)
    assert result.returncode == 0 and "--overwrite" in result.stdout and result.stderr == ""


def test_serve_help_without_the_serve_extra() -> None:
    result = _vedrt("serve", "--help", runtime_only=True)
    assert result.returncode == 0 and "--max-pixels" in result.stdout and result.stderr == ""


def test_captioning_with_a_text_model_says_to_use_generate() -> None:
    result = _vedrt("caption", "--model", "vedrt/models/text", IMAGES[0], runtime_only=True)
    assert result.returncode == 2 and "is a text model: use `vedrt generate`" in result.stderr


def test_caption_still_works_in_a_runtime_only_install() -> None:
    result = _vedrt("caption", IMAGES[0], runtime_only=True)
    assert result.returncode == 0 and result.stdout.startswith(IMAGES[0] + "\t")


def test_version() -> None:
    from vedrt import __version__

    result = _vedrt("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"vedrt {__version__}"


def test_closed_stdout_ends_quietly() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", FULL, "caption", *IMAGES],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    proc.stdout.close()  # `| head -0`: the reader is gone before the first caption
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert proc.returncode == 141 and err == ""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_stdout_is_one_line() -> None:
    with open("/dev/full", "w") as full:
        result = _vedrt(
            "caption", *IMAGES, stdout=full, capture_output=False, stderr=subprocess.PIPE
        )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "No space left on device" in lines[0]


def test_unwritable_explain_path_keeps_the_captions() -> None:
    result = _vedrt("caption", "--explain", "/nonexistent/a.png", *IMAGES[:2])
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == IMAGES[:2]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "/nonexistent/a.png" in lines[0] and "Traceback" not in lines[0]
    assert result.returncode == 1


def test_closed_stdout_is_an_error_not_silence() -> None:
    """Started with stdout closed (`>&-`), print() writes nowhere: every caption would be lost
    with exit 0."""
    result = _vedrt("caption", IMAGES[0], stdout=None, preexec_fn=lambda: os.close(1))
    assert result.returncode == 2
    assert "stdout is closed" in result.stderr


def test_text_model_eval_runs_in_a_runtime_only_install() -> None:
    """Its exact match needs neither sacrebleu nor torch (the README gives it as the runtime's
    own check; it asked for the train extra)."""
    result = _vedrt("eval", "--model", "vedrt/models/text", "--beams", "1", runtime_only=True)
    assert result.returncode == 0, result.stderr
    assert "held-out exact match 1.000 (beam 1, 117 captions)" in result.stdout


def test_serve_on_a_port_in_use_is_one_line() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _vedrt("serve", "--port", str(port))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"vedrt serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_generate_defaults_to_the_shipped_text_model() -> None:
    text = "a small red circle above a large blue square"
    given = _vedrt("generate", "--model", "vedrt/models/text", text, runtime_only=True)
    default = _vedrt("generate", text, runtime_only=True)
    assert default.returncode == 0 and default.stdout == given.stdout
    assert default.stdout.startswith(text + "\t")


def test_export_of_a_missing_folder_is_one_line_before_any_stage() -> None:
    result = _vedrt("export", "no-such-checkpoint", "never-written")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "vedrt export: error: model directory not found: no-such-checkpoint"
    ]
    assert not (ROOT / "never-written").exists()
