"""A byte-level BPE tokenizer trained locally with HF `tokenizers`, saved in `tokenizer.json` format so that
`AutoTokenizer.from_pretrained` loads it. Cached by corpus fingerprint and vocabulary size."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fasttune.durable import fsync_dir, fsync_tree, umask
from fasttune.errors import ConfigError, one_line
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
    """Load the tokenizer for this corpus from the cache, or train and cache it (atomically: written into a temporary
    folder, every file fsync'ed, then renamed into place). A cached one that does not load (damaged by a power cut
    before its bytes reached the disk, or by hand) is trained again and replaced, said in one line."""
    path = Path(cache_dir) / f"tokenizer-{fingerprint}-{vocab_size}"
    cached = _load_cached(path)
    if cached is not None:
        return cached
    log.info("training a %d-token byte-level BPE tokenizer on %d documents", vocab_size, len(texts))
    tok = train_tokenizer(texts, vocab_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path.parent)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-tokenizer-"))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would hide a shared cache from the other users
    except OSError as e:
        raise ConfigError(
            f"data.cache_dir={cache_dir!r} is not writable ({e.strerror or e}); pass "
            "--data.cache-dir DIR with a writable folder"
        ) from None
    try:
        tok.save_pretrained(tmp)
        fsync_tree(tmp)
    except BaseException as e:  # a full disk, Ctrl-C: nothing half-written stays (a kill's is removed by a later run)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ConfigError(f"could not cache the tokenizer in data.cache_dir={cache_dir!r} ({e.strerror or e}); "
                              "free disk space or pass --data.cache-dir DIR with room") from None  # fmt: skip
        raise
    if (cached := _load_cached(path, quiet=True)) is not None:
        shutil.rmtree(tmp, ignore_errors=True)  # another run (a torchrun rank) cached it meanwhile: theirs is used
        return cached
    if path.exists():  # damaged: moved aside in one rename (another process may be replacing it too), then deleted
        aside = Path(f"{tmp}-damaged")
        with contextlib.suppress(OSError):
            os.rename(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(path)


def _load_cached(path: Path, quiet: bool = False) -> PreTrainedTokenizerFast | None:
    """The tokenizer cached at `path`; None where there is none or it does not load (said, unless `quiet`)."""
    if not path.exists():
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except PermissionError:  # not damage: another user's cache is never replaced
        raise ConfigError(f"the cached tokenizer {path} cannot be read (permission denied); make it readable "
                          "(chmod -R u+rX) or pass another --data.cache-dir") from None  # fmt: skip
    except Exception as e:  # transformers raises many types for a damaged file; all mean the same here
        if not quiet:
            why = one_line(e, 120, typed=True)
            log.warning("the cached tokenizer %s does not load (%s); training it again", path, why)
        return None


STALE_AFTER_S = 3600
"""A `.tmp-tokenizer-*` folder older than this is what a killed run left (a save takes seconds): removed."""


def _remove_stale_temporaries(cache: Path) -> None:
    for p in cache.glob(".tmp-tokenizer-*"):
        with contextlib.suppress(OSError):
            if time.time() - p.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(p, ignore_errors=True)


def fit_model_max_length(tokenizer, model_config) -> None:
    """Give a tokenizer without a real length limit (a locally trained one has HF's placeholder 1e30) the model's
    context (max_position_embeddings), so that the checkpoint's tokenizer_config.json makes plain HF truncation
    (`tokenizer(text, truncation=True)`) cut at the context. A limit the tokenizer already has is kept."""
    context = context_length(model_config)
    limit = getattr(tokenizer, "model_max_length", None)
    if context and (limit is None or limit > 10**9):  # 1e9+: HF's "no limit" placeholders, never a real context
        tokenizer.model_max_length = int(context)


def pad_with_eos(tokenizer):
    """A model's tokenizer without a pad token (GPT-2's, Llama 3's) pads with its EOS, in training and in inference
    alike; returns it."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def without_length_warning(tokenizer) -> None:
    """transformers warns once per tokenizer that a text longer than model_max_length "will result in indexing
    errors"; fasttune cuts samples to data.max_length itself (data.overlong), so here that warning is noise (it
    showed on every resume and eval, whose tokenizers carry the model's context)."""
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
