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
    the input), so its answer does not depend on the other prompts of its batch (generate and eval --batch-size)."""
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
    """JSONL file (`-`: JSON lines from standard input), one prompt per line (a JSON string, or an object with "prompt"
    (a string or a list of messages), "instruction" (+"input"), "messages" or "text"), or a JSON array of them, a
    .parquet or .csv file of such records (a row each), or a .txt file of plain prompts, one per line: completions go to
    --output, generated in batches; a prompt longer than the model's context, or empty, is skipped (its output line
    says why, and one line at the end counts them)."""
    output: str | None = None
    """JSONL file for the completions of --prompts (default: the prompts file with .completions.jsonl for its
    extension: q.jsonl -> q.completions.jsonl; standard output for prompts piped in)."""
    overwrite: bool = False
    """Replace an existing --output file."""
    batch_size: int = 32
    """Prompts generated together with --prompts."""
    limit: int | None = None
    """Generate only the first N prompts of --prompts (as `eval --limit` scores its first N samples): --output holds
    their N lines, a skipped prompt among them counted as one; the whole file is still read and checked."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.prompt is None) == (self.prompts is None):
            raise ConfigError("pass either --prompt TEXT or --prompts FILE.jsonl (one of them)")
        if self.limit is not None and self.prompts is None:
            raise ConfigError("--limit goes with --prompts FILE (its first N prompts); --prompt is one prompt")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"--limit={self.limit} is not valid; it must be > 0")
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
    (tokenizer, the model's config) runs before the model loads."""
    from fasttune.model.resolve import resolve

    src = src or resolve(a.checkpoint, option="--checkpoint")  # a path that is not there: said before torch loads
    from fasttune.model.load import load_for_inference

    return load_for_inference(src, a.device, a.trust_remote_code, check=check)


def run_generate(a: GenerateArgs) -> int:
    if a.prompts is not None:  # check the files before minutes of model loading
        from fasttune.generate.prompts import check_output, is_stream, prompts_path, read_prompts, refuse_writing_over

        records = read_prompts(a.prompts)[: a.limit]
        source = prompts_path(a.prompts)  # piped prompts (`-`, a pipe): completions to stdout unless --output
        out = (Path(a.output) if a.output else Path("/dev/stdout") if is_stream(source)
               else source.with_suffix(".completions.jsonl"))  # fmt: skip
        refuse_writing_over(out, a.prompts, "--output", "--prompts file")
        check_output(out, a.overwrite)
        held = {}  # every prompt checked and tokenized before the model loads: a file of none to answer refused then
        model, tok = load_checkpoint(a, check=lambda tok, config: held.update(ids=_prompt_ids(tok, config, a, records)))
        return _generate_file(model, tok, a, records, out, *held["ids"])
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


def _generate_file(model, tok, a: GenerateArgs, records: list[dict], out: Path, ids: list[list[int]],
                   skipped: dict[int, tuple]) -> int:  # fmt: skip
    """Generate the answers to `records` (their prompt tokens `ids`, those `skipped` left out: _prompt_ids) into
    `out`."""
    from tqdm.auto import tqdm

    from fasttune.generate.generate import fast_engine, generate_ids, length_batches
    from fasttune.generate.prompts import write_jsonl
    from fasttune.streams import printed_above

    kept = [i for i in range(len(ids)) if i not in skipped]
    skip_rows = {i: _row(records[i], completion=None, new_tokens=0, finished=None, stop=None,
                         skipped=f"{why}: {detail}") for i, (_, why, detail) in skipped.items()}  # fmt: skip
    done: dict[int, dict] = {}
    new_tokens, seconds = 0, 0.0
    engine = fast_engine(model)  # one for the whole file: its graphs serve every batch
    # no bar when stderr is redirected (as in training): its redraws would fill the file
    bar = tqdm(total=len(kept), desc="generate", unit="prompt", file=sys.stderr, disable=not sys.stderr.isatty())
    try:
        with printed_above(bar):  # a warning meanwhile (HF's, fasttune's) goes above the bar, not into it
            for _, at, budget in length_batches(model, [ids[i] for i in kept], a.batch_size, a.max_new_tokens):
                rows = [kept[j] for j in at]  # positions in the input: each prompt samples from (seed, its own)
                gens = generate_ids(model, tok, [ids[i] for i in rows], max_new_tokens=budget,
                                    temperature=a.temperature, top_p=a.top_p, seed=a.seed, indices=rows, stop=a.stop,
                                    engine=engine)  # fmt: skip
                for i, g in zip(rows, gens, strict=True):
                    done[i] = _row(records[i], completion=g.text, new_tokens=g.new_tokens, finished=g.finished,
                                   stop=g.stop)  # fmt: skip
                new_tokens += sum(g.new_tokens for g in gens)
                seconds += gens[0].seconds
                bar.update(len(rows))
                bar.set_postfix_str(f"{new_tokens / seconds:,.0f} tok/s" if seconds else "")
    except KeyboardInterrupt:  # the answers made so far are kept, not lost with the batch being made
        if done:  # with the skipped prompts' lines: each line the whole file would have, in the prompts' order
            rows = {**skip_rows, **done}
            write_jsonl(out, [rows[i] for i in sorted(rows)])
            also = f", with the {len(skipped)} skipped prompts' lines" if skipped else ""
            print(f"interrupted: the {len(done)} of {len(kept)} completions made so far -> {out} (in the order of "
                  f"their prompts{also}; the others are left out)", file=sys.stderr)  # fmt: skip
        raise
    finally:
        bar.close()
    write_jsonl(out, [done.get(i) or skip_rows[i] for i in range(len(ids))])
    print(f"{len(kept)} completions -> {out} ({new_tokens:,} tokens in {seconds:.1f} s: "
          f"{new_tokens / max(seconds, 1e-9):,.0f} tok/s)", file=sys.stderr)  # fmt: skip
    if skipped:
        log.warning(_skipped_line(a, records, skipped, out))
    return 0


def _row(record: dict, **fields) -> dict:
    """A line of the output: the input record's fields (its place in the file aside) and `fields`."""
    from fasttune.generate.prompts import WHERE

    row = {k: v for k, v in record.items() if k != WHERE}
    if "completion" in row and "reference" not in row:  # prompt/completion data's own answer
        row["reference"] = row.pop("completion")
    return {**row, **fields}


FIX = {"long": ("shorten it (or use a model with a longer context)",
                "shorten them (or use a model with a longer context)"),
       "empty": ("give it some text or remove it", "give them some text or remove them")}  # fmt: skip
"""What to do about the prompts of a --prompts file skipped (_prompt_ids), by kind: (one, several)."""


def _prompt_ids(tok, config, a: GenerateArgs, records: list[dict]) -> tuple[list[list[int]], dict[int, tuple]]:
    """(each record's prompt tokens, the prompts skipped: {index: (kind, why, detail)}), from the tokenizer and the
    model's config alone (before the model loads): an empty prompt (blank text, or no token to continue: --raw on a
    tokenizer that adds no BOS) and one that leaves the context no room for a token are skipped, as `eval --generate`
    leaves out a record with no prompt or longer than the context; when every prompt is, one line says why."""
    from fasttune.data.chat_render import blank_message
    from fasttune.generate.prompts import WHERE
    from fasttune.generate.template import prompt_ids
    from fasttune.model.context import context_length
    from fasttune.model.text_part import text_config

    conversations = _check_records(tok, a, records)  # each checked against the prompt format; their messages
    context = context_length(text_config(config) or config)  # a vision-language checkpoint: its language model's
    ids, skipped = [], {}
    for i, (messages, tools, kwargs) in enumerate(conversations):  # Alpaca's blank "input" is no text either
        blank = all(blank_message({k: v for k, v in m.items() if k != "input" or str(v).strip()}) for m in messages)
        ids.append([] if blank else prompt_ids(tok, messages, raw=a.raw, tools=tools, kwargs=kwargs))
        if not ids[-1]:
            skipped[i] = ("empty", "empty", "no text" if blank else "no token to continue")
        elif context and len(ids[-1]) >= context:
            skipped[i] = ("long", f"longer than the model's context of {context} tokens", f"{len(ids[-1])} tokens")
    if len(skipped) == len(records):
        kind, why, detail = skipped[0]
        if len({k for k, *_ in skipped.values()}) > 1:
            why, fix = "empty or longer than the model's context", f"{FIX['long'][1]}, and give the empty ones text"
        else:
            fix = FIX[kind][1]
        raise DataError(f"--prompts {a.prompts}: every prompt is {why}, so none is generated (the first: "
                        f"{records[0][WHERE]}, {detail}); {fix}")  # fmt: skip
    return ids, skipped


def _skipped_line(a: GenerateArgs, records: list[dict], skipped: dict[int, tuple], out: Path) -> str:
    """The one line that says which prompts were skipped: how many of each kind, the first one's place, the fix."""
    from fasttune.generate.prompts import WHERE

    parts = []
    for kind in FIX:
        if at := [i for i, (k, *_) in skipped.items() if k == kind]:
            _, why, detail = skipped[at[0]]
            parts.append(f"{len(at)} {why} (the first: {a.prompts} {records[at[0]][WHERE]}, {detail}): "
                         f"{FIX[kind][len(at) > 1]}")  # fmt: skip
    return (f"skipped {len(skipped)} of {len(records)} prompts: {'; '.join(parts)}; their lines in {out} have "
            '"completion": null and "skipped" saying why')  # fmt: skip


def run_chat(a: ChatArgs) -> int:
    from fasttune.model.resolve import resolve

    src = resolve(a.checkpoint, option="--checkpoint")  # a path that is not there: said before torch loads
    from fasttune.generate.chat import chat_loop, check_system

    model, tok = load_checkpoint(a, src, check=lambda tok, _config: check_system(tok, a.system, a.raw))  # first
    return chat_loop(model, tok, raw=a.raw, system=a.system, max_new_tokens=a.max_new_tokens,
                     temperature=a.temperature, top_p=a.top_p, seed=a.seed, stop=a.stop)  # fmt: skip
