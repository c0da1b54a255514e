"""What multi-process training (``torchrun`` / ``accelerate launch``, DDP or FSDP) needs from moe-zoo's Trainers.

Three things go wrong when an MoE recipe that is right in one process runs in several, and this module fixes them
for every Trainer of :mod:`moe_zoo.training`:

1. **Numbers logged from one process.** Each process routes only its own shard of the global batch, so expert
   counts, aux losses and router metrics gathered in a process describe that shard. :func:`all_reduce_sum` (and the
   helpers built on it) sum them over processes before they are logged, so a log line holds the same kind of figure
   a single process with the whole batch would show. Nothing is reduced unless ``torch.distributed`` is
   initialised, as :meth:`moe_zoo.core.routing.Router.update_bias` and
   :meth:`~moe_zoo.core.routing.TopAnyRouter.adapt_experts` already do for the loads they act on.
2. **A router loss counted once per process.** With ``average_tokens_across_devices`` (the default) the Trainer
   divides the LM loss by the number of label tokens of the *global* batch and multiplies the whole loss by the
   number of processes, so that DDP's gradient average gives the global token mean. A router term the model added
   to its loss (a per-batch mean: MoE aux losses, Metis-HOME's branch loss) is multiplied too, so with N processes it
   weighs N times what it weighs in one, and with ``num_items_in_batch`` it is not divided by the gradient
   accumulation steps either. :class:`DistributedTrainer` rescales that term (see
   :meth:`DistributedTrainer.batch_mean_loss_term`) so that the optimised loss is ``LM + router term`` whatever the
   number of processes and accumulation steps.
3. **FSDP on CPU.** accelerate 1.16 turns a ``FullyShardedDataParallelPlugin`` into FSDP only for accelerator
   devices (``AcceleratorState`` sets ``DistributedType.FSDP`` in its ``MULTI_GPU``/``MULTI_XPU``/... branch); on
   CPU (``MULTI_CPU``, gloo) it drops the plugin without a word and the model is wrapped in DDP. PyTorch's FSDP2
   (``fully_shard``) itself runs on CPU with gloo, so :func:`enable_fsdp_on_cpu` hands the plugin back to the
   accelerator state there. FSDP1 is refused on CPU: accelerate 1.16 cannot prepare it there (see
   :func:`enable_fsdp_on_cpu`).

Also here: :func:`reduce_unused_parameters` (FSDP2's counterpart of DDP's ``find_unused_parameters``, for
processes that run different modules), :func:`plain_module_class` (FSDP checkpoints with the files a single
process saves), and what recipes need around the Trainer:
:func:`save_pretrained_once`, :func:`unsharded_copy` (a plain copy of an FSDP-trained model for post-processing)
and :func:`broadcast_from_main`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

logger = logging.getLogger(__name__)


def distributed_ready() -> bool:
    """Whether ``torch.distributed`` is available and initialised (only then is anything reduced)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _collective_device() -> torch.device:
    """The device the default process group's collectives take tensors on: the current CUDA device for NCCL,
    the CPU for gloo (and any other backend)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all processes (a new CPU tensor; ``tensor`` itself when not distributed).

    Every process must call it, with tensors of the same shape and in the same order: it is a collective.
    """
    if not distributed_ready():
        return tensor
    reduced = tensor.detach().to(_collective_device(), dtype=torch.float64, copy=True)
    torch.distributed.all_reduce(reduced)
    return reduced.to(device="cpu", dtype=tensor.dtype)


class WindowStats:
    """Sums and counts of logged quantities since the last log line, reduced over processes when read.

    ``add(name, total, count)`` records a value with its weight (a batch's summed token loss and its token count,
    say, or a per-forward mean with count 1). :meth:`global_means` returns ``sum(total) / sum(count)`` over every
    process: a plain mean of per-process means would weight processes equally whatever they saw, and would be
    rank 0's number when not reduced at all.
    """

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}

    def add(self, name: str, total: float, count: float = 1.0) -> None:
        entry = self.totals.setdefault(name, [0.0, 0.0])
        entry[0] += float(total)
        entry[1] += float(count)

    def global_means(self, names: Sequence[str]) -> dict[str, float]:
        """Means of ``names`` over all processes, then cleared. Every process must call it with the same
        ``names`` (a collective; a process without a value for a name contributes zero weight); names without any
        value anywhere are left out."""
        local = torch.tensor([self.totals.get(name, [0.0, 0.0]) for name in names], dtype=torch.float64)
        reduced = all_reduce_sum(local.reshape(-1, 2))
        self.totals = {}
        return {name: (total / count).item() for name, (total, count) in zip(names, reduced, strict=True) if count > 0}


