"""`vedrt export` never deletes what it did not write, cleans up after signals, and writes files
that other accounts can read (issue #9, defects 1, 6 and 7)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import tiny_model

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "ck"
    tiny_model("vit", "gpt2").save_pretrained(path)
    return path


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_overwrite_refuses_a_directory_holding_the_checkpoint(tmp_path, checkpoint, capsys):
    from vedrt.cli import main

    box = tmp_path / "sb"
    box.mkdir()
    import shutil

    shutil.copytree(checkpoint, box / "ck")
    (box / "notes.txt").write_text("x\n")
    before = _tree(box)
    assert main(["export", "--overwrite", "--no-validate", str(box / "ck"), str(box)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "contains the checkpoint" in err[0]
    assert main(["export", "--overwrite", "--no-validate", str(box / "ck"), str(box / "ck")]) == 2
    assert "is the checkpoint" in capsys.readouterr().err
    assert _tree(box) == before


def test_overwrite_refuses_what_is_not_a_vedrt_export(tmp_path, checkpoint, capsys):
    from vedrt.cli import main

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    assert main(["export", "--overwrite", "--no-validate", str(checkpoint), str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no vedrt.json" in err[0]
    # a vedrt.json does not make a directory holding other files (or folders) an export
    (other / "vedrt.json").write_text("{}")
    (other / "data").mkdir()
    (other / "data" / "keep.bin").write_bytes(b"1")
    assert main(["export", "--overwrite", "--no-validate", str(checkpoint), str(other)]) == 2
    err = capsys.readouterr().err
    assert "left untouched" in err and "data, notes.txt" in err
    assert (other / "notes.txt").read_text() == "mine\n" and (other / "data" / "keep.bin").exists()
    # a real export is replaced
    out = tmp_path / "out"
    assert main(["export", "--no-validate", str(checkpoint), str(out)]) == 0
    assert main(["export", "--overwrite", "--no-validate", str(checkpoint), str(out)]) == 0
    assert (out / "vedrt.json").is_file()
    (out / "my-notes.txt").write_text("mine\n")  # a user's file in an export: kept, refused
    assert main(["export", "--overwrite", "--no-validate", str(checkpoint), str(out)]) == 2
    assert "my-notes.txt" in capsys.readouterr().err and (out / "my-notes.txt").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_modes_follow_the_umask(tmp_path, checkpoint):
    from vedrt.export import export_model

    old = os.umask(0o022)
    try:
        export_model(checkpoint, tmp_path / "out", validate=False)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_empty_read_only_target_keeps_its_mode(tmp_path, checkpoint):
    from vedrt.export import ExportError, export_model

    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o555)
    try:
        try:  # refused as not writable (a normal user), or written keeping the mode (root)
            export_model(checkpoint, target, validate=False)
        except ExportError as exc:
            assert "not writable" in str(exc)
        assert stat.S_IMODE(target.stat().st_mode) == 0o555
    finally:
        target.chmod(0o755)


SLOW_EXPORT = """
import sys, time
from vedrt.export import exporter
real = exporter.fuse_graphs
def slow(tmp):
    print("PARTIAL", flush=True)
    time.sleep(60)
    return real(tmp)
exporter.fuse_graphs = slow
from vedrt.cli import main
sys.exit(main(["export", "--no-validate", sys.argv[1], sys.argv[2]]))
"""


def _start_slow_export(checkpoint: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_EXPORT, str(checkpoint), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 240
    line = ""
    while "PARTIAL" not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert "PARTIAL" in line, proc.stderr.read() if proc.poll() is not None else "timeout"
    return proc


def _partials(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


def test_sigterm_removes_the_temporary_directory(tmp_path, checkpoint):
    proc = _start_slow_export(checkpoint, tmp_path / "out")
    assert len(_partials(tmp_path)) == 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_next_export_cleans_what_a_killed_export_left(tmp_path, checkpoint):
    from vedrt.export import export_model

    proc = _start_slow_export(checkpoint, tmp_path / "out")
    proc.kill()
    proc.communicate(timeout=60)
    stale = _partials(tmp_path)
    assert len(stale) == 1
    live = tmp_path / f".out.partial-{os.getpid()}-abc"  # a running export's: not touched
    live.mkdir()
    unrelated = tmp_path / ".out.partial-notes"  # not vedrt's naming: not touched
    unrelated.mkdir()
    older = tmp_path / ".x.partial-ab12cd34"  # an older vedrt's, without a pid: reported
    older.mkdir()
    # the next export into the same folder, under another name, cleans up
    report = export_model(checkpoint, tmp_path / "other", validate=False)
    assert sorted(_partials(tmp_path)) == sorted([live.name, unrelated.name, older.name])
    assert any("removed" in w and stale[0] in w for w in report.warnings)
    assert any("left" in w and live.name in w for w in report.warnings)
    assert any(older.name in w for w in report.warnings)
    assert not any(unrelated.name in w for w in report.warnings)


@pytest.mark.parametrize(
    "damage, words",
    [
        ("weights", "cannot load"),  # a truncated model.safetensors (SafetensorError)
        ("config-list", "not a JSON object"),
        ("shapes", "cannot load"),  # a config whose sizes the weights do not have
        ("processor", "corrupt image processor config"),  # every caption would have failed
        ("opset", "opsets 18 to 23"),
    ],
)
def test_a_bad_checkpoint_is_one_line_and_nothing_is_written(
    tmp_path, checkpoint, capsys, damage, words
):
    """Each was a traceback, or (the image processor) an export every caption then failed on."""
    import json
    import shutil

    from vedrt.cli import main

    source = tmp_path / "ck"
    shutil.copytree(checkpoint, source)
    extra = []
    if damage == "weights":
        data = (source / "model.safetensors").read_bytes()
        (source / "model.safetensors").write_bytes(data[:3000])
    elif damage == "config-list":
        (source / "config.json").write_text("[1, 2]")
    elif damage == "shapes":
        config = json.loads((source / "config.json").read_text())
        config["decoder"]["n_embd"] *= 2
        (source / "config.json").write_text(json.dumps(config))
    elif damage == "processor":
        (source / "preprocessor_config.json").write_text("{bad")
    else:
        extra = ["--opset", "24"]
    assert main(["export", str(source), str(tmp_path / "out"), "--no-validate", *extra]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
