"""Launching a script in 2 CPU processes (gloo) for the multi-process tests: ``torchrun`` and ``accelerate launch``,
and a record of what each process wrote.

``torchrun(script, argv, cwd)`` and ``accelerate_launch(script, argv, cwd, options)`` run ``script`` unchanged under
the launcher, failing with the end of its output. With ``record=folder`` the launcher starts this file instead,
which installs an audit hook (:func:`sys.addaudithook`) and then runs ``script`` as ``__main__`` with the same
arguments: each process writes into ``folder/writes-<rank>.json`` the paths it created, opened for writing, renamed,
or deleted (:func:`writes_by_rank` reads them back), so a test can check that only the main process wrote a model
folder. Files that native code writes directly (safetensors' Rust writer) are seen through the ``os.replace`` /
``os.mkdir`` around them, which moe-zoo's atomic saves always make.

Also run directly (``python tests/distributed_launch.py script ...``): the same recording, one process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

RECORD_ENV = "MOE_ZOO_RECORD_WRITES"
"""The folder the recording wrapper writes ``writes-<rank>.json`` into (set by the launch helpers)."""

ACCELERATE_DDP = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
"""``accelerate launch`` options for 2-process DDP on a machine without GPUs (the script gets ``--use_cpu true``):
accelerate's ``--cpu`` starts a single process, ``--multi_gpu`` starts one per ``--num_processes`` and the Trainer
picks gloo on CPU."""

ACCELERATE_FSDP = [
    "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
    "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--fsdp_state_dict_type", "FULL_STATE_DICT",
    "--num_processes", "2", "--num_machines", "1",
]  # fmt: skip
"""``accelerate launch`` options for 2-process FSDP2 (full shard, each ``LlamaDecoderLayer`` its own unit)."""

_COMMON_ACCELERATE = ["--mixed_precision", "no", "--dynamo_backend", "no"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child_env(record: Path | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    env.pop(RECORD_ENV, None)
    if record is not None:
        Path(record).mkdir(parents=True, exist_ok=True)
        env[RECORD_ENV] = str(record)
    return env


def _target(script: Path, record: Path | None) -> list[str]:
    return [__file__, str(script)] if record is not None else [str(script)]


def _run(command: list[str], cwd: Path, record: Path | None, timeout: int) -> str:
    done = subprocess.run(command, cwd=cwd, env=_child_env(record), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout


def torchrun(
    script: Path,
    argv: Sequence[str],
    cwd: Path,
    extra: Sequence[str] = (),
    record: Path | None = None,
    timeout: int = 300,
) -> str:
    """Run ``script`` in 2 processes with ``torchrun`` (gloo on CPU); returns its stdout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return _run([*command, *_target(script, record), *argv, *extra], cwd, record, timeout)


def accelerate_launch(
    script: Path,
    argv: Sequence[str],
    cwd: Path,
    options: Sequence[str],
    record: Path | None = None,
    timeout: int = 300,
) -> str:
    """Run ``script`` with ``accelerate launch`` and ``options`` (:data:`ACCELERATE_DDP`, :data:`ACCELERATE_FSDP`)
    on this machine; returns its stdout."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *options, *_COMMON_ACCELERATE]
    command += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    return _run([*command, *_target(script, record), *argv], cwd, record, timeout)


def train_options(batch: int, steps: int) -> list[str]:
    """The Trainer options of the comparisons: ``steps`` SGD steps at a constant rate, per-device batch ``batch``,
    a log line per step, one checkpoint at the end, seed 0, CPU."""
    return [
        "--max_steps", str(steps), "--per_device_train_batch_size", str(batch), "--optim", "sgd",
        "--lr_scheduler_type", "constant", "--logging_steps", "1", "--save_steps", str(steps), "--seed", "0",
        "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
    ]  # fmt: skip


def fsdp_arguments(folder: Path, layer_classes: list[str]) -> list[str]:
    """transformers' FSDP options (FSDP2, full shard, each named transformer layer its own unit)."""
    config = Path(folder) / "fsdp_config.json"
    config.write_text(json.dumps({"version": 2, "transformer_layer_cls_to_wrap": layer_classes}))
    return ["--fsdp", "--fsdp_config", str(config)]  # bare --fsdp: full shard, transformer-layer auto-wrap


