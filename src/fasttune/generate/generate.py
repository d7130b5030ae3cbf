"""Text generation from a checkpoint: greedy or sampled (temperature, top-p), one prompt streamed or many batched.

On a CUDA GPU the fast decode path (`generate/fast.py`: fused static-cache decoder, CUDA graphs) runs by default;
on the CPU, or for a model it does not support, HF `generate` runs and the log says why. Both take left-padded
batches and stop each row at its own end of sequence (EOS, and a chat template's end-of-turn token) or stop string
(`stops.py`), and sample each prompt with its own random numbers (`sampling.py`: seed and the prompt's index).

Legend: B batch, P prompt length (padded), N new tokens.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import TextStreamer

from fasttune.errors import FasttuneError
from fasttune.generate.fast import Generator
from fasttune.generate.sampling import hf_sampling, sample_key, sampling_top_k
from fasttune.generate.stops import StopOnText, StopStream, StopStrings
from fasttune.model.context import context_length, describe_context

log = logging.getLogger("fasttune")


@dataclass
class Generation:
    text: str
    new_tokens: int
    seconds: float
    """Wall time of the batch this generation was part of."""
    finished: bool = True
    """Stopped at an end-of-sequence token or a stop string (False: cut at max_new_tokens)."""
    stop: str | None = None
    """The stop string the text was cut before (None: none in it)."""
    capture_seconds: float = 0.0
    """Of `seconds`, the fast path's CUDA graph capture (the first call of a kind, once per model)."""
    prefill_seconds: float = 0.0
    """Of `seconds`, the fast path's prompt pass, which gives the first new token (a first call's includes CUDA's
    lazy start-up: 3.4 s for the first generation in a process on an H200)."""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def speed(self) -> str:
        """tokens/s as a single generation reports it: decoding apart from the prompt pass and the graph capture,
        which dominate a first call (an H200 sample of 64 tokens after training said 121 tok/s; later calls of the same
        model ran ~840)."""
        decode = self.seconds - self.prefill_seconds - self.capture_seconds
        if self.prefill_seconds <= 0 or decode <= 0 or self.new_tokens < 2:
            return f"{self.tokens_per_s:,.1f} tok/s"
        apart = f"prompt {self.prefill_seconds:.2f} s" + (
            f", CUDA graph capture {self.capture_seconds:.2f} s" if self.capture_seconds > 0 else "")  # fmt: skip
        return f"{(self.new_tokens - 1) / decode:,.1f} tok/s decoding; {apart} (a first call includes CUDA's start-up)"


