"""Writing outputs so that nothing is ever half-written: every file and folder goes to a temporary
sibling first and is renamed into place; plus the up-front check that an output location is writable."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from diffimmune.errors import DiffImmuneError


def ensure_writable_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `folder` if needed and check it can be written; a clear error otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DiffImmuneError(
            f"cannot create {what} {folder} ({error.strerror}); choose a writable path"
        ) from None
    probe = folder / f".write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise DiffImmuneError(
            f"{what} {folder} is not writable ({error.strerror}); choose a writable path"
        ) from None
    return folder


def _temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}"


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike):
    """Yield a temporary sibling folder; on success it replaces `target` whole, on failure it vanishes."""
    target = Path(target)
    ensure_writable_folder(target.parent)
    temporary = _temporary_sibling(target)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    previous = _temporary_sibling(target, "old")
    if target.exists():
        os.replace(target, previous)
    os.replace(temporary, target)
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike):
    """Yield a temporary path to write; it is renamed onto `target` only if the block succeeds."""
    target = Path(target)
    ensure_writable_folder(target.parent)
    temporary = _temporary_sibling(target)
    try:
        yield temporary
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, target)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def read_json(path: str | os.PathLike, fix: str):
    """Parse a JSON file; a syntax error names the file, the problem and `fix`."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DiffImmuneError(f"{path} is not valid JSON ({error.msg}); {fix}") from None
