"""Publishing moe_zoo models: model cards rendered from the family templates in ``model_cards/`` (shipped as
``moe_zoo.model_cards``), parameter counts computed from the weights, the code a checkpoint carries for
``trust_remote_code=True``, and pushing to the Hugging Face Hub.

Nothing here is part of a model's exported code: moe_zoo models import it by name, only where moe_zoo is installed.
"""

from .checkpoint_check import CheckpointError
from .hub import publish_folder, push_folder, push_model
from .model_card import (
    BASE_TAGS,
    CITATIONS,
    FAMILIES,
    GENERATED_MARKER,
    TEMPLATE_PACKAGE,
    Family,
    TrainingStage,
    build_model_card,
    is_generated_card,
    is_replaceable_card,
    looks_like_hub_id,
    model_family,
    pipeline_tag,
    template_path,
    write_model_card,
)
from .parameter_counts import ParameterCounts, count_parameters
from .remote_code import RemoteCodeExportError, export_remote_code

__all__ = [
    "BASE_TAGS",
    "CITATIONS",
    "FAMILIES",
    "GENERATED_MARKER",
    "TEMPLATE_PACKAGE",
    "CheckpointError",
    "Family",
    "ParameterCounts",
    "RemoteCodeExportError",
    "TrainingStage",
    "build_model_card",
    "count_parameters",
    "export_remote_code",
    "is_generated_card",
    "is_replaceable_card",
    "looks_like_hub_id",
    "model_family",
    "pipeline_tag",
    "publish_folder",
    "push_folder",
    "push_model",
    "template_path",
    "write_model_card",
]