def enable_fsdp_on_cpu(trainer: Trainer) -> bool:
    """Make accelerate shard the model with FSDP2 on CPU when ``trainer.args`` ask for FSDP; returns whether it did.

    accelerate 1.16's ``AcceleratorState`` turns the Trainer's FSDP plugin into ``DistributedType.FSDP`` only for
    accelerator devices; on CPU it keeps ``MULTI_CPU`` and the model would silently be wrapped in DDP. FSDP2 runs on
    CPU with gloo (all-gathers and reduce-scatters of plain CPU tensors), and the rest of accelerate's FSDP2 path
    (``fully_shard`` per auto-wrapped layer, full state dicts gathered for saving, distributed checkpoints) has
    nothing CUDA-specific, so the state is given the plugin and the FSDP type, as accelerate would on a GPU. Called
    right after the Trainer creates its accelerator, before any model is prepared.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin_args = getattr(trainer.args, "fsdp_plugin_args", None)
    from_launcher = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # accelerate launch --use_fsdp
    state = trainer.accelerator.state
    if (plugin_args is None and not from_launcher) or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    # From the Trainer's --fsdp/--fsdp_config, or (plugin_args None) from the launcher's FSDP_* variables.
    plugin = FullyShardedDataParallelPlugin(**(plugin_args or {}))
    if plugin.fsdp_version != 2:
        # FSDP1 itself runs on CPU, but not through accelerate 1.16: its default sync_module_states=True raises
        # "not supported on cpu", and without it FullyShardedDataParallel refuses accelerate's device_id ("cpu:0"
        # against its compute device "cpu").
        raise ValueError(
            "FSDP on CPU needs FSDP2 (fsdp_config {'version': 2}, transformers' default; accelerate launch "
            "--fsdp_version 2): accelerate 1.16 cannot prepare FSDP1 on CPU (sync_module_states is refused there, "
            "and its device_id 'cpu:0' does not match FSDP1's compute device 'cpu')."
        )
    if trainer.args.mixed_precision not in (None, "no"):
        plugin.set_mixed_precision(trainer.args.mixed_precision)
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    logger.info("FSDP2 on CPU: accelerate's FSDP plugin enabled for the gloo process group.")
    return True


def reduce_unused_parameters(model: torch.nn.Module) -> bool:
    """Have FSDP2 reduce-scatter a zero gradient for every trainable parameter that got none in a backward, in every
    FSDP unit of ``model``; returns whether ``model`` is an FSDP2 module.

    FSDP2 reduce-scatters only the parameters that received a gradient. When processes run different parts of the
    model (Uni-MoE: a shard without images never runs the image connector; MoE: an expert that got no token), their
    reduce-scatters differ in size and gloo/NCCL fail with a collective mismatch or hang. This is FSDP2's counterpart
    of DDP's ``find_unused_parameters`` (which the Trainer turns on by default); ``ddp_find_unused_parameters=False``
    keeps it off here too. Modules that a process may skip must not be FSDP units of their own (their forward
    all-gather would have no partner): auto-wrap the decoder layers, not the media encoders.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return False
    model.set_reduce_scatter_unused_params(True)
    return True


