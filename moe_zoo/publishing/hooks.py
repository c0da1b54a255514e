"""What moe_zoo models' ``save_pretrained`` and ``push_to_hub`` call (see
:class:`moe_zoo.modeling.moe_backbone.PublishingMixin`): exporting the code, writing the card, pushing."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

from ..atomic_io import atomic_write_text
from .hub import push_folder, push_model
from .model_card import is_replaceable_card, write_model_card
from .remote_code import export_remote_code, is_exportable
from .remote_code import remove_stale_code as _remove_stale_code

__all__ = ["export_code", "push_folder", "push_model", "remove_stale_code", "stage_processor_code", "write_card"]

README = "README.md"


def publishing_applies(model) -> bool:
    """Whether ``model`` is an instance of an installed moe_zoo class (not of exported code)."""
    return is_exportable(model)


def export_code(model, folder: str | os.PathLike) -> dict[str, str]:
    """Write ``model``'s code into ``folder`` and set its config's ``auto_map``; returns the map."""
    return export_remote_code(model.config, folder)


def remove_stale_code(folder: str | os.PathLike) -> None:
    """After a save into ``folder``: delete code files of an earlier export that the new code does not use."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    _remove_stale_code(folder, config.get("auto_map") or {})


def write_card(model, folder: str | os.PathLike, *, target: str | os.PathLike) -> None:
    """Write ``model``'s generated card into ``folder``, unless ``target`` (where the save ends up) holds a card
    its owner wrote. Details a training pipeline knows (stages, datasets, eval results) come from
    ``model.card_details``, a dict of :func:`moe_zoo.publishing.build_model_card` keyword arguments."""
    existing = Path(target) / README
    if existing.is_file() and not is_replaceable_card(existing.read_text(encoding="utf-8", errors="replace")):
        return
    details = dict(getattr(model, "card_details", None) or {})
    tags = list(details.pop("tags", []) or []) + list(getattr(model, "model_tags", None) or [])
    write_model_card(folder, model, tags=tags or None, **details)


def stage_processor_code(folder: Path, stage: Path) -> None:
    """Give a staged moe_zoo processor its code and ``auto_map`` (processors saved before moe_zoo exported code
    lack them)."""
    path = folder / "processor_config.json"
    if not path.is_file():
        return
    from ..registration import PROCESSOR_CLASSES

    settings = json.loads(path.read_text(encoding="utf-8"))
    by_name = {cls.__name__: cls for cls in PROCESSOR_CLASSES.values()}
    processor_class = by_name.get(settings.get("processor_class"))
    if processor_class is None or "auto_map" in settings:
        return
    module = Path(inspect.getfile(processor_class))
    atomic_write_text(stage / module.name, module.read_text(encoding="utf-8"))
    settings["auto_map"] = {"AutoProcessor": f"{module.stem}.{processor_class.__name__}"}
    atomic_write_text(stage / path.name, json.dumps(settings, indent=2, sort_keys=True) + "\n")
