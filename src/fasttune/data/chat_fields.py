"""Fields of chat data beside role and content that steer what is trained and how the template renders a record.

Per message (Axolotl's): `training` (true/false: Axolotl's `message_field_training: training`) and `weight` (0 or 1:
Axolotl's ShareGPT / chat_template weight) say whether that message is trained. An assistant message marked false / 0
is context, one marked true / 1 is trained; a message of another role marked true / 1 is trained too, as Axolotl
trains it (its content through its end-of-turn token). Unmarked messages: assistant ones are trained, the rest are
context. A blank message is never trained (it would teach an instant end of turn). Neither key reaches the template.

Per record (TRL's): `chat_template_kwargs`, a dict of extra variables for the chat template (Qwen3's
{"enable_thinking": false}), passed to it wherever that record is rendered: training, eval and `generate --prompts`.
Null values are dropped (a Parquet or `datasets` column gives one record's keys to every record, as nulls), as
transformers drops a message's null keys.
"""

from __future__ import annotations

from fasttune.errors import DataError

TRAINING_KEYS = ("training", "weight")
KWARGS = "chat_template_kwargs"
_RESERVED = frozenset(
    "conversation conversations messages tools documents chat_template add_generation_prompt continue_final_message "
    "tokenize sanitize_control_tokens padding truncation max_length return_tensors return_dict "
    "return_assistant_tokens_mask tokenizer_kwargs".split()
)
"""apply_chat_template's own parameters and the variables it sets: a kwarg of that name would collide."""


def check_message_flags(message: dict, where: str) -> None:
    """Refuse a `training` that is not a boolean, a `weight` other than 0 or 1, or the two disagreeing; `where`
    names the message ("data.jsonl line 3: messages[2]")."""
    training, weight = message.get("training"), message.get("weight")
    if training is not None and not isinstance(training, bool):
        raise DataError(f"{where}.training must be true or false (Axolotl's message_field_training), got "
                        f"{_shown(training)}; fix the record")  # fmt: skip
    if weight is None:
        return
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight not in (0, 1):
        raise DataError(f"{where}.weight must be 0 (context) or 1 (trained), got {_shown(weight)}; weights in between "
                        "are not supported: use 0 or 1")  # fmt: skip
    if training is not None and training != bool(weight):
        raise DataError(f"{where} has training {str(training).lower()} and weight {weight:g}, which disagree; keep "
                        "one of them")  # fmt: skip


def message_flag(message: dict) -> bool | None:
    """Whether the message's `training` / `weight` marks it trained (True), context (False), or neither (None)."""
    if message.get("training") is not None:
        return message["training"]
    return None if message.get("weight") is None else bool(message["weight"])


def check_prompt_flags(prompt: list[dict], where: str) -> None:
    """A conversational prompt/completion's prompt is context (TRL trains the completion): a message in it marked
    trained would be passed over in silence."""
    for j, message in enumerate(prompt):
        if message_flag(message):
            key = "training true" if message.get("training") is not None else "weight 1"
            raise DataError(f"{where}: prompt[{j}] is marked trained ({key}), but a prompt is context (the completion "
                            "is trained); move the message into the completion or drop the key")  # fmt: skip


def template_messages(messages: list[dict]) -> list[dict]:
    """The messages as the chat template gets them: without the training keys."""
    return [{k: v for k, v in m.items() if k not in TRAINING_KEYS} for m in messages]


def record_kwargs(record: dict, where: str) -> dict:
    """A record's chat_template_kwargs (its null values dropped), {} when it has none; refused unless a dict of
    variables with string names that apply_chat_template does not set itself."""
    kwargs = record.get(KWARGS)
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise DataError(f"{where}: field {KWARGS!r} must be an object of template variables with string names (as "
                        f'TRL reads it, e.g. {{"enable_thinking": false}}), got {_shown(kwargs)}; fix the '
                        "record")  # fmt: skip
    if taken := sorted(_RESERVED.intersection(kwargs)):
        raise DataError(f"{where}: {KWARGS} sets {', '.join(taken)}, which the chat template is given by fasttune "
                        "(from the record's messages and tools, or the run); drop the key")  # fmt: skip
    return {k: v for k, v in kwargs.items() if v is not None}


def check_kwargs(tokenizer, kwargs: dict, tools: list | None, where: str) -> None:
    """Refuse template variables the chat template never reads (Qwen3's enable_thinking given to a Llama template):
    the record would be rendered as if they were not there."""
    if not kwargs:
        return
    names = _template_variables(tokenizer, tools)
    if names is not None and (unread := sorted(set(kwargs) - names)):
        raise DataError(f"{where}: {KWARGS} sets {', '.join(unread)}, which the chat template does not read; drop "
                        "them, or use a model whose chat template does")  # fmt: skip


def _template_variables(tokenizer, tools: list | None) -> frozenset[str] | None:
    """The variables the tokenizer's chat template reads (None when that cannot be told)."""
    try:
        from transformers.utils.chat_template_utils import _get_template_variables

        return _get_template_variables(tokenizer.get_chat_template(None, tools))
    except Exception:  # another transformers, or a template jinja cannot parse: not checked here
        return None


def _shown(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} ({text[:40]}{'...' if len(text) > 40 else ''})"
