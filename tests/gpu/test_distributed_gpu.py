"""GPU checks of DeepSpeed ZeRO and transformers' expert parallelism (skipped without CUDA; the CPU versions are
``tests/test_deepspeed.py`` and ``tests/test_expert_parallel.py``, whose helpers these reuse).

DeepSpeed runs on as many GPUs as there are, up to 2 (one process per GPU: NCCL cannot put two ranks on one GPU),
with the same global batch as the one-process reference; expert parallelism needs 2 GPUs.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_deepspeed import (  # noqa: F401  (fixtures)
    CONFIGS,
    NEEDS_DEEPSPEED,
    check_checkpoint,
    make_spec,
    one_process,
    run_workers,
    tiny_dense,
)
from tests.test_expert_parallel import CASES, check_two_process_case, launch_two_processes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# GPU kernels sum in other orders than the CPU reference; TF32 is off for fp32 matmuls by default.
GPU_LOSS_TOLERANCE = 1e-4
GPU_LOGITS_TOLERANCE = dict(atol=1e-3, rtol=1e-3)
BF16_LOSS_TOLERANCE = 3e-2


@pytest.mark.parametrize("name,bf16", [("zero2", False), ("zero3", False), ("zero3", True)])
def test_deepspeed_on_gpus_matches_one_process(name, bf16, tmp_path, tiny_dense, one_process):  # noqa: F811
    pytest.importorskip("deepspeed", reason=NEEDS_DEEPSPEED)
    processes = min(2, torch.cuda.device_count())
    spec = make_spec(tmp_path / name, tiny_dense, str(CONFIGS[name]), 2, accumulation=2 // processes, cpu=False)
    spec["bf16"] = bf16
    result = run_workers(spec, processes=processes)
    assert result["world_size"] == processes
    tolerance = BF16_LOSS_TOLERANCE if bf16 else GPU_LOSS_TOLERANCE
    assert result["losses"] == pytest.approx(one_process["losses"], rel=tolerance)
    if not bf16:  # a bf16 checkpoint holds rounded weights: its logits are checked by the loss above only
        check_checkpoint(tmp_path / name, one_process["folder"], GPU_LOGITS_TOLERANCE, GPU_LOGITS_TOLERANCE)


@pytest.fixture(scope="module")
def two_gpu_run(tmp_path_factory):
    if torch.cuda.device_count() < 2:
        pytest.skip("expert parallelism on GPUs needs 2 GPUs (one rank per GPU)")
    root = tmp_path_factory.mktemp("expert_parallel_gpu")
    return root, launch_two_processes(root, cpu=False)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_expert_parallel_on_two_gpus(two_gpu_run, case):
    check_two_process_case(*two_gpu_run, case, GPU_LOGITS_TOLERANCE, GPU_LOGITS_TOLERANCE)
