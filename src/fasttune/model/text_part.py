"""Vision-language checkpoints whose language model transformers also ships as a causal LM of its own: Gemma 3
(`AutoModelForCausalLM` builds `Gemma3ForConditionalGeneration` whole; its config.json names no attention heads at
its top level) and LLaVA-style models such as Mistral 3 (no causal-LM class for the whole). fasttune trains and writes
the language model alone (`Gemma3ForCausalLM`, `MistralForCausalLM` from the checkpoint's `text_config` and its
`language_model` weights), on text, as TRL and Unsloth fine-tune such checkpoints text-only: its checkpoints load with
`AutoModelForCausalLM` and generate text; the vision tower is neither trained nor saved, and the log says so. Other
configs are left as they are."""

from __future__ import annotations

import copy
import logging
import re

log = logging.getLogger("fasttune")

TEXT_WEIGHTS = {
    r"^language_model\.model\.": "model.",  # the layout of the Hub's Gemma 3 files (and of transformers' saves)
    r"^language_model\.lm_head\.": "lm_head.",
    r"^model\.language_model\.": "model.",  # transformers' own module names
}
"""from_pretrained's `key_mapping`: the language model's weights under a causal LM's names."""


def text_config(config):
    """The language model's config of a vision-language `config` that AutoModelForCausalLM would load whole, where
    that language model has a causal-LM class of its own; None for any other config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    get = getattr(config, "get_text_config", None)
    text = get() if get is not None else config
    if text is config or hasattr(config, "num_attention_heads"):
        return None
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(text, "model_type", None), "")
    if not causal.endswith("ForCausalLM"):
        return None
    text = copy.deepcopy(text)
    if isinstance(tied := getattr(config, "tie_word_embeddings", None), bool):  # the whole model's says (Mistral 3
        text.tie_word_embeddings = tied  # ties at the top, its text_config not: no lm_head in the files)
    return text


def loading_kwargs(config, option: str, path) -> dict:
    """from_pretrained's extra arguments that load the language model alone (empty for a text model), said once."""
    text = text_config(config)
    if text is None:
        return {}
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    whole = architecture(config)
    log.warning("%s %s is a vision-language model (%s): fasttune loads its language model alone (%s), for text; "
                "the vision tower is not loaded, so neither trained nor saved", option, path, whole,
                MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text.model_type])  # fmt: skip
    return {"config": text, "key_mapping": TEXT_WEIGHTS}


def architecture(config) -> str:
    """The model class a config.json names (its `architectures`), else its config class's name."""
    return (getattr(config, "architectures", None) or [type(config).__name__])[0]


def is_vision_language(config) -> bool:
    """Whether `config` holds a language model's config beside others (a vision or audio tower's)."""
    get = getattr(config, "get_text_config", None)
    return get is not None and get() is not config


def forget_renaming(model) -> None:
    """After loading with TEXT_WEIGHTS: transformers (5.x) keeps a load's renamings and reverses them on save, which
    would write the causal LM's weights under the vision-language names (`language_model.model.*`) that its own class
    does not load; the checkpoints are the causal LM's, under its own names."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [
            c for c in conversions if not set(getattr(c, "source_patterns", ())) & set(TEXT_WEIGHTS)
        ]


def not_language(name: str) -> bool:
    """Whether a weight name of such a checkpoint is outside its language model (the towers, the projector)."""
    return not any(re.match(pattern, name) for pattern in (*TEXT_WEIGHTS, r"^lm_head\."))
