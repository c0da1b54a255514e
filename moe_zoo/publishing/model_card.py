"""Model cards for moe_zoo models and LoRA-expert adapters, rendered through ``huggingface_hub.ModelCard``.

:func:`build_model_card` picks the template of the model's family (``model_cards/<family>.md`` in the repository,
shipped inside the package as ``moe_zoo.model_cards``), fills ``ModelCardData`` (the YAML metadata the Hub indexes)
and renders the body: a description, an architecture table whose parameter counts come from
:func:`~moe_zoo.publishing.parameter_counts.count_parameters`, how to load the checkpoint with and without moe-zoo,
the training stages, evaluation results and the papers to cite.

Generated cards carry :data:`GENERATED_MARKER`, an HTML comment the Hub does not show. :func:`write_model_card`
replaces a README.md that has the marker (an earlier generated card) and keeps one without it: a user who edits the
card deletes the marker line, and saving the model again never overwrites their text.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft import PeftModel
from torch import nn
from transformers import PreTrainedConfig

from ..atomic_io import atomic_write_text
from ..core.block import SparseMoeBlock
from ..core.options import resolve_moe_layers
from ..peft.mixlora import MixLoraConfig
from ..peft.smora import SmoraConfig
from .parameter_counts import ParameterCounts, count_parameters

GENERATED_MARKER = "<!-- moe-zoo:generated -->"
"""The HTML comment every generated card's body contains; a README.md without it is treated as the user's own."""

TEMPLATE_PACKAGE = "moe_zoo.model_cards"
"""The package the templates ship in (the repository's ``model_cards/`` folder, mapped by ``pyproject.toml``)."""

PROJECT_URL = "https://github.com/moe-zoo/moe-zoo"
BASE_TAGS = ("moe", "mixture-of-experts", "moe-zoo")
"""Tags every card gets, before the family's own tags and the caller's."""

REPO_ID_PLACEHOLDER = "<repo-id>"
"""What the loading examples name the checkpoint when no Hub id is known."""

CITATIONS: dict[str, str] = {
    "sparse_upcycling": """@inproceedings{komatsuzaki2023sparse,
  title = {Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints},
  author = {Komatsuzaki, Aran and Puigcerver, Joan and Lee-Thorp, James and Riquelme Ruiz, Carlos and Mustafa, Basil and Ainslie, Joshua and Tay, Yi and Dehghani, Mostafa and Houlsby, Neil},
  booktitle = {The Eleventh International Conference on Learning Representations (ICLR)},
  year = {2023},
  eprint = {2212.05055},
  archivePrefix = {arXiv}
}""",
    "moe_llava": """@article{lin2024moellava,
  title = {MoE-LLaVA: Mixture of Experts for Large Vision-Language Models},
  author = {Lin, Bin and Tang, Zhenyu and Ye, Yang and Cui, Jiaxi and Zhu, Bin and Jin, Peng and Zhang, Junwu and Ning, Munan and Yuan, Li},
  journal = {arXiv preprint arXiv:2401.15947},
  year = {2024}
}""",
    "dynmoe": """@inproceedings{guo2025dynmoe,
  title = {Dynamic Mixture of Experts: An Auto-Tuning Approach for Efficient Transformer Models},
  author = {Guo, Yongxin and Cheng, Zhenglin and Tang, Xiaoying and Tu, Zhaopeng and Lin, Tao},
  booktitle = {The Thirteenth International Conference on Learning Representations (ICLR)},
  year = {2025},
  eprint = {2405.14297},
  archivePrefix = {arXiv}
}""",
    "uni_moe": """@article{li2025unimoe,
  title = {Uni-MoE: Scaling Unified Multimodal LLMs With Mixture of Experts},
  author = {Li, Yunxin and Jiang, Shenyuan and Hu, Baotian and Wang, Longyue and Zhong, Wanqi and Luo, Wenhan and Ma, Lin and Zhang, Min},
  journal = {IEEE Transactions on Pattern Analysis and Machine Intelligence},
  volume = {47},
  number = {5},
  pages = {3424--3439},
  year = {2025},
  doi = {10.1109/TPAMI.2025.3532688},
  eprint = {2405.11273},
  archivePrefix = {arXiv}
}""",
    "metis_home": """@article{lan2025metishome,
  title = {Metis-HOME: Hybrid Optimized Mixture-of-Experts for Multimodal Reasoning},
  author = {Lan, Xiaohan and Liu, Fanfan and Qiu, Haibo and Yang, Siqi and Ruan, Delian and Shi, Peng and Ma, Lin},
  journal = {arXiv preprint arXiv:2510.20519},
  year = {2025}
}""",
    "mixlora": """@article{li2024mixlora,
  title = {MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of Experts},
  author = {Li, Dengchun and Ma, Yingzi and Wang, Naizheng and Ye, Zhengmao and Cheng, Zhiyuan and Tang, Yinghao and Zhang, Yan and Duan, Lei and Zuo, Jie and Yang, Cal and Tang, Mingjie},
  journal = {arXiv preprint arXiv:2404.15159},
  year = {2024}
}""",
    "smora": """@article{zhao2025smora,
  title = {Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-Task Learning},
  author = {Zhao, Ziyu and Zhou, Yixiao and Zhu, Didi and Shen, Tao and Wang, Xuwu and Su, Jing and Kuang, Kun and Wei, Zhongyu and Wu, Fei and Cheng, Yu},
  journal = {arXiv preprint arXiv:2501.15103},
  year = {2025}
}""",
}
"""BibTeX of every paper a card may cite, by key (the arXiv versions' author lists; Uni-MoE's TPAMI version)."""


@dataclass(frozen=True)
class Family:
    """A model family: how its cards are tagged, which template renders them and which papers they cite."""

    key: str
    name: str
    tag: str
    template: str
    papers: tuple[str, ...]
    library_name: str = "transformers"
    extra_tags: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {
    family.key: family
    for family in (
        Family("upcycled_moe", "Upcycled MoE", "upcycled-moe", "upcycled_moe.md", ("sparse_upcycling",)),
        Family("moe_llava", "MoE-LLaVA", "moe-llava", "moe_llava.md", ("moe_llava",)),
        Family("uni_moe", "Uni-MoE", "uni-moe", "uni_moe.md", ("uni_moe",)),
        Family(
            "metis_home", "Metis-HOME", "metis-home", "metis_home.md", ("metis_home",), extra_tags=("hybrid-thinking",)
        ),
        Family("mixlora", "MixLoRA", "mixlora", "lora_experts.md", ("mixlora",), "peft", ("peft", "lora")),
        Family("smora", "SMoRA", "smora", "lora_experts.md", ("smora",), "peft", ("peft", "lora")),
    )
}
"""Every family a card can be built for: a model's ``config.model_type``, or the LoRA-expert PEFT method."""

ROUTER_DESCRIPTIONS = {
    "softmax_topk": "softmax over the experts, then top-k",
    "topk_softmax": "top-k of the logits, then a softmax over the k chosen",
    "sigmoid_topk": "sigmoid scores, then top-k",
    "bias_balanced": "sigmoid scores, then top-k with an auxiliary-loss-free selection bias",
    "top_p": "top-p: the fewest experts whose probabilities reach p",
    "top_any": "top-any (DynMoE): every expert whose score passes its trained threshold",
    "dense_to_sparse": "dense-to-sparse (EvoMoE): Gumbel-softmax gate with an annealed temperature",
}

MIXLORA_ROUTING = {
    "mixlora": "softmax over the experts, top-k, renormalised",
    "mixlora-dynamic": "top-p: the fewest experts whose probabilities reach p",
    "mixlora-switch": "top-1 with a per-expert token capacity (Switch)",
}


@dataclass(frozen=True)
class TrainingStage:
    """One training stage listed on a card."""

    name: str
    description: str = ""


StageInput = str | tuple[str, str] | Mapping[str, str] | TrainingStage
EvalInput = EvalResult | Mapping[str, Any]
EVAL_RESULT_FIELDS = tuple(f.name for f in fields(EvalResult) if f.init)


def is_generated_card(text: str) -> bool:
    """Whether a README's text is a card moe-zoo generated (it contains :data:`GENERATED_MARKER`), as opposed to
    one the user wrote or edited (deleting the marker line is how a user claims a generated card)."""
    return GENERATED_MARKER in text


def is_replaceable_card(text: str) -> bool:
    """Whether :func:`write_model_card` may replace a README with this text: a card moe-zoo generated, or the blank
    default card PEFT's ``save_pretrained`` writes for an adapter (huggingface_hub's template, untouched but for the
    metadata and PEFT's version line). Any other text is the user's and is kept."""
    return is_generated_card(text) or _is_blank_default_card(text)


def _is_blank_default_card(text: str) -> bool:
    try:
        body = ModelCard(text, ignore_metadata_errors=True).text
    except Exception:  # not a card at all: certainly not the blank default one
        return False
    return _normalized_default_body(body) == _normalized_default_body(_blank_default_body())


@functools.cache
def _blank_default_body() -> str:
    return ModelCard.from_template(ModelCardData()).text


def _normalized_default_body(body: str) -> str:
    """A card body without trailing spaces, repeated blank lines and the ``### Framework versions`` / ``- PEFT x``
    lines PEFT appends."""
    lines = [line.rstrip() for line in body.splitlines()]
    lines = [line for line in lines if line != "### Framework versions" and not line.startswith("- PEFT ")]
    return re.sub(r"\n{2,}", "\n\n", "\n".join(lines)).strip()


def model_family(model: nn.Module) -> Family:
    """The :class:`Family` of ``model``: a ``PeftModel`` by its active adapter's config class (MixLoRA, SMoRA),
    anything else by ``config.model_type``. A ``ValueError`` names the supported families otherwise."""
    if isinstance(model, PeftModel):
        peft_config = model.peft_config[model.active_adapter]
        if isinstance(peft_config, MixLoraConfig):
            return FAMILIES["mixlora"]
        if isinstance(peft_config, SmoraConfig):
            return FAMILIES["smora"]
        raise ValueError(
            f"Model cards cover MixLoRA and SMoRA adapters; this PeftModel's adapter is {type(peft_config).__name__}. "
            "Merge a plain LoRA adapter into its moe_zoo model first (merge_and_unload) and build the card for that."
        )
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(key for key, family in FAMILIES.items() if family.library_name == "transformers")
        raise ValueError(
            f"No model-card template for model type {model_type!r}; the moe_zoo model types are {supported} "
            "(and PeftModels with a MixLoRA or SMoRA adapter)."
        )
    return FAMILIES[model_type]


@contextmanager
def template_path(family: Family | str) -> Iterator[Path]:
    """The template file of ``family`` (a :class:`Family` or its key), as a real path for as long as the context is
    open (``importlib.resources`` may serve it from a zip).

    The templates ship as the package ``moe_zoo.model_cards`` (the top-level ``model_cards/`` folder, mapped in
    ``pyproject.toml``).
    """
    name = (FAMILIES[family] if isinstance(family, str) else family).template
    resource = importlib.resources.files(TEMPLATE_PACKAGE) / name
    with importlib.resources.as_file(resource) as path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"The model-card template {name} is missing from the installed {TEMPLATE_PACKAGE}.")
        yield Path(path)


