"""Text generation from a checkpoint: greedy or sampled (temperature, top-p), streamed, with tokens/s."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from threading import Thread

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from fasttune.device import pick_device
from fasttune.errors import FasttuneError
from fasttune.generate.fast import fast_generate, unsupported_reason

log = logging.getLogger("fasttune")


@dataclass
class Generation:
    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def load_for_generation(checkpoint: str | Path, device: str = "auto"):
    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise FasttuneError(
            f"--checkpoint {path}: no config.json there; pass a checkpoint folder such as "
            "runs/quick/checkpoints/step-000200"
        )
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(dev).eval()
    return model, tokenizer


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stream: bool = False,
    seed: int = 0,
) -> Generation:
    """Generate a continuation of `prompt`; with stream=True the text is printed as it is produced."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    if enc["input_ids"].shape[1] == 0:
        raise FasttuneError("--prompt is empty after tokenization; pass some text")
    torch.manual_seed(seed)
    reason = "fast path needs CUDA graphs" if device.type != "cuda" else unsupported_reason(model)
    if reason is None:
        return _generate_fast(model, tokenizer, enc, max_new_tokens, temperature, top_p, stream)
    log.info("generate: HF generate (%s)", reason)
    kwargs = dict(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        use_cache=True,
    )
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    t0 = time.perf_counter()
    if stream:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}
        thread = Thread(target=lambda: result.update(out=model.generate(**kwargs, streamer=streamer)))
        thread.start()
        for piece in streamer:
            sys.stdout.write(piece)
            sys.stdout.flush()
        thread.join()
        out = result["out"]
        sys.stdout.write("\n")
    else:
        out = model.generate(**kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    new = out[0, enc["input_ids"].shape[1] :]
    return Generation(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), seconds)


def _generate_fast(model, tokenizer, enc, max_new_tokens: int, temperature: float, top_p: float, stream: bool):
    """fasttune's static-cache decode loop (`fast.py`) for one call: HF generate's greedy tokens, faster."""
    prompt_len = enc["input_ids"].shape[1]
    new: list[int] = []
    printed = ""

    def on_token(tokens_B: list[int]) -> None:
        nonlocal printed
        new.append(tokens_B[0])
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text

    t0 = time.perf_counter()
    out = fast_generate(
        model,
        enc["input_ids"],
        enc.get("attention_mask"),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=(getattr(model.generation_config, "top_k", None) or 0) if temperature > 0 else 0,  # HF's default 50
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id or 0,
        on_token=on_token if stream else None,
        # One call per process (the CLI, the end-of-training sample): capturing a graph per KV length costs about
        # what it saves within a single call (docs/BENCHMARKS.md), so only the static-cache loop runs here.
        use_graphs=False,
    )
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if stream:
        sys.stdout.write("\n")
    tokens = out[0, prompt_len:]
    return Generation(tokenizer.decode(tokens, skip_special_tokens=True), int(tokens.numel()), seconds)