def logged_steps(checkpoint: Path, steps: int) -> list[dict]:
    """The training log lines in ``checkpoint``'s ``trainer_state.json``, checked to be one per step."""
    history = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["log_history"]
    lines = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in lines] == list(range(1, steps + 1))
    return lines


def check_launch_kind(checkpoint: Path, mode: str) -> None:
    """A DDP checkpoint has the Trainer's optimizer file; FSDP's has accelerate's FSDP files (so the model was
    sharded, not silently wrapped in DDP); both have one RNG state per process."""
    names = {path.name for path in Path(checkpoint).iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= names, (mode, names)
    if "fsdp" in mode:
        assert {"pytorch_model_fsdp.bin", "optimizer.bin"} <= names, names
    else:
        assert "optimizer.pt" in names and "pytorch_model_fsdp.bin" not in names, names


def compare_logs(single: list[dict], distributed: list[dict], mode: str, loss_atol: float, aux_atol: float) -> None:
    """Per step: ``loss`` within ``loss_atol`` and ``aux_loss`` within ``aux_atol`` of one process's; the step-1
    ``expert_load_max_ratio`` (same weights, same tokens, counts summed over processes) identical."""
    for one, many in zip(single, distributed, strict=True):
        step = one["step"]
        assert abs(one["loss"] - many["loss"]) <= loss_atol, (mode, step, one["loss"], many["loss"])
        assert abs(one["aux_loss"] - many["aux_loss"]) <= aux_atol, (mode, step, one["aux_loss"], many["aux_loss"])
    assert single[0]["expert_load_max_ratio"] == distributed[0]["expert_load_max_ratio"], mode


def compare_counts(single: dict[str, list[float]], distributed: dict[str, list[float]], mode: str, atol: int) -> None:
    """Each router's counts: the same total as one process's (every process's tokens counted once; rank 0 alone
    would hold about half) and per expert within ``atol`` assignments."""
    assert single.keys() == distributed.keys(), mode
    for name, counts in single.items():
        assert sum(distributed[name]) == sum(counts), (mode, name)
        worst = max(abs(a - b) for a, b in zip(counts, distributed[name], strict=True))
        assert worst <= atol, (mode, name, counts, distributed[name])


def writes_by_rank(record: Path, under: Path) -> dict[int, set[str]]:
    """What each process of a recorded run wrote below ``under``: paths relative to it, per rank."""
    writes = {}
    for path in sorted(Path(record).glob("writes-*.json")):
        rank = int(path.stem.split("-")[1])
        root = Path(under).resolve()
        paths = {Path(p) for p in json.loads(path.read_text())}
        writes[rank] = {p.relative_to(root).as_posix() for p in paths if p.is_relative_to(root)}
    return writes


# --- the recording wrapper (runs inside each launched process) ------------------------------------------------------

_WRITE_EVENTS = {"os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.move", "os.truncate"}


def _record_writes(folder: Path) -> None:
    import atexit

    written: set[str] = set()

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if writing and isinstance(path, (str, os.PathLike)):
                written.add(os.path.abspath(path))
        elif event == "os.mkdir":
            if isinstance(args[0], (str, os.PathLike)) and not os.path.exists(args[0]):  # makedirs(exist_ok) aside
                written.add(os.path.abspath(args[0]))
        elif event in _WRITE_EVENTS:
            for path in args[:2]:
                if isinstance(path, (str, os.PathLike)):
                    written.add(os.path.abspath(path))

    def dump() -> None:
        rank = os.environ.get("RANK", "0")
        (folder / f"writes-{rank}.json").write_text(json.dumps(sorted(str(Path(p).resolve()) for p in written)))

    atexit.register(dump)
    sys.addaudithook(hook)


if __name__ == "__main__":
    import runpy

    script = sys.argv[1]
    _record_writes(Path(os.environ[RECORD_ENV]))
    sys.argv = sys.argv[1:]
    sys.path[0] = str(Path(script).resolve().parent)
    runpy.run_path(script, run_name="__main__")
