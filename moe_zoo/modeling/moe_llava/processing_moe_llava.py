# Copyright 2026 The moe-zoo authors. Licensed under the Apache License, Version 2.0.
"""MoE-LLaVA's processor: Llava's (a real ``<image>`` token expanded to the number of image features, no -200
sentinel) with MoE-LLaVA's conversation template as the default chat template."""

from __future__ import annotations

from transformers import LlavaProcessor

MOE_LLAVA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# The original's conversation (``conv_phi`` / ``conv_stablelm``, SeparatorStyle.TWO, sep " ", sep2 = EOS):
# "{system} USER: <image>\n{question} ASSISTANT: {answer}{eos}USER: ... ASSISTANT:"
MOE_LLAVA_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '" + MOE_LLAVA_SYSTEM_PROMPT.replace("'", "\\'") + "' -%}{%- endif -%}"
    "{{- system + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set images = '' -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('\\n') -%}"
    "{%- set images = '<image>\\n' * (message['content'] | selectattr('type', 'equalto', 'image') | list | length) -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' + images + text + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + text + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


class MoeLlavaProcessor(LlavaProcessor):
    """``LlavaProcessor`` with MoE-LLaVA's conversation template by default.

    ``processor(images=..., text=...)`` expands each ``<image>`` in the text to as many tokens as the vision tower
    gives features (``patch_size`` and ``vision_feature_select_strategy`` must match the model config), so the
    model's placeholder check holds.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        **kwargs,
    ):
        # Llava's options are named here: ProcessorMixin saves only what ``__init__``'s signature names.
        super().__init__(
            image_processor,
            tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template or MOE_LLAVA_CHAT_TEMPLATE,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )


__all__ = ["MOE_LLAVA_CHAT_TEMPLATE", "MOE_LLAVA_SYSTEM_PROMPT", "MoeLlavaProcessor"]
