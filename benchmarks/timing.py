"""What every benchmark times the same way: a module's forward and forward+backward, run round-robin.

Benchmarks import it as a sibling module (``python benchmarks/bench_x.py`` puts ``benchmarks/`` on ``sys.path``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

try:
    import resource
except ImportError:  # not on Unix
    resource = None
from pathlib import Path
from unittest import mock

import torch
from torch import nn


class WithEnvironment(nn.Module):
    """``module`` run with environment variables set during its forward (the backward runs what the forward chose:
    moe_zoo reads its switches when it routes): moe_zoo's experts with one of its kernel switches set."""

    def __init__(self, module: nn.Module, **variables: str):
        super().__init__()
        self.module, self.variables = module, variables

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with mock.patch.dict(os.environ, self.variables):
            return self.module(x)


def forward_steps(module: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    """``forward_ms`` (no grad) and ``forward_backward_ms`` (the input requires grad; a tuple output's first item is
    the one differentiated; gradients are dropped after each run)."""

    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        inputs = x.detach().requires_grad_(True)
        out = module(inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
        module.zero_grad(set_to_none=True)

    return {"forward_ms": forward, "forward_backward_ms": forward_backward}


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously; a CPU step is done when it returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up, each waited for on ``device``."""
    times = []
    for index in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if index:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_step(model: nn.Module, batch: dict, **options) -> Callable[[], None]:
    """A step that runs ``model(**batch, **options)`` without gradients (a whole model's forward, by keywords)."""

    def step() -> None:
        with torch.no_grad():
            model(**batch, **options)

    return step


def smollm2_width_llama(hidden: int, intermediate: int, layers: int, vocab: int, **config) -> nn.Module:
    """A seeded Llama in eval mode with SmolLM2-135M's head layout at the given width (64-wide heads, a key-value
    head per three query heads), which the model-level benchmarks share."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    options = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 192),
    )
    return LlamaForCausalLM(LlamaConfig(**{**options, **config})).eval()


def saved_for_backward_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensor storages autograd keeps for the backward of one forward (parameters excluded):
    the activation memory of a training step, measurable on CPU, where torch keeps no peak-memory counter."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    inputs = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = module(inputs)
    del out
    return sum(storages.values())


def interleaved_step_medians(
    steps: dict[str, dict[str, Callable[[], None]]], repeats: int, count_page_faults: bool = False
) -> dict:
    """Median times in ms of named steps (``{variant: {metric: fn}}``), run round-robin so that background load
    hits all of them alike; the first round warms up and is not counted.

    The order rotates every round, so each variant follows each other one equally often: what a step leaves behind
    (freed memory the next one must fault in again, caches) would otherwise always burden the same successor (on a
    VM one MoE step after a dense one measured 190 ms slower than after another MoE step).

    ``count_page_faults``: each variant's timing also holds ``page_faults`` (``{metric: median minor page faults per
    call}``), which tells allocator cost from arithmetic (on a VM a fault costs microseconds)."""
    samples = {name: {key: [] for key in fns} for name, fns in steps.items()}
    faults = {name: {key: [] for key in fns} for name, fns in steps.items()}
    names = list(steps)
    for round_index in range(repeats + 1):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            for key, fn in steps[name].items():
                faults_before = _minor_page_faults()
                start = time.perf_counter()
                fn()
                if round_index:
                    samples[name][key].append((time.perf_counter() - start) * 1e3)
                    faults[name][key].append(_minor_page_faults() - faults_before)
    results = {name: {key: statistics.median(v) for key, v in timing.items()} for name, timing in samples.items()}
    if count_page_faults:
        for name, timing in results.items():
            timing["page_faults"] = {key: int(statistics.median(v)) for key, v in faults[name].items()}
    return results


def _minor_page_faults() -> int:
    """This process's minor page faults so far (0 where ``resource`` is missing, i.e. off Unix)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def interleaved_medians(
    variants: dict[str, nn.Module],
    x: torch.Tensor,
    repeats: int,
    inputs: dict[str, torch.Tensor] | None = None,
    metrics: tuple[str, ...] = ("forward_ms", "forward_backward_ms"),
    count_page_faults: bool = False,
) -> dict:
    """:func:`interleaved_step_medians` of each module's :func:`forward_steps` (``metrics`` of them); ``inputs``
    gives some variants an input of their own (default: ``x``)."""
    inputs = inputs or {}
    steps = {}
    for name, module in variants.items():
        fns = forward_steps(module, inputs.get(name, x))
        steps[name] = {key: fns[key] for key in metrics}
    return interleaved_step_medians(steps, repeats, count_page_faults)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process, so that a freed tensor's pages are reused instead of being
    faulted in again: on a VM a page fault costs microseconds and the allocator's behaviour can then outweigh the
    arithmetic. Blocks up to 1 GiB come from the heap (a fixed ``M_MMAP_THRESHOLD``) and the heap is never trimmed.
    Turning ``mmap`` off altogether (``M_MMAP_MAX=0``) measured worse: 5-30k faults were left per MoE forward+backward,
    against none this way. Affects every contender alike; False if not glibc. The same from the shell:
    ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1099511627776``."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 2**30)) and bool(libc.mallopt(m_trim_threshold, 2**40))


def environment() -> dict:
    """What every benchmark's JSON records about where it ran."""
    return {
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }


def add_machine_options(parser: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--keep-freed-memory``, which every benchmark script takes (see :func:`run_measured`)."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory (no page faults for reused tensors); see timing.keep_freed_memory()",
    )


def run_measured(args: argparse.Namespace, run: Callable[[], dict]) -> dict:
    """``run()`` under the machine options of ``args``; its report gains the allocator used and the 1-minute load
    average before and after, which tell a quiet run from one that shared the cores."""
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report = run()
    report["allocator"] = "glibc keeps freed memory (mallopt)" if kept else "default"
    if load_before is not None:
        report["load_average_1min"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    return report


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
