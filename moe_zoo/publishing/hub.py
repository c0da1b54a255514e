"""Publishing to the Hugging Face Hub: ``push_to_hub`` of a moe_zoo model and ``moe-zoo publish FOLDER REPO_ID``.

Both upload a *staged* copy: the folder as saved, plus what a published checkpoint must carry (the model's code
with an ``auto_map``, the processor's code, a model card) where the folder lacks it. The folder itself is never
written to, so an interrupted or failed push leaves the local checkpoint exactly as it was, and nothing is
uploaded before the checkpoint has been checked (see :mod:`moe_zoo.publishing.checkpoint_check`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

from ..atomic_io import atomic_write_text
from .checkpoint_check import CheckpointError, check_weight_files, load_checked, load_checked_adapter
from .model_card import is_generated_card, write_model_card

logger = logging.getLogger(__name__)

README = "README.md"
_NOT_PUBLISHED_PREFIXES = (".", "checkpoint-", "runs")  # temp folders, Trainer checkpoints, TensorBoard logs


def _stage_copy(folder: Path, stage: Path) -> None:
    """Hard-link (or copy) ``folder``'s publishable entries into ``stage``; files the staging rewrites are replaced
    with new files there (``os.replace``), never written through the links."""
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(_NOT_PUBLISHED_PREFIXES):
            continue
        target = stage / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _remote_card_is_users(api: HfApi, repo_id: str, revision: str | None) -> bool:
    """Whether the repo already has a README that its owner wrote (then we do not replace it)."""
    try:
        card = ModelCard.load(repo_id, token=api.token, repo_type="model", ignore_metadata_errors=True)
    except (EntryNotFoundError, RepositoryNotFoundError):
        return False
    return not is_generated_card(card.content)


def upload_staged(
    stage: Path,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Create ``repo_id`` if needed and upload ``stage`` in one commit. Returns the ``CommitInfo``."""
    api = HfApi(token=token if isinstance(token, str) else None)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    ignore = [README] if (stage / README).is_file() and _remote_card_is_users(api, repo_id, revision) else None
    if ignore:
        logger.warning("%s already has a model card its owner wrote: keeping it, not uploading ours", repo_id)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=stage,
        commit_message=commit_message or "Upload model with moe-zoo",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
        ignore_patterns=ignore,
    )


def push_model(model, repo_id: str, *, max_shard_size: int | str = "50GB", tags: Sequence[str] | None = None, **kwargs):
    """``model.push_to_hub(repo_id)``: save the model (code and card included) into a temporary folder, check
    it, and upload it. Keyword arguments are ``push_to_hub``'s (commit message, private, token, revision, ...)."""
    if tags:
        model.add_model_tags(list(tags))
    with tempfile.TemporaryDirectory(prefix="moe-zoo-push-") as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        check_weight_files(tmp)
        return upload_staged(Path(tmp), repo_id, **kwargs)


def push_folder(model, folder: str | os.PathLike, repo_id: str, **kwargs):
    """Upload ``folder``, just saved from ``model`` by ``save_pretrained(..., push_to_hub=True)``, after checking
    its weight files."""
    check_weight_files(folder)
    with tempfile.TemporaryDirectory(prefix="moe-zoo-push-") as tmp:
        stage = Path(tmp) / "stage"
        stage.mkdir()
        _stage_copy(Path(folder), stage)
        return upload_staged(stage, repo_id, **kwargs)


def prepare_for_publishing(
    folder: str | os.PathLike,
    stage: str | os.PathLike,
    *,
    load_check: bool = True,
    base_model: str | os.PathLike | None = None,
) -> list[str]:
    """Stage ``folder`` into ``stage`` with what a published checkpoint needs, after checking it.

    Checks every weight file (and, with ``load_check``, that the model loads without missing, unexpected or
    mis-shaped weights), then adds the model's code and ``auto_map`` (moe_zoo models), the processor's code, and a
    generated model card where the folder has no card of its own. A PEFT adapter (MixLoRA, SMoRA) is loaded onto
    its base model (``base_model``, or the local folder its config names) and must match it key for key; its card
    is generated from that. Returns the staged file names.
    """
    folder, stage = Path(folder), Path(stage)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass the folder a model was saved into")
    check_weight_files(folder)
    _stage_copy(folder, stage)
    from . import hooks  # imported here: hooks imports this module

    if (folder / "adapter_config.json").is_file():
        adapter = load_checked_adapter(folder, base_model) if load_check else None
        if adapter is not None:
            write_model_card(stage, adapter)  # replaces PEFT's blank card, keeps one the owner wrote
        return sorted(path.name for path in stage.iterdir())
    model = load_checked(folder) if load_check else None

    if model is not None and hooks.publishing_applies(model):
        config_path = stage / "config.json"
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config["auto_map"] = hooks.export_code(model, stage)
        atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        hooks.stage_processor_code(folder, stage)
        hooks.write_card(model, stage, target=folder)
    return sorted(path.name for path in stage.iterdir())


def publish_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    dry_run: bool = False,
    base_model: str | os.PathLike | None = None,
    **kwargs,
) -> Any:
    """``moe-zoo publish FOLDER REPO_ID``: check and stage ``folder`` (see :func:`prepare_for_publishing`), then
    upload the staged copy in one commit. With ``dry_run`` nothing is uploaded; returns the staged file names."""
    with tempfile.TemporaryDirectory(prefix="moe-zoo-publish-") as tmp:
        stage = Path(tmp) / "stage"
        stage.mkdir()
        names = prepare_for_publishing(folder, stage, base_model=base_model)
        if dry_run:
            return names
        return upload_staged(stage, repo_id, **kwargs)
