"""The local Hub server (tests/local_hub.py) against the real, unmodified huggingface_hub client and transformers.

Nothing is mocked: every call goes over HTTP to the server. Clients that need ``HF_ENDPOINT`` (read at import time)
run in subprocesses with ``hub.client_env``; the in-process ``HfApi`` is given the endpoint explicitly.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

from tests.local_hub import LocalHub, serve_local_hub

# A stock tiny Llama and a word-level tokenizer, pushed with the unmodified `push_to_hub` (which also loads the
# remote model card first: a 404 on the first push, the card of the model push on the tokenizer push).
PUSH_SCRIPT = """
import sys, torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(63)} | {"[UNK]": 63}, unk_token="[UNK]"))
backend.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
torch.manual_seed(0)
config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=64)
model = LlamaForCausalLM(config).eval()
with torch.no_grad():
    torch.save(model(**tokenizer("w1 w5 w9 w62 w3", return_tensors="pt")).logits, sys.argv[1])
model.push_to_hub("user/tiny")
tokenizer.push_to_hub("user/tiny")
"""

LOAD_SCRIPT = """
import sys, torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("user/tiny").eval()
tokenizer = AutoTokenizer.from_pretrained("user/tiny")
assert ModelCard.load("user/tiny").data.library_name == "transformers"
with torch.no_grad():
    torch.save(model(**tokenizer("w1 w5 w9 w62 w3", return_tensors="pt")).logits, sys.argv[1])
"""


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """A running local hub. In-process clients also get the two settings huggingface_hub read from the environment
    at import: online (the CI exports HF_HUB_OFFLINE=1) and no Xet (hf_xet is installed; the hub speaks git-LFS)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with serve_local_hub(tmp_path / "hub") as local_hub:
        yield local_hub


def run_client(hub: LocalHub, tmp_path: Path, name: str, script: str, *args: str) -> subprocess.CompletedProcess:
    """Runs ``script`` in a fresh interpreter with its own empty HF_HOME, from a scratch working directory."""
    cwd = tmp_path / name
    cwd.mkdir()
    env = hub.client_env(cwd / "hf_home")
    command = [sys.executable, "-c", script, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_folder(folder: Path, text: str, weights: bytes) -> Path:
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text(text)
    (folder / "sub" / "weights.safetensors").write_bytes(weights)
    return folder


def test_upload_folder_then_download_gives_identical_bytes(hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token="x")
    assert api.create_repo("user/files").repo_id == "user/files"
    assert api.create_repo("user/files", exist_ok=True).repo_id == "user/files"  # the server answers 409
    with pytest.raises(HfHubHTTPError):
        api.create_repo("user/files")
    weights = bytes(range(256)) * 40 + b"\x00end"
    commit = api.upload_folder(repo_id="user/files", folder_path=make_folder(tmp_path / "local", "hello\n", weights))

    files = hub.repo_files("user/files")
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == {
        "notes.txt": b"hello\n",
        "sub/weights.safetensors": weights,
    }
    # the .safetensors file went through the git-LFS batch API and a PUT of its bytes; the text file went inline
    assert ("POST", "/user/files.git/info/lfs/objects/batch") in hub.requests
    assert [p for m, p in hub.requests if m == "PUT"] == [f"/user/files.git/info/lfs/objects/{sha256(weights)}"]
    info = api.model_info("user/files")
    assert info.sha == commit.oid
    siblings = {s.rfilename: s for s in info.siblings}
    assert siblings["sub/weights.safetensors"].lfs.sha256 == sha256(weights)
    assert siblings["notes.txt"].lfs is None
    assert sorted(api.list_repo_files("user/files")) == [".gitattributes", "notes.txt", "sub/weights.safetensors"]

    download = hf_hub_download("user/files", "sub/weights.safetensors", cache_dir=tmp_path / "c1", endpoint=hub.url)
    assert Path(download).read_bytes() == weights
    snapshot = Path(snapshot_download("user/files", cache_dir=tmp_path / "c2", endpoint=hub.url))
    assert snapshot.name == commit.oid
    assert (snapshot / "notes.txt").read_bytes() == b"hello\n"
    assert (snapshot / "sub" / "weights.safetensors").read_bytes() == weights
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/files", "missing.txt", cache_dir=tmp_path / "c1", endpoint=hub.url)
    assert hub.unknown_requests == []


def test_push_to_hub_then_from_pretrained_in_fresh_processes(hub: LocalHub, tmp_path: Path) -> None:
    pushed = run_client(hub, tmp_path, "push", PUSH_SCRIPT, str(tmp_path / "expected.pt"))
    assert pushed.returncode == 0, pushed.stderr
    files = hub.repo_files("user/tiny")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(files)
    assert ("PUT", f"/user/tiny.git/info/lfs/objects/{sha256(files['model.safetensors'])}") in hub.requests

    head = HfApi(endpoint=hub.url).model_info("user/tiny").sha
    hub.requests.clear()
    loaded = run_client(hub, tmp_path, "load", LOAD_SCRIPT, str(tmp_path / "actual.pt"))
    assert loaded.returncode == 0, loaded.stderr
    assert ("GET", f"/user/tiny/resolve/{head}/model.safetensors") in hub.requests  # from this server, not a cache
    expected, actual = torch.load(tmp_path / "expected.pt"), torch.load(tmp_path / "actual.pt")
    assert expected.shape == (1, 5, 64)
    assert torch.equal(expected, actual)
    assert hub.unknown_requests == []


def test_failed_commit_leaves_the_repo_unchanged_and_a_retry_reuses_the_uploaded_lfs_object(
    hub: LocalHub, tmp_path: Path
) -> None:
    api = HfApi(endpoint=hub.url, token="x")
    api.create_repo("user/flaky")
    api.upload_folder(repo_id="user/flaky", folder_path=make_folder(tmp_path / "v1", "one\n", b"\x01" * 100))
    before, head = hub.repo_files("user/flaky"), api.model_info("user/flaky").sha

    hub.fail_commits = True
    new_weights = b"\x02" * 100
    with pytest.raises(HfHubHTTPError, match="500"):
        api.upload_folder(repo_id="user/flaky", folder_path=make_folder(tmp_path / "v2", "two\n", new_weights))
    assert ("PUT", f"/user/flaky.git/info/lfs/objects/{sha256(new_weights)}") in hub.requests  # before the commit
    assert ("POST", "/api/models/user/flaky/commit/main") in hub.requests
    assert hub.repo_files("user/flaky") == before
    assert api.model_info("user/flaky").sha == head

    hub.fail_commits = False
    hub.requests.clear()
    api.upload_folder(repo_id="user/flaky", folder_path=tmp_path / "v2")
    after = hub.repo_files("user/flaky")
    assert (after["notes.txt"], after["sub/weights.safetensors"]) == (b"two\n", new_weights)
    assert not [p for m, p in hub.requests if m == "PUT"]  # the batch API reported the object as already uploaded
