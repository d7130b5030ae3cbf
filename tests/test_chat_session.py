"""`fasttune chat` as a session: its /commands (never sent to the model) and messages piped on stdin."""

import io

import pytest
from helpers import save_base_model

from fasttune.cli import main
from fasttune.generate.chat import chat_loop


def _eof():
    raise EOFError  # what Ctrl-D gives input()


@pytest.mark.parametrize("word", ["/exit", "/quit", "/bye"])
def test_chat_exit_commands_end_the_session_and_no_command_reaches_the_model(tmp_path, capsys, monkeypatch, word):
    """/exit (as /quit and Ollama's /bye) ends the session instead of being answered as a message; /help and a
    command that does not exist list the commands; a message after a leading space is sent even with a slash."""
    from fixtures.tiny_tokenizer import CHATML

    import fasttune.generate.chat as chat_mod
    from fasttune.model.load import load_for_inference

    model, tok = load_for_inference(save_base_model(tmp_path / "chat", chat_template=CHATML))
    lines = iter(["/help", "/clear", " /etc is a folder", word, "never read"])
    sent, real = [], chat_mod.prompt_ids
    monkeypatch.setattr(
        chat_mod, "prompt_ids", lambda t, m, raw=False: sent.append(m[-1]["content"]) or real(t, m, raw)
    )
    assert chat_loop(model, tok, max_new_tokens=2, read=lambda prompt: next(lines)) == 0
    assert sent == [" /etc is a folder"] and next(lines) == "never read"
    err = capsys.readouterr().err
    lines_out = err.splitlines()
    assert any(x.startswith("/reset starts over, /exit") for x in lines_out)  # /help
    assert any(x.startswith("unknown command /clear; /reset starts over") for x in lines_out)


def test_chat_with_piped_messages_writes_the_replies_alone(tmp_path, capsys, monkeypatch):
    """Messages piped to `fasttune chat` (stdin not a terminal): stdout is each reply on its line, as the same
    messages give through the loop one at a time, without the >>> prompts among them (`>>> >>>  reply`)."""
    from fixtures.tiny_tokenizer import CHATML

    model_dir = save_base_model(tmp_path / "chat", chat_template=CHATML)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\nAnd you?\n"))
    assert main(["chat", "--checkpoint", str(model_dir), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    from fasttune.model.load import load_for_inference

    lines = iter(["Hello", "And you?"])
    chat_loop(*load_for_inference(model_dir), max_new_tokens=4, read=lambda prompt: next(lines, None) or _eof())
    want = capsys.readouterr().out.replace(">>> ", "").removesuffix("\n")
    assert out == want and out.count("\n") >= 2 and ">>>" not in out, (out, want)
