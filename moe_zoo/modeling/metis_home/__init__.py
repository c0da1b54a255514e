from .configuration_metis_home import NON_THINKING, THINKING, MetisHomeConfig
from .expansion import expand_to_metis_home
from .modeling_metis_home import (
    BranchDecision,
    MetisHomeForConditionalGeneration,
    MetisHomeOutput,
    MetisHomePreTrainedModel,
)
from .think_format import MalformedThinkTagsError, format_response, parse_response, validate_response

__all__ = [
    "NON_THINKING",
    "THINKING",
    "BranchDecision",
    "MalformedThinkTagsError",
    "MetisHomeConfig",
    "MetisHomeForConditionalGeneration",
    "MetisHomeOutput",
    "MetisHomePreTrainedModel",
    "expand_to_metis_home",
    "format_response",
    "parse_response",
    "validate_response",
]