def build_model_card(
    model: nn.Module,
    *,
    base_model: str | list[str] | None = None,
    datasets: str | Sequence[str] | None = None,
    training_stages: Sequence[StageInput] | None = None,
    eval_results: Sequence[EvalInput] | None = None,
    tags: Sequence[str] | None = None,
    license: str | None = None,
    language: str | Sequence[str] | None = None,
    model_name: str | None = None,
    experts_per_token: float | None = None,
) -> ModelCard:
    """The model card of ``model`` (a moe_zoo model, or a ``PeftModel`` with a MixLoRA / SMoRA adapter).

    Args:
        base_model: the Hub id(s) the model was made from. Default: the ``_name_or_path`` the model (or its base
            model / dense sub-config, or the adapter's ``base_model_name_or_path``) was loaded from, when it is a Hub
            id (``owner/name``) rather than a local folder; otherwise none.
        datasets: Hub dataset ids it was trained on (metadata, and listed in the training section).
        training_stages: the stages that were run, in order: each a name, a ``(name, description)`` pair, a mapping
            with ``"name"`` and optional ``"description"``, or a :class:`TrainingStage`. Without them the card says
            none were recorded.
        eval_results: results for the ``model-index`` metadata (shown on the Hub) and a table in the body: each an
            ``huggingface_hub.EvalResult`` or a mapping of its keyword arguments, at least ``task_type`` (e.g.
            ``"text-generation"``), ``dataset_type`` (the dataset's Hub id), ``dataset_name``, ``metric_type``
            (e.g. ``"accuracy"``) and ``metric_value``; optional ones such as ``dataset_split`` or ``metric_name``.
        tags: extra tags, after ``moe``, ``mixture-of-experts``, ``moe-zoo`` and the family's own.
        license, language: card metadata (e.g. ``"apache-2.0"``, ``"en"``).
        model_name: the card's title and the ``model-index`` name; a Hub id (``owner/name``) also fills the loading
            examples. Default: the last part of the model's ``_name_or_path``, else the family's name.
        experts_per_token: passed to :func:`count_parameters` for routers with a variable number of experts.

    Returns:
        a ``huggingface_hub.ModelCard``; ``card.data`` is its ``ModelCardData``, ``str(card)`` the README text.
    """
    family = model_family(model)
    counts = count_parameters(model, experts_per_token=experts_per_token)
    base = _base_model_ids(model) if base_model is None else base_model
    results = [_eval_result(item) for item in eval_results or ()]
    name = model_name or _default_model_name(model, family)
    card_data = ModelCardData(
        base_model=base or None,
        datasets=_string_list(datasets),
        eval_results=results or None,
        language=_string_list(language),
        library_name=family.library_name,
        license=license,
        model_name=name if results or model_name else None,
        pipeline_tag=pipeline_tag(model),
        tags=list(dict.fromkeys([*BASE_TAGS, family.tag, *family.extra_tags, *(tags or ())])),
    )
    context = _template_context(
        model, family, counts, name, card_data, training_stages, results, measured=experts_per_token is not None
    )
    with template_path(family) as path:
        card = ModelCard.from_template(card_data, template_path=str(path), **context)
    if not is_generated_card(card.text):
        raise RuntimeError(f"The template {family.template} lost the generated-card marker {GENERATED_MARKER!r}.")
    return card


