"""Loading checkpoints in a fresh interpreter, optionally one where moe_zoo cannot be imported, and comparing their
logits (and greedy generations) with references saved by the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# Run in a fresh interpreter. With "hide_moe_zoo", moe_zoo is made unimportable before anything else; each source (a
# folder or a Hub repo id) is loaded with trust_remote_code=True and run on its reference's inputs.
LOADER = r"""
import importlib.abc, json, sys

request = json.loads(sys.argv[1])
if request["hide_moe_zoo"]:
    class HideMoeZoo(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "moe_zoo" or name.startswith("moe_zoo."):
                raise ImportError("moe_zoo is not installed in this environment")

    sys.meta_path.insert(0, HideMoeZoo())
else:
    import moe_zoo
import torch, transformers

results = {}
for item in request["items"]:
    model = getattr(transformers, item["auto"]).from_pretrained(item["source"], trust_remote_code=True).eval()
    reference = torch.load(item["reference"])
    with torch.no_grad():
        logits = model(**reference["inputs"]).logits
    result = {"module": type(model).__module__, "equal": bool(torch.equal(logits, reference["logits"]))}
    result["max_diff"] = (logits - reference["logits"]).abs().max().item()
    if "generate" in reference:
        out = model.generate(**reference["inputs"], max_new_tokens=4, do_sample=False)
        result["generate_equal"] = bool(torch.equal(out, reference["generate"]))
    if item.get("processor"):
        processor = transformers.AutoProcessor.from_pretrained(item["source"], trust_remote_code=True)
        result["processor_module"] = type(processor).__module__
    results[item["source"]] = result
results["moe_zoo_imported"] = "moe_zoo" in sys.modules
print(json.dumps(results))
"""


def save_reference(model, inputs: dict, path: Path, generate: bool = False) -> Path:
    """Save ``inputs`` with ``model``'s logits on them (and its greedy 4-token generation) to ``path``."""
    with torch.no_grad():
        reference = {"inputs": inputs, "logits": model(**inputs).logits}
        if generate:
            reference["generate"] = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    torch.save(reference, path)
    return path


def load_in_fresh_process(
    items: list[dict], cwd: Path, *, hide_moe_zoo: bool = True, env: dict[str, str] | None = None
) -> dict:
    """Load each ``{"source", "auto", "reference"[, "processor"]}`` item in a new interpreter; returns, per source,
    the loaded class's module and whether its logits equal the reference's, plus ``moe_zoo_imported``."""
    env = dict(env or os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["HF_MODULES_CACHE"] = str(cwd / "hf_modules")
    request = {"hide_moe_zoo": hide_moe_zoo, "items": [{k: str(v) for k, v in item.items()} for item in items]}
    completed = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(request)],
        cwd=cwd,  # not the repository root, where `moe_zoo` would be importable as a folder
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])
