"""Publishing through the real huggingface_hub client against a local Hub server (``tests/local_hub.py``):
``push_to_hub`` and ``moe-zoo publish`` round trips that load in a fresh process with a fresh cache, with and
without moe_zoo, and publishing that refuses broken folders before any upload and never touches the local one."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import moe_zoo  # noqa: F401  (registers the model types)
from moe_zoo.modeling.moe_llava import MoeLlavaProcessor
from moe_zoo.publishing.model_card import is_generated_card
from moe_zoo.vision_tower import digits_image_processor
from tests import test_moe_llava_model as moe_llava_tests
from tests.local_hub import serve_local_hub
from tests.remote_loading import load_in_fresh_process, save_reference
from tests.test_remote_code import _upcycled


def _run(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture()
def hub(tmp_path):
    with serve_local_hub(tmp_path / "hub") as server:
        yield server


def _llava_processor() -> MoeLlavaProcessor:
    words = ["<pad>", "</s>", "<image>", "USER:", "ASSISTANT:", "what", "digit", "is", "this", "?"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    return MoeLlavaProcessor(digits_image_processor(), tokenizer, patch_size=8, vision_feature_select_strategy="full")


def test_push_to_hub_then_load_in_fresh_processes_with_and_without_moe_zoo(hub, tmp_path):
    model, inputs = _upcycled()
    model.save_pretrained(tmp_path / "local")
    reference = save_reference(model, inputs, tmp_path / "reference.pt")
    push = "import moe_zoo, transformers\n" + (
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'local')!r})\n"
        "m.push_to_hub('user/tiny-moe', tags=['my-tag'], max_shard_size='100KB')\n"
    )
    pushed = _run(push, hub.client_env(tmp_path / "home-push"), tmp_path)
    assert pushed.returncode == 0, pushed.stderr[-3000:]

    files = hub.repo_files("user/tiny-moe")
    assert {"config.json", "model.safetensors.index.json", "README.md", "modeling_upcycled_moe.py"} <= set(files)
    assert len([name for name in files if name.startswith("model-0000")]) > 1  # sharded, as asked
    assert json.loads(files["config.json"])["auto_map"]["AutoModelForCausalLM"].startswith("modeling_upcycled_moe.")
    card = files["README.md"].decode()
    assert is_generated_card(card) and "my-tag" in card and "moe-zoo" in card

    item = [{"source": "user/tiny-moe", "auto": "AutoModelForCausalLM", "reference": reference}]
    for hidden in (True, False):
        home = tmp_path / f"home-{'without' if hidden else 'with'}"
        results = load_in_fresh_process(item, tmp_path, hide_moe_zoo=hidden, env=hub.client_env(home))
        assert results["moe_zoo_imported"] is not hidden
        result = results["user/tiny-moe"]
        assert result["equal"], result
        assert result["module"].startswith("transformers_modules." if hidden else "moe_zoo.")
        assert any(home.rglob("model-00001-of-*.safetensors")), "the weights came from the server into the fresh cache"


def test_moe_zoo_publish_uploads_a_moe_llava_folder_with_its_processor(hub, tmp_path):
    model, inputs = moe_llava_tests._moe(), moe_llava_tests._inputs()
    folder = tmp_path / "moe-llava"
    model.save_pretrained(folder)
    _llava_processor().save_pretrained(folder)
    reference = save_reference(model, inputs, tmp_path / "reference.pt")
    before = _digest(folder)
    published = _run(
        f"from moe_zoo.cli import main; raise SystemExit(main(['publish', {str(folder)!r}, 'user/moe-llava']))",
        hub.client_env(tmp_path / "home-publish"),
        tmp_path,
    )
    assert published.returncode == 0, published.stderr[-3000:]
    assert _digest(folder) == before  # publishing never writes into the folder
    files = hub.repo_files("user/moe-llava")
    assert {"processing_moe_llava.py", "processor_config.json", "modeling_moe_llava.py", "README.md"} <= set(files)

    item = [{"source": "user/moe-llava", "auto": "AutoModelForImageTextToText", "reference": reference, "processor": 1}]
    result = load_in_fresh_process(item, tmp_path, env=hub.client_env(tmp_path / "home-load"))["user/moe-llava"]
    assert result["equal"] and result["module"].startswith("transformers_modules.")
    assert result["processor_module"].startswith("transformers_modules.")


def _broken_folders(root: Path) -> dict[str, Path]:
    model, _ = _upcycled()
    folders = {}
    for name in ("missing", "corrupt", "no_expert"):
        folders[name] = root / name
        model.save_pretrained(folders[name])
    (folders["missing"] / "model.safetensors").unlink()
    weights = folders["corrupt"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated, as by an interrupted copy
    tensors = load_file(folders["no_expert"] / "model.safetensors")
    dropped = next(name for name in tensors if ".experts." in name)
    save_file({k: v for k, v in tensors.items() if k != dropped}, folders["no_expert"] / "model.safetensors")
    return folders


def test_publish_refuses_broken_folders_before_any_upload(hub, tmp_path):
    folders = _broken_folders(tmp_path)
    script = (
        "import json, contextlib, io\nfrom moe_zoo.cli import main\nout = {}\n"
        + "".join(
            f"err = io.StringIO()\nwith contextlib.redirect_stderr(err):\n"
            f"    code = main(['publish', {str(folder)!r}, 'user/{name}'])\nout[{name!r}] = [code, err.getvalue()]\n"
            for name, folder in folders.items()
        )
        + "print(json.dumps(out))\n"
    )
    completed = _run(script, hub.client_env(tmp_path / "home"), tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results["missing"][0] == 1 and "no model.safetensors" in results["missing"][1]
    assert results["corrupt"][0] == 1 and "corrupt weight file" in results["corrupt"][1]
    assert results["no_expert"][0] == 1 and "missing keys" in results["no_expert"][1]
    assert ".experts." in results["no_expert"][1]  # it names the weight that would be randomly initialised
    assert hub.requests == []  # nothing reached the Hub, not even create_repo


def test_an_interrupted_push_leaves_the_local_checkpoint_and_the_repo_intact(hub, tmp_path):
    model, _ = _upcycled()
    folder = tmp_path / "local"
    model.save_pretrained(folder)
    before = _digest(folder)
    hub.fail_commits = True
    publish = f"from moe_zoo.cli import main; raise SystemExit(main(['publish', {str(folder)!r}, 'user/moe']))"
    completed = _run(publish, hub.client_env(tmp_path / "home"), tmp_path)
    assert completed.returncode == 1 and "nothing was changed" in completed.stderr
    assert _digest(folder) == before
    assert set(hub.repo_files("user/moe")) == {".gitattributes"}  # the repo exists, the failed commit left nothing
    hub.fail_commits = False
    completed = _run(publish, hub.client_env(tmp_path / "home"), tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "model.safetensors" in hub.repo_files("user/moe")


def test_dry_run_lists_what_would_be_uploaded(tmp_path, capsys):
    from moe_zoo.cli import main

    model, _ = _upcycled()
    model.save_pretrained(tmp_path / "local")
    (tmp_path / "local" / "README.md").unlink()
    assert main(["publish", str(tmp_path / "local"), "user/x", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "README.md" in listed and "modeling_upcycled_moe.py" in listed  # the card is regenerated in the stage
    assert not (tmp_path / "local" / "README.md").exists()


def test_a_mixlora_adapter_is_published_with_its_own_card_and_reloads(hub, tmp_path):
    from peft import get_peft_model

    from tests.peft.peft_test_models import batch, mixlora, randomize_lora_b, tiny_causal_lm

    base = tiny_causal_lm()
    base.save_pretrained(tmp_path / "base")
    adapter = get_peft_model(base, mixlora())
    randomize_lora_b(adapter)
    adapter.save_pretrained(tmp_path / "adapter")  # PEFT's blank card, base_model_name_or_path unset
    inputs = batch()
    reference = save_reference(adapter, inputs, tmp_path / "reference.pt")
    publish = (
        "from moe_zoo.cli import main\n"
        f"raise SystemExit(main(['publish', {str(tmp_path / 'adapter')!r}, 'user/adapter',"
        f" '--base-model', {str(tmp_path / 'base')!r}]))"
    )
    completed = _run(publish, hub.client_env(tmp_path / "home"), tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    files = hub.repo_files("user/adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert is_generated_card(card) and "library_name: peft" in card and "MixLoRA" in card

    load = (
        "import json, sys, torch, moe_zoo\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r})\n"
        "model = PeftModel.from_pretrained(base, 'user/adapter').eval()\n"
        f"reference = torch.load({str(reference)!r})\n"
        "with torch.no_grad():\n"
        "    print(json.dumps(torch.equal(model(**reference['inputs']).logits, reference['logits'])))\n"
    )
    loaded = _run(load, hub.client_env(tmp_path / "home-load"), tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) is True


def test_an_adapter_that_does_not_match_its_config_is_refused(tmp_path, capsys):
    from peft import get_peft_model

    from moe_zoo.cli import main
    from tests.peft.peft_test_models import mixlora, tiny_causal_lm

    base = tiny_causal_lm()
    base.save_pretrained(tmp_path / "base")
    get_peft_model(base, mixlora()).save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    dropped = next(name for name in tensors if "experts" in name or "moe_gate" in name or "router" in name)
    save_file({k: v for k, v in tensors.items() if k != dropped}, weights)
    code = main(["publish", str(tmp_path / "adapter"), "user/x", "--dry-run", "--base-model", str(tmp_path / "base")])
    assert code == 1 and "does not match its config" in capsys.readouterr().err


def test_a_push_keeps_a_card_the_repo_owner_wrote(hub, tmp_path):
    model, _ = _upcycled()
    model.save_pretrained(tmp_path / "local")
    script = (
        "from huggingface_hub import HfApi\nfrom moe_zoo.cli import main\n"
        "api = HfApi()\napi.create_repo('user/owned')\n"
        "api.upload_file(path_or_fileobj=b'# My own card\\n', path_in_repo='README.md', repo_id='user/owned')\n"
        f"raise SystemExit(main(['publish', {str(tmp_path / 'local')!r}, 'user/owned']))\n"
    )
    completed = _run(script, hub.client_env(tmp_path / "home"), tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    files = hub.repo_files("user/owned")
    assert files["README.md"] == b"# My own card\n" and "model.safetensors" in files