def write_model_card(folder: str | os.PathLike, model: nn.Module, **kwargs: Any) -> Path:
    """Write ``model``'s card as ``folder/README.md`` and return its path; ``kwargs`` go to
    :func:`build_model_card`.

    A README.md without :data:`GENERATED_MARKER` (the user's own, or a generated card the user edited and removed
    the marker from) is kept as it is and its path returned; only the blank default card PEFT's ``save_pretrained``
    writes next to an adapter is replaced as well (see :func:`is_replaceable_card`). The new card is written to a
    temporary file in ``folder`` and renamed over README.md, so a reader (or an upload) never sees half a card.
    """
    folder = Path(folder)
    readme = folder / "README.md"
    if readme.is_file() and not is_replaceable_card(readme.read_text(encoding="utf-8", errors="replace")):
        return readme
    return atomic_write_text(readme, str(build_model_card(model, **kwargs)))


# --- metadata ---------------------------------------------------------------------------------------------------


def looks_like_hub_id(value: object) -> bool:
    """Whether ``value`` names a Hub repository (``owner/name``) rather than a local folder: one slash, a valid
    repo id, and no such folder here. Bare names (``gpt2``) are left out: they are as likely a local folder."""
    if not isinstance(value, str) or value.count("/") != 1 or os.path.exists(value):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _base_model_ids(model: nn.Module) -> str | None:
    """The Hub id the model was derived from, if one is known: for an adapter, the id of the model it adapts; for
    a model, the checkpoint it was loaded from, else the dense model it was built from (the sub-config's
    ``_name_or_path``, which upcycling and expansion keep)."""
    if isinstance(model, PeftModel):
        candidates = [model.peft_config[model.active_adapter].base_model_name_or_path]
        base = model.get_base_model()
        candidates += _config_names(getattr(base, "config", None))
    else:
        candidates = _config_names(getattr(model, "config", None))
    return next((value for value in candidates if looks_like_hub_id(value)), None)


