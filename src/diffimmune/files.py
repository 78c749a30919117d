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
    for attempt in range(3):  # another process may replace the same folder at the same moment
        shutil.rmtree(previous, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(target, previous)
        try:
            os.replace(temporary, target)
            break
        except OSError:  # the other process's folder landed in between: set it aside too, and again
            if attempt == 2:
                shutil.rmtree(temporary, ignore_errors=True)
                raise
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


def replace_other_run(
    record_path: Path,
    record: dict,
    resume: bool,
    *,
    what: str,
    resumable: set[str],
    clear: list[Path],
    added: dict | None = None,
) -> None:
    """A run folder whose record (`{"config": ..., "model": ...}` at `record_path`) holds other settings,
    or another model, is never resumed: its checkpoints would pass for this run's. With `resume` that is
    an error naming the changed fields; without, the folders and files in `clear` are removed. Fields in
    `resumable` may differ; fields in `added` (added to the config later) read as their old value where an
    older record lacks them."""
    if not record_path.is_file():
        return
    previous = json.loads(record_path.read_text())
    added = added or {}
    old, new = previous.get("config", {}), record["config"]
    changed = sorted(
        k for k in set(old) | set(new) if old.get(k, added.get(k)) != new.get(k) and k not in resumable
    )
    if previous.get("model") != record["model"]:
        changed.insert(0, "model")
    if not changed:
        return
    if resume:
        raise DiffImmuneError(
            f"{record_path.parent} holds {what} with other settings ({', '.join(changed)}); give another "
            "--out, or --no-resume to replace it"
        )
    for path in clear:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