@contextmanager
def plain_module_class(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, ``model`` (an FSDP2 root module) has its own class again instead of FSDP2's subclass.

    ``fully_shard`` swaps a module's class for a generated ``FSDP<Class>`` (bases ``FSDPModule`` and the class),
    defined in a PyTorch module. ``save_pretrained`` of moe-zoo models exports their code and writes their model card
    only for classes defined in moe-zoo's own modules (so that exported code, without moe-zoo, skips both), so a
    checkpoint the Trainer saved under FSDP lacked both: not the folder a single process saves. Saving with the
    plain class gives the same files; nothing FSDP-specific runs there (the Trainer hands ``save_pretrained`` the
    gathered state dict, on the main process only). Anything but an FSDP2 module is left as it is.
    """
    from torch.distributed.fsdp import FSDPModule

    wrapped = type(model)
    if not isinstance(model, FSDPModule):
        yield model
        return
    model.__class__ = next(base for base in wrapped.__bases__ if base is not FSDPModule)
    try:
        yield model
    finally:
        model.__class__ = wrapped


def broadcast_from_main(value: Any) -> Any:
    """The main process's ``value`` (any picklable object) in every process; ``value`` itself when not
    distributed. A collective: every process calls it (the others' ``value`` is ignored)."""
    if not distributed_ready():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def save_pretrained_once(trainer: Trainer, target: str | os.PathLike, model: Any, *others: Any) -> Path:
    """``model.save_pretrained`` (and ``save_pretrained`` of each of ``others``, a tokenizer say) into ``target``,
    atomically, by the main process alone; returns ``target`` once it is complete in every process.

    Outside the Trainer's own ``save_model``, a recipe that saves from every process has every process write the same
    files (``atomic_directory`` renames would race), and under FSDP each process holds only its shard of the
    weights. So every process first joins the gather of the full state dict (FSDP only; a collective), the main
    process writes it, and all wait at a barrier so that none reads the folder before it is there.
    """
    from ..atomic_io import atomic_directory

    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if trainer.is_world_process_zero():
        with atomic_directory(target) as folder:
            model.save_pretrained(folder, **({"state_dict": state_dict} if state_dict is not None else {}))
            for other in others:
                other.save_pretrained(folder)
    trainer.accelerator.wait_for_everyone()
    return Path(target)


def unsharded_copy(trainer: Trainer) -> torch.nn.Module | None:
    """On the main process, a plain (unsharded, unwrapped) copy of ``trainer.model`` holding its full trained
    weights; ``None`` on the others. Every process must call it (FSDP only: the gather is a collective).

    For what the Trainer's ``save_model`` does not cover: a recipe that post-processes the trained model before
    saving it (Uni-MoE merges its LoRA into the weights, ``merge_and_unload``) cannot do so on FSDP's sharded
    parameters, and must not save them from one process. The copy is built from the model's config (a PEFT model's
    base, wrapped again with its adapter config) and given the gathered state dict, so it is the trained model as
    one process would hold it.
    """
    from peft import PeftModel, get_peft_model

    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if not trainer.is_world_process_zero():
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    fresh = type(base)._from_config(base.config, dtype=next(base.parameters()).dtype)
    if isinstance(model, PeftModel):
        adapter = model.active_adapter
        fresh = get_peft_model(fresh, model.peft_config[adapter], adapter_name=adapter)
    missing, unexpected = fresh.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"The gathered FSDP state dict does not fit a fresh {type(fresh).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    return fresh


class DistributedTrainer(Trainer):
    """The ``Trainer`` with moe-zoo's multi-process fixes (see the module docstring): FSDP2 on CPU, and a router
    term of the loss that weighs the same in any number of processes and accumulation steps.

    Subclasses say which part of the model's loss is a per-batch mean by overriding :meth:`batch_mean_loss_term`;
    this class returns none, so by itself it trains exactly like the ``Trainer`` (FSDP on CPU aside).

    """

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        enable_fsdp_on_cpu(self)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """``Trainer.training_step``; on the first one under FSDP2, unused parameters are reduce-scattered as zeros
        (see :func:`reduce_unused_parameters`)."""
        if not getattr(self, "_unused_parameters_handled", False):
            self._unused_parameters_handled = True
            if self.is_fsdp_enabled and self.args.ddp_find_unused_parameters is not False:
                reduce_unused_parameters(model)
        return super().training_step(model, inputs, num_items_in_batch)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """``Trainer._save`` with the model's own class under FSDP2 (see :func:`plain_module_class`), so that an FSDP
        checkpoint holds the same files (exported code, model card) as a single process's."""
        with plain_module_class(self.model):
            super()._save(output_dir, state_dict)

    def batch_mean_loss_term(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        """The part of ``outputs.loss`` that is a mean over this batch rather than a sum over label tokens divided
        by ``num_items_in_batch`` (``None``: no such part). Override it for models that add a router loss."""
        return None

    def _loss_scale_applied(self, num_items_in_batch: Any) -> int:
        """The factor ``Trainer.compute_loss`` multiplied the model's loss by (the same condition it tests)."""
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        return 1

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether ``training_step`` leaves the loss undivided by the accumulation steps (its own test)."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``Trainer.compute_loss`` with the batch-mean term weighted once: ``Trainer`` multiplies the whole loss by
        the number of processes (right for the token-normalised LM loss, whose DDP average it undoes) and, with
        ``num_items_in_batch``, does not divide it by the accumulation steps; the term is replaced by
        ``term / accumulation_steps`` (or by itself where ``training_step`` divides the loss anyway), so summing
        the micro-batches and averaging the processes gives its mean over them, as in one process."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        term = self.batch_mean_loss_term(model, inputs, outputs) if model.training else None
        if term is not None:
            scale = self._loss_scale_applied(num_items_in_batch)
            steps = getattr(self, "current_gradient_accumulation_steps", 1) or 1
            wanted = term / steps if self._loss_is_scaled_for_ga(num_items_in_batch) else term
            if scale != 1 or wanted is not term:
                term = term.to(loss.device, loss.dtype)
                loss = loss - scale * term + wanted.to(loss.device, loss.dtype)
        return (loss, outputs) if return_outputs else loss


__all__ = [
    "DistributedTrainer",
    "WindowStats",
    "all_reduce_sum",
    "broadcast_from_main",
    "distributed_ready",
    "enable_fsdp_on_cpu",
    "plain_module_class",
    "reduce_unused_parameters",
    "save_pretrained_once",
    "unsharded_copy",
]
