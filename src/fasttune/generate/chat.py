"""`fasttune chat`: talk to a fine-tuned model in the terminal, replies streamed as they are generated.

Multi-turn when the model has a real chat template; a run trained on Alpaca or prompt/completion data saw single
exchanges only, so there each message is answered on its own. Ctrl-D or Ctrl-C at the prompt, or /exit (/quit,
/bye), ends the session (exit 0); Ctrl-C during a reply stops that reply and returns to the prompt. `/reset` forgets
the conversation; another /word (/help) lists the commands and is not sent to the model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from fasttune.errors import FasttuneError
from fasttune.generate.generate import fast_engine, fit_context, generate_ids
from fasttune.generate.template import check_roles, multi_turn, prompt_format, prompt_ids
from fasttune.model.context import context_length


def _say(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat_loop(model, tokenizer, *, raw: bool = False, system: str | None = None, max_new_tokens: int = 256,
              temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop: tuple[str, ...] = (),
              read: Callable[[str], str] | None = None) -> int:  # fmt: skip
    """Answer what `read` returns (default: input() lines, prompted with >>> on a terminal only: piped messages give
    the replies alone on stdout) until it ends; with sampling, the n-th reply of a session (from 0, /reset
    included) draws as the n-th prompt of `generate --prompts` with the same seed does."""
    fmt = "raw" if raw else prompt_format(tokenizer)
    _check_system(system, fmt, raw)
    multi = multi_turn(fmt)
    _say_how(fmt, multi)
    sampling = dict(temperature=temperature, top_p=top_p, seed=seed, stop=stop, engine=fast_engine(model))
    prompt = ">>> " if read is not None or sys.stdin.isatty() else ""  # piped: no prompts among the replies
    read = read or input
    start: list[dict] = [{"role": "system", "content": system}] if system and fmt == "chat" else []
    history, replies = list(start), 0
    while (line := _read_line(read, prompt)) is not None:
        if not line.strip():
            continue
        if (command := _command(line)) is not None:  # not sent to the model as a message
            if command in EXIT:
                return 0
            if command == "/reset":
                history = list(start)
            _answer_command(command, multi)
            continue
        messages = (history if multi else start) + [{"role": "user", "content": line}]
        messages, ids = _within_context(model, tokenizer, messages, start if multi else None, raw, max_new_tokens)
        budget = _reply_budget(model, len(ids), max_new_tokens)
        if budget is None:
            continue
        text = _reply(model, tokenizer, ids, budget, replies, sampling)
        replies += 1
        if multi and text is not None:
            history = messages + [{"role": "assistant", "content": text}]
    return 0


def _say_how(fmt: str, multi: bool) -> None:
    """The session's opening line on stderr: how messages are rendered, and how to quit or start over."""
    how = {"raw": "no template: each message is continued as plain text", "chat": "the model's chat template"}
    how_fmt = how.get(fmt, f"the {fmt} prompt format the run trained with; each message is answered on its own")
    print(f"chat ({how_fmt}{', multi-turn' if multi else ''}). Ctrl-D, Ctrl-C or /exit to quit, /reset to start "
          "over.", file=sys.stderr)  # fmt: skip


def _read_line(read: Callable[[str], str], prompt: str) -> str | None:
    """The next message, or None at the end of input or on Ctrl-C at the prompt."""
    try:
        return read(prompt)
    except (EOFError, KeyboardInterrupt):
        _say("\n" if prompt else "")  # the line after ^D
        return None


def _answer_command(command: str, multi: bool) -> None:
    """Say what /reset did, or (/help, or a command that does not exist) list the commands."""
    if command == "/reset":
        print("(history cleared)" if multi else "(nothing to clear: each message is answered on its own)",
              file=sys.stderr)  # fmt: skip
    else:
        print(("" if command == "/help" else f"unknown command {command}; ") + COMMANDS, file=sys.stderr)


def _within_context(model, tokenizer, messages: list[dict], start: list[dict] | None, raw: bool,
                    max_new_tokens: int) -> tuple[list[dict], list]:  # fmt: skip
    """`messages` and their prompt ids, the oldest exchange after `start` (the system message, if any) forgotten while
    the prompt leaves the reply less than max_new_tokens of the model's context (start None: a single exchange,
    nothing to forget): kept, old turns cut every later reply to the few tokens the context had left."""
    ids = prompt_ids(tokenizer, messages, raw=raw)
    while start is not None and len(messages) > len(start) + 1 and _too_long(model, len(ids) + max_new_tokens):
        messages = start + messages[len(start) + 2 :]  # forget the oldest exchange to stay within the context
        ids = prompt_ids(tokenizer, messages, raw=raw)
    return messages, ids


def _reply_budget(model, prompt_len: int, max_new_tokens: int) -> int | None:
    """New tokens the context leaves the reply; None (said on stderr) when the message leaves no room."""
    try:
        return fit_context(model, prompt_len, max_new_tokens, "the message")
    except FasttuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def _reply(model, tokenizer, ids: list, budget: int, index: int, sampling: dict) -> str | None:
    """Generate the reply to `ids`, streamed to stdout, as the `index`-th prompt of a batch draws; None when Ctrl-C
    stopped it."""
    try:
        reply = generate_ids(model, tokenizer, [ids], max_new_tokens=budget, indices=[index], on_text=_say,
                             **sampling)[0]  # fmt: skip
    except KeyboardInterrupt:
        _say("\n[stopped]\n")
        return None
    _say("\n")
    return reply.text


EXIT = ("/exit", "/quit", "/bye")
COMMANDS = "/reset starts over, /exit (or /quit, /bye, Ctrl-D) quits; start a message with a space to send it as is"


def _command(line: str) -> str | None:
    """The /command a line is (one word after a slash, as typed at the prompt), else None: a message."""
    word = line.rstrip()
    return word if word[:1] == "/" and word[1:].isalpha() else None


def check_system(tokenizer, system: str | None, raw: bool) -> None:
    """_check_system with the tokenizer's prompt format: `fasttune chat` runs it before the model loads."""
    _check_system(system, "raw" if raw else prompt_format(tokenizer), raw)


def _check_system(system: str | None, fmt: str, raw: bool) -> None:
    """A --system message that the model's prompt format would drop is refused, as training refuses one in the data
    (template.check_roles); a blank one drops nothing."""
    if not system or not system.strip():
        return
    if fmt == "raw":
        why = "--raw sends each message as is" if raw else "this model has no chat template (it continues plain text)"
        raise FasttuneError(f"--system: {why}, so the system message would be dropped; drop --system")
    check_roles([{"role": "system", "content": system}], fmt, "--system: the conversation",
                "drop --system (write what it says into your message if it matters)")  # fmt: skip


def _too_long(model, tokens: int) -> bool:
    context = context_length(model.config)
    return bool(context) and tokens > context
