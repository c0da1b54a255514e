"""Expert parallelism through transformers' own engine: the EP/TP plans moe_zoo's models declare are the names of
their tensors (checked with transformers' plan helpers), and a 2-process CPU run (gloo) of
``from_pretrained(..., distributed_config=DistributedConfig(...))`` gives each process only its half of the experts
and the same logits, loss and gradients as one process. The workers are ``tests/expert_parallel_worker.py``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, PhiConfig
from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

import moe_zoo

WORKER = Path(__file__).with_name("expert_parallel_worker.py")
NUM_EXPERTS = 4
IMAGE_TOKEN = 90
TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
# Same arithmetic in both runs (fp32 on CPU); what differs is the order of a few sums (all-reduce, all-to-all).
LOGITS_TOLERANCE = dict(atol=1e-5, rtol=1e-5)
GRAD_TOLERANCE = dict(atol=1e-6, rtol=1e-4)
EP_ONLY = {"tp_size": 2, "tp_plan": {}, "ep_size": 2}  # the experts split, everything else replicated
TP_AND_EP = {"tp_size": 2, "ep_size": 2}  # also the backbone's own TP plan (attention heads) and the LM head
TP_ONLY = {"tp_plan": "auto"}  # what from_pretrained(tp_plan="auto") means: TP plan only, experts whole


def _with_distinct_experts(model):
    """Perturb every expert so that each differs from the others: a wrong expert on a rank changes the outputs."""
    torch.manual_seed(3)
    with torch.no_grad():
        for block in model.moe_blocks():
            for param in block.experts.parameters():
                param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def _upcycled_llama():
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(LlamaConfig(**TEXT, num_key_value_heads=2))
    torch.manual_seed(1)  # sparse layers: dense FFNs in layers 1 and 3 keep Llama's own TP rules
    moe = moe_zoo.upcycle(
        dense, num_experts=NUM_EXPERTS, num_experts_per_tok=2, moe_layers="sparse", router_init_std=0.5
    )
    return _with_distinct_experts(moe)


def _upcycled_phi_top_p():
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(PhiConfig(**TEXT))
    torch.manual_seed(1)  # biased plain experts, and top-p: a variable number of experts per token
    moe = moe_zoo.upcycle(dense, num_experts=NUM_EXPERTS, router_type="top_p", top_p_threshold=0.6, router_init_std=0.5)
    return _with_distinct_experts(moe)


def _moe_llava():
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8
    )
    config = moe_zoo.MoeLlavaConfig(
        vision_config=vision, text_config=PhiConfig(**TEXT), moe_layers="none", image_token_id=IMAGE_TOKEN
    )
    torch.manual_seed(0)
    dense = moe_zoo.MoeLlavaForConditionalGeneration(config)
    torch.manual_seed(1)
    return _with_distinct_experts(moe_zoo.upcycle_moe_llava(dense, num_experts=NUM_EXPERTS, router_init_std=0.5))


def _text_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(3, 88, (2, 12), generator=torch.Generator().manual_seed(2))}


def _image_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    text = torch.randint(3, 88, (2, 6), generator=generator)
    ids = torch.cat([text[:, :2], torch.full((2, 4), IMAGE_TOKEN), text[:, 2:]], dim=1)
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}


MODELS = {
    "llama": (_upcycled_llama, _text_inputs, "causal_lm"),
    "phi_top_p": (_upcycled_phi_top_p, _text_inputs, "causal_lm"),
    "moe_llava": (_moe_llava, _image_inputs, "image_text_to_text"),
}
CASES = [
    ("llama", "ep", EP_ONLY, True),
    ("llama", "tp_ep", TP_AND_EP, False),
    ("llama", "tp", TP_ONLY, False),
    ("phi_top_p", "ep", EP_ONLY, False),
    ("phi_top_p", "tp_ep", TP_AND_EP, False),
    ("moe_llava", "ep", EP_ONLY, True),
    ("moe_llava", "tp_ep", TP_AND_EP, False),
]


def _reference(model, inputs: dict[str, torch.Tensor]) -> dict:
    """The single-process logits, training loss and gradients the 2-process runs must reproduce."""
    model.eval()
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, labels=inputs["input_ids"], output_router_logits=True, use_cache=False).loss
    loss.backward()
    grads = {
        n: p.grad.clone() for n, p in model.named_parameters() if ".experts." in n or n.endswith("mlp.gate.weight")
    }
    model.zero_grad(set_to_none=True)
    model.eval()
    return {"logits": logits, "loss": loss.item(), "grads": grads}


# --- the plans, checked without any process group ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_declared_plans_name_the_models_tensors(name, caplog):
    model = MODELS[name][0]()
    expert_tensors = {n for n, _ in model.named_parameters() if ".mlp.experts." in n}
    assert expert_tensors
    ep_plan = model.ep_plan
    assert set(ep_plan.values()) <= set(ALL_PARALLEL_STYLES)
    # transformers' own validation: unknown styles raise, rules that name nothing are logged.
    with caplog.at_level(logging.WARNING):
        model._validate_parallel_plan(ep_plan, ALL_PARALLEL_STYLES, "ep_plan")
        model._validate_parallel_plan(model.tp_plan, ALL_PARALLEL_STYLES, "tp_plan")
    assert "match nothing" not in caplog.text
    # Expanded with the layer numbers as transformers applies it: every expert tensor of every MoE layer is sharded
    # on the expert dimension, every bank gets the token dispatch, and nothing else is touched.
    expanded = model._expand_parallel_plan(ep_plan)
    assert {n for n, style in expanded.items() if style == "grouped_gemm"} == expert_tensors
    banks = {n.rpartition(".")[0] for n in expert_tensors}
    assert {n for n, style in expanded.items() if style == "ep_dispatch_experts"} == banks
    assert all(".mlp.gate" not in n for n in expanded)  # routers stay whole on every rank
    # The TP plan is the backbone's own plus the LM head, as in transformers' causal LMs.
    assert model.tp_plan["lm_head"] == "colwise_gather_output"
    assert any("self_attn" in rule for rule in model.tp_plan)


@pytest.mark.parametrize("base", ["moe_llava", "text"])
def test_metis_home_plans_follow_the_ffns_into_their_branches(base):
    """Metis-HOME moves each FFN to ``mlp.branches.<name>`` after its wrapped model collected its plans: the rules are
    rewritten for every branch, so the experts of an MoE-LLaVA base (and a dense base's FFN projections) are still
    exactly what the plans shard."""
    from tests.test_metis_home_model import _pair

    _, metis = _pair(base)
    expert_tensors = {n for n, _ in metis.named_parameters() if ".experts." in n}
    expanded_ep = metis._expand_parallel_plan(metis.ep_plan)
    assert {n for n, style in expanded_ep.items() if style == "grouped_gemm"} == expert_tensors
    assert {".branches.thinking." in n for n in expert_tensors} == ({True, False} if expert_tensors else set())
    assert bool(expert_tensors) == (base == "moe_llava")
    expanded_tp = metis._expand_parallel_plan(metis.tp_plan)
    named = {n for n, _ in metis.named_parameters(remove_duplicate=False)} | {n for n, _ in metis.named_modules()}
    assert expanded_tp and set(expanded_tp) <= named  # every TP rule names a tensor or module that exists
    if base == "text":
        ffn_rules = {n for n in expanded_tp if ".mlp." in n and not n.endswith((".weight", ".bias"))}
        assert ffn_rules == {n for n, _ in metis.named_modules() if ".mlp." in n and n.endswith("_proj")}


def test_tp_rules_of_ffns_that_became_experts_are_dropped():
    """Llama's plan shards ``mlp.gate_proj``; where every FFN is an MoE block that rule names nothing and is dropped,
    so that loading with a TP plan warns about nothing; with dense layers left it stays."""
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(LlamaConfig(**TEXT, num_key_value_heads=2))
    everywhere = moe_zoo.upcycle(dense, num_experts=NUM_EXPERTS, moe_layers="all")
    sparse = moe_zoo.upcycle(dense, num_experts=NUM_EXPERTS, moe_layers="sparse")
    assert "model.layers.*.mlp.gate_proj" not in everywhere.tp_plan
    assert sparse.tp_plan["model.layers.*.mlp.gate_proj"] == "colwise"


# --- two processes on CPU ------------------------------------------------------------------------------------------


def launch_two_processes(root: Path, cpu: bool = True) -> dict:
    """Save each model into ``root``, run every case in one ``torchrun --nproc_per_node 2`` (one start-up for all),
    and return the single-process references. ``cpu`` hides any GPU from the workers (gloo); otherwise transformers
    puts each rank on its own GPU (NCCL)."""
    references, cases = {}, []
    for name, (build, make_inputs, _) in MODELS.items():
        model, inputs = build(), make_inputs()
        model.save_pretrained(root / name)
        torch.save(inputs, root / f"{name}.inputs.pt")
        references[name] = {**_reference(model, inputs), "state": model.state_dict(), "inputs": inputs}
    for name, mode, distributed_config, save in CASES:
        cases.append(
            {
                "name": f"{name}-{mode}",
                "folder": str(root / name),
                "inputs": str(root / f"{name}.inputs.pt"),
                "auto_class": MODELS[name][2],
                "distributed_config": distributed_config,
                "save": save,
            }
        )
    spec = root / "spec.json"
    spec.write_text(json.dumps({"out": str(root), "cases": cases}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    result = subprocess.run([*command, str(spec)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return references


def check_two_process_case(
    root: Path,
    references: dict,
    case: tuple,
    logits_tolerance: dict = LOGITS_TOLERANCE,
    grad_tolerance: dict = GRAD_TOLERANCE,
) -> None:
    """Each rank of ``case`` held exactly its experts and reproduced the one-process logits, loss and gradients; a
    checkpoint it saved reloads with the model's weights."""
    name, mode, distributed_config, save = case
    reference = references[name]
    expert_parallel = distributed_config.get("ep_size", 1) > 1
    half = NUM_EXPERTS // 2
    for rank in range(2):
        record = torch.load(root / f"{name}-{mode}.rank{rank}.pt", weights_only=False)
        assert record["experts"], "no MoE block found"
        owned = slice(rank * half, (rank + 1) * half) if expert_parallel else slice(None)
        for block, bank in record["experts"].items():
            assert bank["num_experts"] == (half if expert_parallel else NUM_EXPERTS)
            for tensor_name, tensor in bank["tensors"].items():
                full = reference["state"][f"{block}.experts.{tensor_name}"]
                assert bank["global_shapes"][tensor_name] == tuple(full.shape)
                # This rank holds exactly its own experts (E/2 of them), and their weights are the model's.
                assert tensor.shape == full[owned].shape, (block, tensor_name, tensor.shape)
                torch.testing.assert_close(tensor, full[owned], atol=0, rtol=0)
                assert bank["is_dtensor"][tensor_name] == expert_parallel
            assert record["routers"][block] in ("Parameter", "Tensor")  # routers replicated, never sharded
        torch.testing.assert_close(record["logits"], reference["logits"], **logits_tolerance)
        assert record["loss"] == pytest.approx(reference["loss"], rel=logits_tolerance["rtol"])
        assert set(record["grads"]) == set(reference["grads"])
        for param_name, grad in record["grads"].items():
            full = reference["grads"][param_name]
            expected = full[owned] if ".experts." in param_name else full
            torch.testing.assert_close(grad, expected, **grad_tolerance, msg=f"{param_name} on rank {rank}")
    if save:
        auto_class = AutoModelForImageTextToText if MODELS[name][2] == "image_text_to_text" else AutoModelForCausalLM
        reloaded = auto_class.from_pretrained(root / f"{name}-{mode}.saved").eval()
        for key, value in reloaded.state_dict().items():
            torch.testing.assert_close(value, reference["state"][key], atol=0, rtol=0, msg=key)
        with torch.no_grad():
            logits = reloaded(**reference["inputs"], use_cache=False).logits
        torch.testing.assert_close(logits, reference["logits"], atol=0, rtol=0)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("expert_parallel")
    return root, launch_two_processes(root, cpu=True)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_two_processes_hold_half_the_experts_and_match_one_process(two_process_run, case):
    check_two_process_case(*two_process_run, case)
