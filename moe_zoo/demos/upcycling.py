"""The moe_zoo demo: upcycle the real SmolLM2-135M-Instruct into an MoE and show that nothing changed.

Steps (all offline, CPU, a few minutes at most):

1. load SmolLM2-135M-Instruct from the pip-shipped asset (:func:`moe_zoo.assets.smollm2_path`);
2. upcycle it with :func:`moe_zoo.upcycle` under a fixed seed and print total vs. active parameters per token;
3. check the MoE's logits match the dense model's on a real chat prompt (max abs difference <= 1e-5 times the
   largest |logit|, see :data:`FUNCTION_PRESERVING_RTOL`), and that the same upcycling done in float64, where
   float32's rounding is gone, matches to :data:`FLOAT64_TOLERANCE`;
4. save it with ``save_pretrained`` (atomically) plus the tokenizer, reload it with
   ``AutoModelForCausalLM.from_pretrained`` and check the reloaded logits equal the saved model's;
5. answer the chat prompt greedily with the dense and the reloaded MoE model; the answers must be identical.

Every check raises :class:`~moe_zoo.demos.DemoCheckError` when it fails. Run it with ``moe-zoo upcycle-demo`` or
``python -m moe_zoo.demos.upcycling``.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

# Importing anything from moe_zoo runs moe_zoo/__init__.py, which registers the moe_zoo architectures with
# transformers' Auto classes, so AutoModelForCausalLM can reload the saved MoE below.
from ..assets import smollm2_path
from ..atomic_io import atomic_directory
from ..modeling.upcycled_moe import UpcycledMoeForCausalLM, max_logit_difference, upcycle
from . import check

DEFAULT_OUTPUT_DIR = "outputs/smollm2-moe"
DEFAULT_PROMPT = "What is the capital of France?"
FUNCTION_PRESERVING_RTOL = 1e-5
"""Largest max-abs logit difference accepted between the dense model and its upcycled MoE (float32), relative to
the largest |logit| of the dense model on the same prompt.

Why relative: an absolute 1e-5 is below SmolLM2's own float32 noise. Its hidden states carry "massive activations"
(about 2.5e4 from layer 12 on, where one float32 ulp is 2e-3), so rounding-level changes move its logits by ~5e-5:
the dense model alone differs from itself by 4.4e-5 when three tokens are appended to the prompt (the logits of the
prefix are mathematically unchanged) and by 8.2e-5 between sdpa and eager attention. An upcycled MoE adds the same
kind of rounding (top-k weights that sum to 1 only up to an ulp; experts run on subsets of the tokens) and lands at
6e-5 to 1.4e-4 for SmolLM2 (about 2e-6 to 4e-6 of the logit scale, ~38), while changing one expert moves the
logits by ~0.5.
"""

FLOAT64_TOLERANCE = 1e-9
"""Largest max-abs logit difference accepted when the same upcycling is done in float64."""


@dataclass
class ParameterCounts:
    """Parameter counts of a model; ``active`` counts only the ``k`` of ``E`` routed experts used per token."""

    total: int
    active: int


@dataclass
class DemoResult:
    """What :func:`run_demo` measured."""

    output_dir: Path
    dense_parameters: ParameterCounts
    moe_parameters: ParameterCounts
    max_logit_difference: float
    reload_max_logit_difference: float
    dense_answer: str
    moe_answer: str


def parameter_counts(model: PreTrainedModel) -> ParameterCounts:
    """Total parameters (shared tensors counted once) and those active for one token.

    In each MoE block, only ``num_experts_per_tok`` of the ``num_experts`` experts run per token, so the expert bank
    contributes ``k / E`` of its parameters to the active count; routers, attention and embeddings are always active.
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    if isinstance(model, UpcycledMoeForCausalLM):
        for block in model.moe_blocks():
            bank = sum(p.numel() for p in block.experts.parameters())
            inactive += bank * (block.num_experts - block.top_k) // block.num_experts
    return ParameterCounts(total=total, active=total - inactive)


def chat_input_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> torch.Tensor:
    """Token ids (1, T) of a one-turn chat with the tokenizer's chat template, ending in the assistant header."""
    messages = [{"role": "user", "content": prompt}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return encoded["input_ids"]


@torch.no_grad()
def greedy_answer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor, max_new_tokens: int
) -> tuple[torch.Tensor, str]:
    """Greedy continuation of ``input_ids``: the new token ids and their decoded text."""
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = output[0, input_ids.shape[1] :]
    return new_tokens, tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


@torch.no_grad()
def _logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits.float()


def function_preserving_tolerance(dense: PreTrainedModel, input_ids: torch.Tensor) -> float:
    """The largest max-abs logit difference that still counts as "same function" on ``input_ids``:
    :data:`FUNCTION_PRESERVING_RTOL` times the dense model's largest |logit| there (see that constant for why)."""
    return FUNCTION_PRESERVING_RTOL * _logits(dense, input_ids).abs().max().item()