def _config_names(config: PreTrainedConfig | None) -> list[str]:
    if config is None:
        return []
    names = [getattr(config, "_name_or_path", "")]
    for attribute in ("base_config", "text_config"):
        sub = getattr(config, attribute, None)
        if isinstance(sub, PreTrainedConfig):
            names.append(getattr(sub, "_name_or_path", ""))
    return names


def _default_model_name(model: nn.Module, family: Family) -> str:
    config = getattr(model.get_base_model() if isinstance(model, PeftModel) else model, "config", None)
    path = str(getattr(config, "_name_or_path", "") or "").rstrip("/\\")
    name = re.split(r"[/\\]", path)[-1] if path else ""
    if isinstance(model, PeftModel) and name:
        return f"{name}-{family.tag}"
    return name or f"{family.tag}-model"


def _string_list(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    return items or None


def _eval_result(item: EvalInput) -> EvalResult:
    if isinstance(item, EvalResult):
        return item
    if not isinstance(item, Mapping):
        raise TypeError(f"An eval result must be an EvalResult or a mapping of its fields, got {type(item).__name__}.")
    unknown = sorted(set(item) - set(EVAL_RESULT_FIELDS))
    required = ("task_type", "dataset_type", "dataset_name", "metric_type", "metric_value")
    missing = [key for key in required if key not in item]
    if unknown or missing:
        raise ValueError(
            f"Eval result {dict(item)} has unknown keys {unknown} and lacks {missing}; it needs {list(required)} and "
            f"may add {[f for f in EVAL_RESULT_FIELDS if f not in required]}."
        )
    return EvalResult(**item)


def pipeline_tag(model: nn.Module) -> str:
    """The Hub task of ``model``: ``text-generation`` for language models, ``image-text-to-text`` for models that
    read images, ``any-to-any`` for a Uni-MoE that also reads speech or audio; a Metis-HOME or an adapter has the
    task of the model it wraps."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    if isinstance(model, PeftModel):
        return pipeline_tag(model.get_base_model())
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "metis_home":
        return pipeline_tag(model.model)
    if model_type == "uni_moe":
        if config.speech_config is not None or config.audio_config is not None:
            return "any-to-any"
        return "image-text-to-text" if config.vision_config is not None else "text-generation"
    if model_type == "moe_llava" or (config is not None and type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING):
        return "image-text-to-text"
    return "text-generation"


# --- the template's context --------------------------------------------------------------------------------------


def _template_context(
    model: nn.Module,
    family: Family,
    counts: ParameterCounts,
    name: str,
    card_data: ModelCardData,
    training_stages: Sequence[StageInput] | None,
    results: list[EvalResult],
    measured: bool,
) -> dict[str, Any]:
    """Everything the family templates read besides the metadata fields (which ``from_template`` passes itself)."""
    repo_id = name if looks_like_hub_id(name) else REPO_ID_PLACEHOLDER
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    base_models = _string_list(card_data.base_model) or []
    context: dict[str, Any] = {
        "base_models": base_models,
        "base_links": ", ".join(f"[{b}](https://huggingface.co/{b})" for b in base_models),
        "base_repo_id": base_models[0] if base_models else "<base-model-id>",
        "generated_marker": GENERATED_MARKER,
        "title": name,
        "family": family.key,
        "family_name": family.name,
        "project_url": PROJECT_URL,
        "repo_id": repo_id,
        "counts": counts,
        "total_parameters": _short(counts.total),
        "active_parameters": _short(counts.active),
        "active_percent": f"{100 * counts.active_fraction:.1f}%",
        "experts_per_token": _experts_per_token_text(counts),
        "per_token": _per_token_phrase(counts, measured),
        "training_stages": [_stage(item) for item in training_stages or ()],
        "dataset_list": list(card_data.datasets or []),
        "eval_rows": [_eval_row(result) for result in results],
        "citations": [CITATIONS[key] for key in _papers(model, family)],
        "load": _loading(inner, family),
    }
    if family.library_name == "peft":
        context.update(_adapter_context(model, counts))
    elif family.key == "metis_home":
        context.update(_metis_home_context(model, counts))
    else:
        context.update(_moe_context(model, family, counts))
    context["architecture"] = [(label, _cell(value)) for label, value in context["architecture"]]
    return context


def _short(count: int) -> str:
    """``65.1K``: three significant digits, for prose."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)


def _human(count: int) -> str:
    """``65.1K (65,056)``: three significant digits for reading, the exact count for checking (tables)."""
    return _short(count) if count < 1000 else f"{_short(count)} ({count:,})"


def _per_token_phrase(counts: ParameterCounts, measured: bool) -> str:
    """How many experts a token uses, for prose: ``2``, ``1.7 on average``, ``a variable number``."""
    if not counts.variable_routing:
        return f"{counts.top_k:g}"
    return f"{counts.top_k:g} on average" if measured else "a variable number"


def _cell(value: object) -> str:
    """A markdown table cell: pipes escaped, newlines flattened."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _experts_per_token_text(counts: ParameterCounts) -> str:
    if not counts.num_experts:
        return "none (no MoE layers)"
    if counts.variable_routing:
        return f"variable per token; counted as {counts.top_k:g} of {counts.num_experts}"
    return f"{counts.top_k:g} of {counts.num_experts}"


def _stage(item: StageInput) -> TrainingStage:
    if isinstance(item, TrainingStage):
        return item
    if isinstance(item, str):
        return TrainingStage(item)
    if isinstance(item, Mapping):
        if "name" not in item:
            raise ValueError(f"A training stage mapping needs a 'name' (and may have a 'description'), got {item}.")
        return TrainingStage(str(item["name"]), str(item.get("description", "") or ""))
    if isinstance(item, tuple) and len(item) == 2:
        return TrainingStage(str(item[0]), str(item[1]))
    raise TypeError(
        f"A training stage must be a name, a (name, description) pair, a mapping or a TrainingStage, got {item!r}."
    )


def _eval_row(result: EvalResult) -> dict[str, str]:
    dataset = result.dataset_name + (f" ({result.dataset_split})" if result.dataset_split else "")
    return {
        "task": _cell(result.task_name or result.task_type),
        "dataset": _cell(dataset),
        "metric": _cell(result.metric_name or result.metric_type),
        "value": _cell(result.metric_value),
    }


def _moe_options(config: PreTrainedConfig | None) -> PreTrainedConfig | None:
    """``config`` if it carries moe_zoo's MoE options (an upcycled MoE, MoE-LLaVA or Uni-MoE config)."""
    return config if config is not None and hasattr(config, "num_experts_per_tok") else None


def _papers(model: nn.Module, family: Family) -> list[str]:
    """The citation keys of ``family`` plus those of any moe_zoo model inside (a Metis-HOME over MoE-LLaVA, SMoRA
    on an upcycled MoE), and DynMoE when a top-any router is used."""
    keys = list(family.papers)
    inner = (
        model.get_base_model() if isinstance(model, PeftModel) else model.model if family.key == "metis_home" else None
    )
    if inner is not None and getattr(getattr(inner, "config", None), "model_type", None) in FAMILIES:
        keys += _papers(inner, FAMILIES[inner.config.model_type])
    options = _moe_options(getattr(model, "config", None))
    if options is not None and options.router_type == "top_any":
        keys.append("dynmoe")
    return list(dict.fromkeys(keys))


def _loading(model: nn.Module, family: Family) -> dict[str, Any]:
    """The Auto classes the loading examples use for ``model`` (the base model of an adapter)."""
    task = pipeline_tag(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "uni_moe":
        auto_class = "AutoModelForMultimodalLM"
    elif task == "text-generation":
        auto_class = "AutoModelForCausalLM"
    else:
        auto_class = "AutoModelForImageTextToText"
    return {
        "auto_class": auto_class,
        "processor_class": "AutoTokenizer" if task == "text-generation" else "AutoProcessor",
        "moe_zoo_base": model_type in FAMILIES,
    }


def _router_text(options: PreTrainedConfig) -> str:
    text = ROUTER_DESCRIPTIONS.get(options.router_type, options.router_type)
    if options.router_type == "top_p":
        text += f" (p = {options.top_p_threshold})"
    elif options.router_type in ("softmax_topk", "sigmoid_topk", "bias_balanced") and options.norm_topk_prob:
        text += ", renormalised"
    return f"{text} (`{options.router_type}`)"


def _extra_experts_text(options: PreTrainedConfig) -> str | None:
    parts = []
    if options.num_shared_experts:
        parts.append(f"{options.num_shared_experts} shared (always on)")
    for kind in ("zero", "null", "copy", "constant"):
        number = getattr(options, f"num_{kind}_experts")
        if number:
            parts.append(f"{number} {kind}")
    return ", ".join(parts) or None


def _moe_rows(options: PreTrainedConfig, per_token: str, num_layers: int) -> list[tuple[str, object]]:
    """The MoE part of an architecture table, from a config with moe_zoo's MoE options; ``per_token`` describes
    the experts a token is counted to use."""
    indices = resolve_moe_layers(options.moe_layers, num_layers)
    if not indices:
        return [("MoE layers", f'none of {num_layers} (`moe_layers="none"`: a dense model)')]
    rows: list[tuple[str, object]] = [
        ("experts per MoE layer", options.num_experts),
        ("experts per token (top-k)", per_token),
        ("MoE layers", f"{len(indices)} of {num_layers} (layers {', '.join(map(str, indices))})"),
        ("router", _router_text(options)),
    ]
    extra = _extra_experts_text(options)
    if extra:
        rows.insert(1, ("extra experts", extra))
    if options.capacity_factor is not None:
        rows.append(("capacity factor", options.capacity_factor))
    return rows


def _parameter_rows(counts: ParameterCounts, unit: str = "token") -> list[tuple[str, object]]:
    active = f"{_human(counts.active)}, {100 * counts.active_fraction:.1f}% of the total"
    if counts.variable_routing:
        active += " (routing is variable: an upper bound unless experts_per_token was given)"
    return [("total parameters", _human(counts.total)), (f"active parameters per {unit}", active)]


def _moe_context(model: nn.Module, family: Family, counts: ParameterCounts) -> dict[str, Any]:
    config = model.config
    text = config.text_config
    rows: list[tuple[str, object]] = [
        ("language model", f"`{text.model_type}`"),
        ("decoder layers", text.num_hidden_layers),
        ("hidden size", text.hidden_size),
    ]
    context: dict[str, Any] = {}
    if family.key == "moe_llava":
        rows.insert(0, ("vision tower", f"`{config.vision_config.model_type}`"))
        rows.append(("image tokens per image", config.image_seq_length))
        context["vision_tower"] = config.vision_config.model_type
    if family.key == "uni_moe":
        encoders = _uni_moe_encoders(config)
        rows.insert(0, ("media encoders", "; ".join(encoders) or "none (text only)"))
        context["encoders"] = encoders
    rows += _moe_rows(config, _experts_per_token_text(counts), text.num_hidden_layers)
    rows += _parameter_rows(counts)
    indices = resolve_moe_layers(config.moe_layers, text.num_hidden_layers)
    context.update(
        architecture=rows,
        backbone=text.model_type,
        num_layers=text.num_hidden_layers,
        num_moe_layers=len(indices),
        num_experts=config.num_experts,
        router_type=config.router_type,
    )
    return context


def _uni_moe_encoders(config: PreTrainedConfig) -> list[str]:
    encoders = []
    if config.vision_config is not None:
        encoders.append(f"image and video: `{config.vision_config.model_type}` + MLP projector")
    if config.speech_config is not None:
        encoders.append(f"speech: `{config.speech_config.model_type}` encoder + decoder-query connector")
    if config.audio_config is not None:
        encoders.append(f"audio: `{config.audio_config.model_type}` encoder + Q-Former connector")
    return encoders


def _metis_home_context(model: nn.Module, counts: ParameterCounts) -> dict[str, Any]:
    config = model.config
    base = config.base_config
    text = config.text_config
    rows: list[tuple[str, object]] = [
        ("base model", f"`{base.model_type}`" + (f" (language model `{text.model_type}`)" if text is not base else "")),
        ("decoder layers", text.num_hidden_layers),
        ("hidden size", text.hidden_size),
        ("branches (experts per layer)", ", ".join(f"`{b}`" for b in config.branch_names)),
        ("branches per query (top-k)", "1, chosen once per query and kept for every generated token"),
        ("branched layers", f"{counts.moe_layers} of {text.num_hidden_layers} (every decoder FFN)"),
        (
            "router",
            f"per query: the input of decoder layer {config.router_layer_index}, {config.router_pooling}-pooled over "
            f"the prompt, into LayerNorm -> Linear({text.hidden_size}, {config.router_width}) -> GELU -> "
            f"Linear({config.router_width}, {len(config.branch_names)})",
        ),
    ]
    options = _moe_options(base)
    if options is not None and resolve_moe_layers(options.moe_layers, text.num_hidden_layers):
        rows.append(("inside each branch", f"{base.model_type} MoE FFNs"))
        per_token = _experts_per_token_text(_branch_moe_counts(model))
        rows += [(f"base {label}", value) for label, value in _moe_rows(options, per_token, text.num_hidden_layers)]
    rows += _parameter_rows(counts, unit="query")
    return {
        "architecture": rows,
        "backbone": base.model_type,
        "num_layers": text.num_hidden_layers,
        "branch_names": list(config.branch_names),
        "router_layer": config.router_layer_index,
        "moe_base": options is not None,
    }


def _branch_moe_counts(model: nn.Module) -> ParameterCounts:
    """The counts of one branch FFN that holds MoE blocks, in a Metis-HOME over an MoE base: what a token of the
    chosen branch uses inside it."""
    for ffn in model.branch_ffns():
        branch = next(iter(ffn.branches.values()))
        if any(isinstance(module, SparseMoeBlock) for module in branch.modules()):
            return count_parameters(branch)
    return count_parameters(nn.Module())


def _ranks(number: int) -> str:
    return "1 rank" if number == 1 else f"{number} ranks"


def _adapter_context(model: PeftModel, counts: ParameterCounts) -> dict[str, Any]:
    peft_config = model.peft_config[model.active_adapter]
    base = model.get_base_model()
    text = getattr(base.config, "text_config", None) or base.config.get_text_config()
    targets = peft_config.target_modules
    target_text = (
        ", ".join(f"`{t}`" for t in sorted(targets)) if isinstance(targets, (set, list, tuple)) else f"`{targets}`"
    )
    rows: list[tuple[str, object]] = [
        ("base model", f"`{base.config.model_type}`"),
        ("decoder layers", text.num_hidden_layers),
        ("hidden size", text.hidden_size),
    ]
    if isinstance(peft_config, MixLoraConfig):
        routing = MIXLORA_ROUTING[peft_config.routing_strategy]
        if peft_config.routing_strategy == "mixlora-dynamic":
            routing += f" (p = {peft_config.top_p})"
        elif peft_config.routing_strategy == "mixlora-switch":
            routing += f" ({peft_config.expert_capacity} tokens)"
        rows += [
            ("LoRA experts per FFN", peft_config.num_experts),
            ("experts per token (top-k)", _experts_per_token_text(counts)),
            ("MixLoRA FFNs", counts.moe_layers),
            ("router", f"{routing} (`{peft_config.routing_strategy}`)"),
            ("expert LoRA", f"r = {peft_config.expert_r}, alpha = {peft_config.expert_alpha:g}"),
            ("attention LoRA", f"r = {peft_config.r}, alpha = {peft_config.lora_alpha:g}"),
        ]
    else:
        rows += [
            (
                "rank experts per layer",
                f"{counts.num_experts} (r = {peft_config.r}, {_ranks(peft_config.rank_partition)} each)",
            ),
            ("experts per token (top-k)", f"{_experts_per_token_text(counts)} (activate_r = {peft_config.activate_r})"),
            ("adapted linear layers", counts.moe_layers),
            (
                "router",
                "sigmoid scores, top-k, with an auxiliary-loss-free selection bias "
                f"(u = {peft_config.bias_update_rate:g}, `{peft_config.bias_balancing}`)",
            ),
            ("LoRA", f"r = {peft_config.r}, alpha = {peft_config.lora_alpha:g}"),
        ]
    rows += [
        ("target modules", target_text),
        ("adapter parameters", _human(counts.adapter)),
        *_parameter_rows(counts),
    ]
    return {
        "architecture": rows,
        "backbone": base.config.model_type,
        "method": "mixlora" if isinstance(peft_config, MixLoraConfig) else "smora",
        "peft_type": str(peft_config.peft_type),
        "adapter_parameters": _short(counts.adapter),
    }


__all__ = [
    "BASE_TAGS",
    "CITATIONS",
    "FAMILIES",
    "GENERATED_MARKER",
    "TEMPLATE_PACKAGE",
    "Family",
    "TrainingStage",
    "build_model_card",
    "is_generated_card",
    "is_replaceable_card",
    "looks_like_hub_id",
    "model_family",
    "pipeline_tag",
    "template_path",
    "write_model_card",
]
