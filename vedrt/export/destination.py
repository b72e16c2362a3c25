"""Where an export lands: checks on the destination, the temporary directory, the final move.

The rule throughout is that vedrt never deletes what it did not write. `--overwrite` replaces only
a directory that is itself a vedrt export (a vedrt.json, and no file vedrt does not write) and that
does not hold the checkpoint being exported. Temporary directories carry the exporting process's id, so
the next export into the same parent can tell a killed run's leftovers (removed) from a running
export's work in progress (left alone and reported).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

MANIFEST = "vedrt.json"
# What an export directory holds: vedrt's files, the checkpoint's configs, the tokenizer files
# transformers saves, and `vedrt build`'s engines. --overwrite refuses a directory with anything else.
WRITTEN = {
    MANIFEST,
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "tensorrt.json",
}
WRITTEN_PATTERNS = ("*.onnx", "*.onnx.data", "*.engine")


class DestinationError(ValueError):
    """The destination cannot be used; the message is one line for the user."""


def check(out: Path, overwrite: bool, source: Path | None) -> None:
    """Refuse, before any work, a destination the export must not write or replace."""
    if out.is_symlink():
        raise DestinationError(
            f"output path {out} is a symbolic link: give the directory it points to"
        )
    if out.exists() and not out.is_dir():
        raise DestinationError(f"output path exists and is not a directory: {out}")
    if source is not None and _contains(out, source):
        what = "is the checkpoint" if _same(out, source) else "contains the checkpoint"
        raise DestinationError(f"output directory {out} {what} being exported ({source})")
    if not out.is_dir():
        return
    if not os.access(out, os.W_OK | os.X_OK) or not os.access(out.parent, os.W_OK | os.X_OK):
        raise DestinationError(f"output directory {out} (or its parent) is not writable")
    entries = list(out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise DestinationError(
            f"output directory {out} is not empty (to replace a previous export: --overwrite, "
            "or overwrite=True from Python)"
        )
    if not (out / MANIFEST).is_file():
        raise DestinationError(
            f"--overwrite replaces only a vedrt export directory; {out} has no {MANIFEST}, "
            "so it is left untouched (choose an empty or new directory)"
        )
    others = sorted(p.name for p in entries if not _written_by_vedrt(p))
    if others:
        raise DestinationError(
            f"--overwrite refused: {out} holds files vedrt does not write "
            f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}), so it is left untouched"
        )


def _written_by_vedrt(path: Path) -> bool:
    """A file `vedrt export` or `vedrt build` writes into an export directory."""
    if path.is_dir() and not path.is_symlink() and path.name == "encoder_tokenizer":
        return all(_written_by_vedrt(p) for p in path.iterdir())
    if path.is_symlink() or not path.is_file():
        return False
    return path.name in WRITTEN or any(fnmatch.fnmatch(path.name, p) for p in WRITTEN_PATTERNS)


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _contains(out: Path, source: Path) -> bool:
    """True if `out` is `source` or one of its ancestors (replacing it would delete the source)."""
    out_real, src_real = out.resolve(), source.resolve()
    return src_real == out_real or out_real in src_real.parents


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[^/]*$")
_OLD_STYLE = re.compile(r"^\..+\.partial-[a-z0-9_]{8}$")  # vedrt 0.1's, without a process id


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_leftovers(out: Path) -> list[str]:
    """Remove temporary directories of killed exports beside `out`; say what was left alone.

    Only `.NAME.partial-PID-*` directories, which vedrt writes, are removed, and only when process
    PID is gone: a running export's directory is reported, not touched. A `.NAME.old-PID-*`
    directory holds a previous export moved aside by a run killed mid-swap, and an older vedrt's
    `.NAME.partial-XXXXXXXX` carries no process id: both are reported, never removed.
    """
    notes = []
    if not out.parent.is_dir():
        return notes
    for path in sorted(out.parent.iterdir()):
        if path.is_symlink() or not path.is_dir():
            continue
        match = _LEFTOVER.match(path.name)
        if match is None:
            if _OLD_STYLE.match(path.name):
                notes.append(
                    f"{path} looks like an interrupted export's; remove it if no export is running"
                )
            continue
        if _alive(int(match["pid"])):
            notes.append(f"left {path} alone: process {match['pid']} (an export?) is running")
        elif match["kind"] == "old":
            notes.append(f"{path} holds a previous export moved aside by an interrupted export")
        else:
            shutil.rmtree(path, ignore_errors=True)
            state = "could not remove" if path.exists() else "removed"
            notes.append(f"{state} {path}, left by an interrupted export")
    return notes


def make_temp(out: Path) -> Path:
    """An empty directory beside `out`, named so that a later export can clean it up."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(tmp: Path, out: Path) -> None:
    """Give the finished files the modes a plain `cp` would (0644/0755 under umask 022).

    mkdtemp creates 0700 and some writers 0600; an export is meant to be read by a server that may
    run as another account. An existing empty destination keeps its own mode.
    """
    mask = _umask()
    for root, dirs, files in os.walk(tmp):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
    if out.is_dir() and not any(out.iterdir()):
        os.chmod(tmp, stat.S_IMODE(out.stat().st_mode))
    else:
        os.chmod(tmp, 0o777 & ~mask)


def move_into_place(tmp: Path, out: Path) -> None:
    """Swap the finished directory in; an old export is removed only after the new one is there."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.replace(out, old / "export")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
