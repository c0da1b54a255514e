"""Atomic directory writes: build a folder under a temporary name next to its target, then rename it into place.

A reader therefore sees either no folder or a complete one, never a half-written one, even if the writer is
interrupted (Ctrl-C, out of memory, a killed CI job). Leftover temporary folders are named
``.<target name>.tmp-<random>`` so they can never be mistaken for the target itself.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_prefix(target: Path) -> str:
    """The name prefix of the temporary folders that :func:`atomic_directory` creates for ``target``."""
    return f".{target.name}.tmp-"


def remove_stale_temp_dirs(target: Path, max_age_s: float = 3600.0) -> list[Path]:
    """Delete temporary folders of ``target`` left by interrupted writes more than ``max_age_s`` seconds ago.

    Younger ones are kept: another process may still be writing them. Returns the folders removed.
    """
    removed = []
    if not target.parent.is_dir():
        return removed
    now = time.time()
    for candidate in target.parent.glob(temp_prefix(target) + "*"):
        if candidate.is_dir() and now - candidate.stat().st_mtime > max_age_s:
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def _move_into_place(source: Path, target: Path, keep_existing: Callable[[Path], bool] | None) -> None:
    """Rename ``source`` to ``target``. An existing ``target`` is moved aside and deleted, unless
    ``keep_existing(target)`` says to keep it, in which case ``source`` is left for the caller to delete."""
    if not target.exists():
        try:
            os.replace(source, target)
            return
        except OSError:
            if not target.exists():  # a failure unrelated to a concurrent writer
                raise
    if keep_existing is not None and keep_existing(target):
        return
    trash = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target) + "old-"))
    os.replace(target, trash / target.name)
    os.replace(source, target)
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_directory(target: str | os.PathLike, keep_existing: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; on a clean exit rename it to ``target``.

    If the ``with`` body raises (or is interrupted), the temporary folder is deleted and ``target`` is untouched.
    A ``target`` that exists at the end is replaced, unless ``keep_existing(target)`` returns True (e.g. because a
    concurrent writer already put a complete copy there): then the new folder is discarded.

    Example:
    ```python
    >>> with atomic_directory("outputs/model") as tmp:
    ...     model.save_pretrained(tmp)
    ```
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target)))
    tmp.chmod(0o755)  # mkdtemp makes it private (0700); the final folder should be an ordinary one
    try:
        yield tmp
        _move_into_place(tmp, target, keep_existing)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


WEIGHT_FILE_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
"""The weight files ``save_pretrained`` writes; stale ones from an earlier save with other sharding are removed."""


def save_files_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Run ``write(folder)`` into a temporary folder next to ``target``, then move each file into ``target``.

    Unlike :func:`atomic_directory` this keeps whatever else ``target`` holds (checkpoints, a tokenizer saved
    earlier), so it suits ``save_pretrained`` into a Trainer's output folder. Every file appears whole or not at
    all; weight files go first and ``config.json`` last, so a folder whose config is new has its new weights, and
    weight shards of an earlier save that the new one does not have are deleted.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target)))
    try:
        write(tmp)
        written = sorted(tmp.iterdir(), key=lambda path: path.name == "config.json")
        new_names = {path.name for path in written}
        for path in written:
            destination = target / path.name
            if path.is_dir():
                shutil.rmtree(destination, ignore_errors=True)
            os.replace(path, destination)
        for pattern in WEIGHT_FILE_PATTERNS:
            for stale in target.glob(pattern):
                if stale.name not in new_names:
                    stale.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename: readers see the old
    file or the new one, never half of it. Creates the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path))
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as file:
            file.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's files are private; give the file an ordinary file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["atomic_directory", "atomic_write_text", "remove_stale_temp_dirs", "save_files_atomically", "temp_prefix"]