def float64_logit_difference(
    dense: PreTrainedModel,
    input_ids: torch.Tensor,
    num_experts: int,
    top_k: int,
    moe_layers: str | list[int],
    seed: int,
) -> float:
    """Upcycle a float64 copy of ``dense`` the same way and return the max |logit difference|: without float32's
    rounding the upcycled model must equal the dense one (to :data:`FLOAT64_TOLERANCE`)."""
    dense64 = copy.deepcopy(dense).double()
    torch.manual_seed(seed)
    moe64 = upcycle(dense64, num_experts=num_experts, num_experts_per_tok=top_k, moe_layers=moe_layers)
    moe64.set_experts_implementation("eager")  # transformers' grouped kernels take no float64
    return max_logit_difference(dense64, moe64, input_ids)


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: Path) -> None:
    """``save_pretrained`` of model and tokenizer into ``output_dir``, atomically (a temp folder, then a rename)."""
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _print_parameters(dense: ParameterCounts, moe: ParameterCounts, num_experts: int, top_k: int) -> None:
    print("Parameters (embeddings included, tied ones counted once):")
    print(f"  dense SmolLM2:            {dense.total / 1e6:8.1f}M")
    print(f"  MoE total:                {moe.total / 1e6:8.1f}M  ({moe.total / dense.total:.2f}x dense)")
    print(f"  MoE active per token:     {moe.active / 1e6:8.1f}M  (top-{top_k} of {num_experts} experts)")


def run_demo(
    output_dir: str | Path = DEFAULT_OUTPUT_DIR,
    num_experts: int = 4,
    top_k: int = 2,
    moe_layers: str | list[int] = "sparse",
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 24,
    seed: int = 0,
) -> DemoResult:
    """Upcycle SmolLM2-135M-Instruct, check it is function-preserving, save, reload and chat with it.

    Prints each step and returns the measurements; raises :class:`DemoCheckError` if a check fails.
    """
    output_dir = Path(output_dir)
    model_dir = smollm2_path()
    print(f"[1/5] Loading SmolLM2-135M-Instruct from {model_dir}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    print(f"[2/5] Upcycling: {num_experts} experts, top-{top_k}, moe_layers={moe_layers!r}, seed {seed}")
    torch.manual_seed(seed)
    moe = upcycle(dense, num_experts=num_experts, num_experts_per_tok=top_k, moe_layers=moe_layers).eval()
    print(f"  MoE layers: {moe.config.moe_layer_indices} of {moe.config.num_hidden_layers}")
    dense_counts, moe_counts = parameter_counts(dense), parameter_counts(moe)
    _print_parameters(dense_counts, moe_counts, num_experts, top_k)

    input_ids = chat_input_ids(tokenizer, prompt)
    difference = max_logit_difference(dense, moe, input_ids)
    tolerance = function_preserving_tolerance(dense, input_ids)
    print(
        f"[3/5] Max |logit difference| dense vs. MoE on the chat prompt ({input_ids.shape[1]} tokens): "
        f"{difference:.3e} (tolerance {tolerance:.3e} = {FUNCTION_PRESERVING_RTOL:.0e} x max |logit|)"
    )
    check(
        difference <= tolerance,
        f"Upcycling is not function-preserving: max |logit difference| {difference:.3e} > {tolerance:.3e}.",
    )
    exact_difference = float64_logit_difference(dense, input_ids, num_experts, top_k, moe_layers, seed)
    print(f"  The same upcycling in float64 (no float32 rounding): max |logit difference| {exact_difference:.3e}")
    check(
        exact_difference <= FLOAT64_TOLERANCE,
        f"Upcycling in float64 is not function-preserving: {exact_difference:.3e} > {FLOAT64_TOLERANCE:.0e}.",
    )

    print(f"[4/5] Saving to {output_dir} and reloading with AutoModelForCausalLM.from_pretrained")
    _save(moe, tokenizer, output_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32).eval()
    check(
        isinstance(reloaded, UpcycledMoeForCausalLM),
        f"AutoModelForCausalLM loaded a {type(reloaded).__name__}, not an UpcycledMoeForCausalLM.",
    )
    reload_difference = (_logits(moe, input_ids) - _logits(reloaded, input_ids)).abs().max().item()
    print(f"  Max |logit difference| saved vs. reloaded: {reload_difference:.3e}")
    check(reload_difference == 0.0, f"The reloaded model's logits differ from the saved one's by {reload_difference}.")
    del moe

    print(f"[5/5] Chat (greedy, up to {max_new_tokens} new tokens): {prompt!r}")
    dense_tokens, dense_answer = greedy_answer(dense, tokenizer, input_ids, max_new_tokens)
    moe_tokens, moe_answer = greedy_answer(reloaded, tokenizer, input_ids, max_new_tokens)
    print(f"  dense: {dense_answer}")
    print(f"  MoE:   {moe_answer}")
    check(torch.equal(dense_tokens, moe_tokens), "The dense and the MoE model generated different tokens.")
    print("All checks passed: the upcycled MoE computes the same function as SmolLM2.")
    return DemoResult(
        output_dir=output_dir,
        dense_parameters=dense_counts,
        moe_parameters=moe_counts,
        max_logit_difference=difference,
        reload_max_logit_difference=reload_difference,
        dense_answer=dense_answer,
        moe_answer=moe_answer,
    )


if __name__ == "__main__":
    from ..cli import main

    raise SystemExit(main(["upcycle-demo", *sys.argv[1:]]))