def fast_engine(model, graphs: bool | None = None) -> Generator | None:
    """The fast decode path for `model` on a GPU (keep it: its graphs and fused weights serve every later call), or
    None on the CPU, where HF `generate` runs (the reference the fast path is tested against). Logs which runs."""
    if next(model.parameters()).device.type != "cuda":
        log.info("generate: HF generate (the fast path needs a CUDA GPU)")
        return None
    engine = Generator(model, use_graphs=graphs)
    log.info("generate: %s", "fast path" if engine.reason is None else f"HF generate ({engine.reason})")
    return engine


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: EOS (tokenizer and generation config) and the end-of-turn token the chat template
    writes after an assistant message (e.g. ChatML's <|im_end|>, which is not always the EOS)."""
    from fasttune.generate.template import end_of_turn_id

    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def fit_context(model, prompt_len: int, max_new_tokens: int, what: str = "the prompt") -> int:
    """max_new_tokens, shortened to the model's context (model/context.py); a prompt that does not fit stops."""
    context = context_length(model.config)
    if not context:
        return max_new_tokens
    if prompt_len >= context:
        raise FasttuneError(
            f"{what} is {prompt_len} tokens, but the model's context is {context} ({describe_context(model.config)}): "
            "shorten it (or use a model with a longer context)"
        )
    if prompt_len + max_new_tokens > context:
        log.warning("%s: %d tokens + %d new exceed the context %d; generating at most %d new tokens", what,
                    prompt_len, max_new_tokens, context, context - prompt_len)  # fmt: skip
        return context - prompt_len
    return max_new_tokens


def length_batches(model, prompts: list[list[int]], batch_size: int,
                   max_new_tokens: int) -> Iterator[tuple[int, list[int], int]]:  # fmt: skip
    """(first position, prompt indices, new-token budget) per batch: the prompts sorted by length (less padding), at
    most batch_size together, each batch of one budget. A left-padded batch can only generate what the context
    leaves its longest prompt, so a prompt near the context's end is not batched with shorter ones: they get every
    token they get one at a time. The prompts cut short are said once (fit_context stops a prompt that does not fit)."""
    context = context_length(model.config)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    if order:  # the longest: a prompt that does not fit stops here
        fit_context(model, len(prompts[order[-1]]), 1, "a prompt")
    budget = [min(max_new_tokens, context - len(prompts[i])) if context else max_new_tokens for i in order]
    if cut := sum(b < max_new_tokens for b in budget):
        log.warning("%s: prompt + --max-new-tokens %d exceed the context %d; %s at most what the context leaves",
                    "1 prompt" if cut == 1 else f"{cut} prompts", max_new_tokens, context,
                    "its answer gets" if cut == 1 else "their answers get")  # fmt: skip
    lo = 0
    while lo < len(order):
        hi = lo + 1
        while hi < len(order) and hi - lo < batch_size and budget[hi] == budget[lo]:
            hi += 1
        yield lo, order[lo:hi], budget[lo]
        lo = hi


def _left_pad(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    ids_BP = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):
        ids_BP[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask_BP[i, width - len(ids) :] = 1
    return ids_BP.to(device), mask_BP.to(device)


class _Printer(TextStreamer):
    """HF's TextStreamer (word-boundary and multi-byte safe decoding), handing text to a callback instead of print."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    batch: list[list[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    indices: list[int] | None = None,
    stop: list[str] | tuple[str, ...] = (),
    on_text: Callable[[str], None] | None = None,
    engine: Generator | None = None,
) -> list[Generation]:
    """Generate for each prompt (token ids) of `batch`, all at once; `on_text` (batch of one) gets the text as it
    is produced. Sampling draws each prompt's tokens from its own random numbers, from `seed` and its index in the
    input (`indices`, default 0, 1, ...), so a prompt's answer does not depend on the batch it is in. `stop`: stop
    strings (the text is cut before the first one). `engine`: the `fast_engine` of this model (None: HF generate)."""
    if on_text is not None and len(batch) != 1:
        raise ValueError("streaming needs a batch of one")
    if any(not ids for ids in batch):
        raise FasttuneError("a prompt is empty after tokenization; pass some text")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    eos = stop_ids(model, tokenizer)
    ids_BP, mask_BP = _left_pad(batch, pad_id, device)
    keys = [sample_key(seed, i) for i in (range(len(batch)) if indices is None else indices)]
    top_k = sampling_top_k(model) if temperature > 0 else 0
    run = _Run(eos, pad_id, max_new_tokens, (temperature, top_p, top_k), keys, StopStrings(tokenizer, stop))
    stream = None if on_text is None else StopStream(run.stops, on_text)
    t0 = time.perf_counter()
    captured = engine.capture_seconds if engine is not None else 0.0
    if engine is not None:
        out_BS = _fast(engine, tokenizer, ids_BP, mask_BP, run, stream)
    else:
        out_BS = _hf(model, tokenizer, ids_BP, mask_BP, run, stream)
    if stream is not None:
        stream.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    timing = (engine.capture_seconds - captured, engine.prefill_seconds) if engine is not None else (0.0, 0.0)
    return [_result(row[ids_BP.shape[1] :], run, seconds, timing) for row in out_BS.tolist()]


@dataclass
class _Run:
    """The settings of one `generate_ids` call, as both paths take them."""

    eos: list[int]
    pad_id: int
    max_new_tokens: int
    sampling: tuple[float, float, int]  # temperature, top_p, top_k
    keys: list[int]  # each prompt's sample key (sampling.sample_key)
    stops: StopStrings


def _result(new: list[int], run: _Run, seconds: float, timing: tuple[float, float]) -> Generation:
    end = next((i for i, t in enumerate(new) if t in run.eos), None)
    kept = new if end is None else new[: end + 1]  # the end-of-sequence token counts; the pad after it does not
    text, stop = run.stops.cut(run.stops.text(kept))
    if stop is not None:  # the tokens up to the one that completed the stop string count
        n = run.stops.find(kept if end is None else kept[:end]) or len(kept)
        return Generation(text, n, seconds, True, stop, *timing)
    return Generation(text, len(kept), seconds, end is not None, None, *timing)


def _fast(engine, tokenizer, ids_BP, mask_BP, run: _Run, stream: StopStream | None):
    """fasttune's fused static-cache decoder with CUDA graphs (`fast.py`); it streams in bursts of a few tokens."""
    new: list[int] = []
    printed = ""

    def on_token(tokens_B: list[int]) -> None:
        nonlocal printed
        if tokens_B[0] in run.eos:
            return  # the reply ends here (a batch of one stops at once)
        new.append(tokens_B[0])
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            stream.write(text[len(printed) :])
            printed = text

    temperature, top_p, top_k = run.sampling
    out_BS = engine.generate(ids_BP, mask_BP, max_new_tokens=run.max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, eos_token_id=run.eos, pad_token_id=run.pad_id,
                             on_token=on_token if stream is not None else None, keys=run.keys,
                             stop_strings=run.stops)  # fmt: skip
    if stream is not None:  # the reply's end: a character its last token left incomplete is shown as decoded
        stream.write(tokenizer.decode(new, skip_special_tokens=True)[len(printed) :])
    return out_BS


def _hf(model, tokenizer, ids_BP, mask_BP, run: _Run, stream: StopStream | None):
    """Plain HF `generate`, greedy: sampling is its warpers and then each row's own draw (sampling.hf_sampling), as
    logits processors; stop strings a stopping criterion."""
    prompt_len = ids_BP.shape[1]
    kwargs = dict(
        input_ids=ids_BP,
        attention_mask=mask_BP,
        max_new_tokens=run.max_new_tokens,
        do_sample=False,
        pad_token_id=run.pad_id,
        eos_token_id=run.eos or None,
        use_cache=True,
        temperature=None,
        top_p=None,
        top_k=None,
        logits_processor=hf_sampling(*run.sampling, run.keys, prompt_len),
    )
    if run.stops:
        kwargs["stopping_criteria"] = [StopOnText(run.stops, prompt_len)]
    if stream is not None:
        kwargs["streamer"] = _Printer(tokenizer, stream.write)
    return model.generate(**kwargs)


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def generate(model, tokenizer, prompt: str | list[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, stream: bool = False, seed: int = 0, stop: list[str] | tuple[str, ...] = (),
             engine: Generator | None = None) -> Generation:  # fmt: skip
    """Continue one prompt (text, tokenized as is, or token ids); with stream=True the text is printed as produced."""
    ids = list(tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise FasttuneError("--prompt is empty after tokenization; pass some text")
    max_new_tokens = fit_context(model, len(ids), max_new_tokens)
    engine = engine or fast_engine(model)
    g = generate_ids(model, tokenizer, [ids], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     seed=seed, stop=stop, on_text=_stdout if stream else None, engine=engine)[0]  # fmt: skip
    if stream:
        _stdout("\n")
    return g
