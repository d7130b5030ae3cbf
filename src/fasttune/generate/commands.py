"""`fasttune generate` and `fasttune chat`: their options (dataclasses: the docstrings are the --help text) and the
functions the CLI calls. A checkpoint can be a checkpoint, a run folder, a model folder or a LoRA adapter."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from fasttune.command import Command
from fasttune.errors import ConfigError, DataError

log = logging.getLogger("fasttune")


@dataclass(kw_only=True)
class SamplingArgs(Command):
    """Options shared by `fasttune generate`, `fasttune chat` and `fasttune eval`."""

    checkpoint: str
    """Checkpoint, run folder (latest complete checkpoint; a LoRA run's merged/), model folder or LoRA adapter."""
    max_new_tokens: int = 256
    """Most tokens to generate per reply (fewer when the model's context ends first)."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N."""
    seed: int = 0
    """Random seed for sampling: each prompt draws from its own random numbers (the seed and the prompt's index in
    the input), so its answer is the same whatever --batch-size."""
    stop: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """Stop string (repeatable): an answer ends before the first one it writes, which is not part of it. A newline
    in bash: --stop $'\\n\\n'."""
    trust_remote_code: bool = False
    """Allow a model folder that ships its own Python code to run it (off: refuse such folders)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ConfigError(f"--max-new-tokens={self.max_new_tokens} is not valid; it must be > 0")
        if not 0 <= self.temperature < float("inf"):  # inf flattened the distribution to the top-k's ties
            raise ConfigError(f"--temperature={self.temperature} is not valid; it must be a number >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p={self.top_p} is not valid; it must be in (0, 1]")
        if self.top_p < 1 and self.temperature == 0:  # HF generate warns alike; vLLM's default temperature is 1
            log.warning("--top-p %s does nothing at --temperature 0 (greedy: the likeliest token); pass --temperature "
                        "above 0 (e.g. 1.0) to sample", self.top_p)  # fmt: skip
        if any(not s for s in self.stop):
            raise ConfigError("--stop '' is empty: every answer would end before it starts; pass the text to end at")
        for s in self.stop:
            if "\\n" in s or "\\t" in s:
                log.warning("--stop %r holds a backslash and a letter, not a newline or tab; in bash write "
                            "--stop $'\\n' for a newline", s)  # fmt: skip


@dataclass(kw_only=True)
class GenerateArgs(SamplingArgs):
    """Generate from a checkpoint: one prompt streamed, or a JSONL file of prompts in batches. The checkpoint can be
    a checkpoint folder, a run folder (its latest complete checkpoint; a LoRA run's merged model), a model folder or a
    LoRA adapter folder (loaded on its base model)."""

    raw: bool = False
    """Send the text as is, without the prompt format / chat template the model was trained with."""
    prompt: str | None = None
    """Text to answer, rendered with the model's prompt format unless --raw (then continued as is)."""
    prompts: str | None = None
    """JSONL file, one prompt per line (a JSON string, or an object with "prompt" (a string or a list of messages),
    "instruction" (+"input"), "messages" or "text"), or a JSON array of them, a .parquet or .csv file of such records
    (a row each), or a .txt file of plain prompts, one per line (`-`: read from standard input): completions go to
    --output, generated in batches."""
    output: str | None = None
    """JSONL file for the completions of --prompts (default: the prompts file with .completions.jsonl for its
    extension: q.jsonl -> q.completions.jsonl; standard output for prompts piped in)."""
    overwrite: bool = False
    """Replace an existing --output file."""
    batch_size: int = 32
    """Prompts generated together with --prompts."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.prompt is None) == (self.prompts is None):
            raise ConfigError("pass either --prompt TEXT or --prompts FILE.jsonl (one of them)")
        if self.prompt is not None and not self.prompt.strip():
            raise ConfigError("--prompt is empty; pass the text to answer (or --prompts FILE.jsonl)")
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size={self.batch_size} is not valid; it must be > 0")

    def run(self) -> int:
        return run_generate(self)


@dataclass(kw_only=True)
class ChatArgs(SamplingArgs):
    """Chat with a model in the terminal, replies streamed. The checkpoint can be a checkpoint folder, a run folder
    (its latest complete checkpoint; a LoRA run's merged model), a model folder or a LoRA adapter folder (loaded on
    its base model)."""

    raw: bool = False
    """Send the text as is, without the prompt format / chat template the model was trained with."""
    system: str | None = None
    """System message that opens the conversation (models with a chat template only: refused otherwise)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.raw and self.system and self.system.strip():
            raise ConfigError("--system goes with a chat template, and --raw sends each message without one; drop one "
                              "of them")  # fmt: skip

    def run(self) -> int:
        return run_chat(self)


def load_checkpoint(a: SamplingArgs, src=None, check=None):
    """(model, tokenizer) of --checkpoint, or of `src` when the caller resolved it already (a ModelSource); `check`
    (tokenizer) runs before the model loads."""
    from fasttune.model.resolve import resolve

    src = src or resolve(a.checkpoint, option="--checkpoint")  # a path that is not there: said before torch loads
    from fasttune.model.load import load_for_inference

    return load_for_inference(src, a.device, a.trust_remote_code, check=check)


def run_generate(a: GenerateArgs) -> int:
    if a.prompts is not None:  # check the files before minutes of model loading
        from fasttune.generate.prompts import check_output, is_stream, prompts_path, read_prompts, refuse_writing_over

        records = read_prompts(a.prompts)
        source = prompts_path(a.prompts)  # piped prompts (`-`, a pipe): completions to stdout unless --output
        out = (Path(a.output) if a.output else Path("/dev/stdout") if is_stream(source)
               else source.with_suffix(".completions.jsonl"))  # fmt: skip
        refuse_writing_over(out, a.prompts, "--output", "--prompts file")
        check_output(out, a.overwrite)
        model, tok = load_checkpoint(a, check=lambda tok: _check_records(tok, a, records))  # before the model
        return _generate_file(model, tok, a, records, out)
    if a.output is not None:
        raise ConfigError("--output goes with --prompts FILE; with --prompt the text is printed")
    model, tok = load_checkpoint(a)
    from fasttune.generate.generate import fast_engine, fit_context, generate_ids
    from fasttune.generate.template import prompt_format, prompt_ids

    fmt = "raw" if a.raw else prompt_format(tok)
    if fmt != "raw":
        log.info("prompt format: %s (--raw sends the text as is)", fmt)
    ids = prompt_ids(tok, [{"role": "user", "content": a.prompt}], raw=a.raw)
    budget = fit_context(model, len(ids), a.max_new_tokens, "--prompt")
    engine = fast_engine(model)  # before any text: its notice is a line of its own, not one inside the reply
    if fmt == "raw":
        sys.stdout.write(a.prompt)  # a continuation: show what it continues
    g = generate_ids(model, tok, [ids], max_new_tokens=budget, temperature=a.temperature, top_p=a.top_p,
                     seed=a.seed, stop=a.stop, on_text=_write, engine=engine)[0]  # fmt: skip
    sys.stdout.write("\n")
    print(f"[{g.new_tokens} tokens in {g.seconds:.2f} s: {g.speed()}]", file=sys.stderr)
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _check_records(tok, a: GenerateArgs, records: list[dict]) -> list[tuple[list[dict], list | None, dict]]:
    """Each record's messages, tools and chat_template_kwargs, every record checked against the prompt format (its
    roles, --raw's one message, tools and template variables the template reads)."""
    from fasttune.data.chat_fields import KWARGS, check_kwargs, record_kwargs
    from fasttune.data.chat_render import Chat, record_tools
    from fasttune.generate.prompts import WHERE, check_single, record_messages
    from fasttune.generate.template import check_roles, prompt_format

    fmt = "raw" if a.raw else prompt_format(tok)
    conversations = []
    for r in records:
        where = f"{a.prompts} {r[WHERE]}"
        messages, tools, kwargs = record_messages(r, fmt), record_tools(r, where), record_kwargs(r, where)
        if fmt == "raw":
            check_single(messages, where)
            if tools or kwargs:
                held = "'tools'" if tools else repr(KWARGS)
                raise DataError(f"{where} has {held}, and without a chat template (--raw, or a model that has none) "
                                "they are not sent; drop them, or generate through the model's chat "
                                "template")  # fmt: skip
        check_roles(messages, fmt, where, "remove it from that line (write what it says into the user message if it "
                    "matters)")  # fmt: skip
        check_kwargs(tok, kwargs, tools, where)
        Chat(tok, messages, tools, where, kwargs=kwargs).check_tools()
        conversations.append((messages, tools, kwargs))
    return conversations


def _generate_file(model, tok, a: GenerateArgs, records: list[dict], out: Path) -> int:
    from tqdm.auto import tqdm

    from fasttune.generate.generate import fast_engine, fit_context, generate_ids, length_batches
    from fasttune.generate.prompts import WHERE, write_jsonl
    from fasttune.generate.template import prompt_ids

    conversations = _check_records(tok, a, records)  # checked before the model loaded; their messages
    ids = []
    for r, (messages, tools, kwargs) in zip(records, conversations, strict=True):
        ids.append(prompt_ids(tok, messages, raw=a.raw, tools=tools, kwargs=kwargs))
        if not ids[-1]:  # --raw (or no template) and no BOS: nothing for the model to continue
            raise DataError(f"{a.prompts} {r[WHERE]}: the prompt is empty (no tokens to continue); give it some text "
                            "or remove the line")  # fmt: skip
        fit_context(model, len(ids[-1]), 1, f"{a.prompts} {r[WHERE]}: the prompt")
    done: dict[int, dict] = {}
    new_tokens, seconds = 0, 0.0
    engine = fast_engine(model)  # one for the whole file: its graphs serve every batch
    # no bar when stderr is redirected (as in training): its redraws would fill the file
    bar = tqdm(total=len(ids), desc="generate", unit="prompt", file=sys.stderr, disable=not sys.stderr.isatty())
    try:
        for _, rows, budget in length_batches(model, ids, a.batch_size, a.max_new_tokens):
            gens = generate_ids(model, tok, [ids[i] for i in rows], max_new_tokens=budget, temperature=a.temperature,
                                top_p=a.top_p, seed=a.seed, indices=rows, stop=a.stop, engine=engine)  # fmt: skip
            for i, g in zip(rows, gens, strict=True):
                record = {k: v for k, v in records[i].items() if k != WHERE}
                if "completion" in record and "reference" not in record:  # prompt/completion data's own answer
                    record["reference"] = record.pop("completion")
                done[i] = {**record, "completion": g.text, "new_tokens": g.new_tokens, "finished": g.finished,
                           "stop": g.stop}  # fmt: skip
            new_tokens += sum(g.new_tokens for g in gens)
            seconds += gens[0].seconds
            bar.update(len(rows))
            bar.set_postfix_str(f"{new_tokens / seconds:,.0f} tok/s" if seconds else "")
    except KeyboardInterrupt:  # the answers made so far are kept, not lost with the batch being made
        if done:
            write_jsonl(out, [done[i] for i in sorted(done)])
            print(f"interrupted: the {len(done)} of {len(ids)} completions made so far -> {out} (in the order of "
                  "their prompts; the others are left out)", file=sys.stderr)  # fmt: skip
        raise
    finally:
        bar.close()
    write_jsonl(out, [done[i] for i in range(len(ids))])
    print(f"{len(ids)} completions -> {out} ({new_tokens:,} tokens in {seconds:.1f} s: "
          f"{new_tokens / max(seconds, 1e-9):,.0f} tok/s)", file=sys.stderr)  # fmt: skip
    return 0


def run_chat(a: ChatArgs) -> int:
    from fasttune.model.resolve import resolve

    src = resolve(a.checkpoint, option="--checkpoint")  # a path that is not there: said before torch loads
    from fasttune.generate.chat import chat_loop, check_system

    model, tok = load_checkpoint(a, src, check=lambda tok: check_system(tok, a.system, a.raw))  # before the model
    return chat_loop(model, tok, raw=a.raw, system=a.system, max_new_tokens=a.max_new_tokens,
                     temperature=a.temperature, top_p=a.top_p, seed=a.seed, stop=a.stop)  # fmt: skip
