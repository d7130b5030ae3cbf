"""A byte-level BPE tokenizer trained locally with HF `tokenizers`, saved in `tokenizer.json` format so that
`AutoTokenizer.from_pretrained` loads it. Cached by corpus fingerprint and vocabulary size."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fasttune.errors import ConfigError
from fasttune.model.context import context_length

log = logging.getLogger("fasttune")

EOS, PAD = "<|endoftext|>", "<|pad|>"
# A minimal chat template so that chat-format data works with the locally trained tokenizer.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )


def cached_tokenizer(texts: list[str], vocab_size: int, cache_dir: str, fingerprint: str) -> PreTrainedTokenizerFast:
    """Load the tokenizer for this corpus from the cache, or train and cache it (atomically)."""
    path = Path(cache_dir) / f"tokenizer-{fingerprint}-{vocab_size}"
    if (path / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(path)
    log.info("training a %d-token byte-level BPE tokenizer on %d documents", vocab_size, len(texts))
    tok = train_tokenizer(texts, vocab_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-tokenizer-"))
    except OSError as e:
        raise ConfigError(
            f"data.cache_dir={cache_dir!r} is not writable ({e.strerror or e}); pass "
            "--data.cache-dir DIR with a writable folder"
        ) from None
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(path)


def fit_model_max_length(tokenizer, model_config) -> None:
    """Give a tokenizer without a real length limit (a locally trained one has HF's placeholder 1e30) the model's
    context (max_position_embeddings), so that the checkpoint's tokenizer_config.json makes plain HF truncation
    (`tokenizer(text, truncation=True)`) cut at the context. A limit the tokenizer already has is kept."""
    context = context_length(model_config)
    limit = getattr(tokenizer, "model_max_length", None)
    if context and (limit is None or limit > 10**9):  # 1e9+: HF's "no limit" placeholders, never a real context
        tokenizer.model_max_length = int(context)


def without_length_warning(tokenizer) -> None:
    """transformers warns once per tokenizer that a text longer than model_max_length "will result in indexing
    errors"; fasttune cuts samples to data.max_length itself (data.overlong), so here that warning is noise (it
    showed on every resume and eval, whose tokenizers carry the model's context)."""
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
