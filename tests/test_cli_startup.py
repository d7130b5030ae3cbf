"""`--help` and the command-line mistakes that need no model answer without importing torch or transformers (seconds
saved on every `--help`), and say exactly what they say once torch and every command's module are imported."""

import json
import os
import subprocess
import sys

from tests.test_cli import SUBCOMMANDS

# mistakes caught by the parser, the checks of the command line alone or before a model is read: (argv, the error)
MISTAKES = [
    (["train", "--trainig.lr", "1"], "error: unknown option --trainig.lr; did you mean --training.lr?"),
    (["train", "--training.lr", "abc"], "error: --training.lr: 'abc' is not a valid number"),
    (["train", "--experiment", "nope"], "error: --experiment 'nope' is unknown"),
    (["train", "--config", "/nonexistent.yaml"], "error: --config /nonexistent.yaml: no such file"),
    (["train", "--experiment", "sft"], "error: --experiment sft fine-tunes your model on your data: pass --model"),
    (["generate", "--checkpoint", "x"], "error: pass either --prompt TEXT or --prompts FILE.jsonl"),
    (["generate", "--checkpoint", "/nonexistent", "--prompt", "hi"], "error: --checkpoint /nonexistent: no such"),
    (["chat", "--checkpoint", "/nonexistent"], "error: --checkpoint /nonexistent: no such folder"),
    (["eval", "--bogus"], "error: unknown option --bogus; see `fasttune eval --help`"),  # before --checkpoint
    (["bench", "generate", "--bogus"], "error: unknown option --bogus; did you mean --out?"),
    (["doctor", "--bogus"], "error: unknown option --bogus"),
    (["frobnicate"], "error: unknown command 'frobnicate'"),
]

# Runs each command line in one fresh interpreter, first as the CLI does (nothing imported), then again after torch,
# transformers and the modules that run every command are imported (what the CLI imported before it parsed): the
# reference text. Prints {argv: [exit code, stdout, stderr, heavy modules imported by the first run]} as JSON.
SCRIPT = """
import contextlib, importlib, io, json, sys
from fasttune.cli import main

def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return [code, out.getvalue(), err.getvalue()]

cases = json.loads(sys.argv[1])
lazy = {}
for argv in cases:
    lazy[" ".join(argv)] = run(argv) + [[m for m in ("torch", "transformers") if m in sys.modules]]
for module in ("torch", "transformers", "fasttune.train.loop", "fasttune.eval.run", "fasttune.doctor.checks",
               "fasttune.bench.generate", "fasttune.bench.train", "fasttune.bench.attention", "fasttune.model.load"):
    importlib.import_module(module)
print(json.dumps({"lazy": lazy, "reference": {" ".join(argv): run(argv) for argv in cases}}))
"""


def _run(cases: list[list[str]]) -> dict:
    env = {**os.environ, "COLUMNS": "120"}  # one terminal width for both runs
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_help_of_every_command_imports_neither_torch_nor_transformers_and_is_unchanged():
    cases = [[], ["--help"], ["bench", "--help"], *([*c, "--help"] for c in SUBCOMMANDS)]
    cases += [["train", "--experiment", name, "--help"] for name in ("full", "sft", "lora")]
    result = _run(cases)
    for argv, (code, out, err, heavy) in result["lazy"].items():
        assert heavy == [], f"`fasttune {argv}` imported {heavy}"
        assert code == 0 and out.startswith("usage: fasttune") and not err, argv
        assert [code, out, err] == result["reference"][argv], f"`fasttune {argv}`: the help text changed"


def test_command_line_mistakes_are_told_without_importing_torch_or_transformers():
    result = _run([argv for argv, _ in MISTAKES])
    for argv, expected in MISTAKES:
        code, out, err, heavy = result["lazy"][" ".join(argv)]
        assert heavy == [], f"`fasttune {' '.join(argv)}` imported {heavy}"
        assert code == 2 and not out and err.startswith(expected) and err.count("\n") == 1, (argv, err)
        assert [code, out, err] == result["reference"][" ".join(argv)], argv


def test_the_config_knows_every_attention_backend_without_importing_torch():
    """base_config's choices come from fasttune.attention.NAMES (no torch); the backend table is the truth."""
    from fasttune.attention import BACKENDS, NAMES
    from fasttune.config.base_config import ATTN_CHOICES

    assert NAMES == tuple(BACKENDS)
    assert ATTN_CHOICES == ("auto", *BACKENDS)


def test_transformers_loads_models_without_progress_bars_whether_imported_before_or_after_the_cli_says_so():
    """The CLI turns transformers' "Loading weights" bars off before a command runs without importing transformers
    (huggingface_hub's switch, read by transformers at import); where transformers is imported already, its own."""
    code = (
        "import sys; from fasttune import quiet; {first}; quiet.progress_bars_off(); {then}; "
        "from transformers.utils import logging; sys.exit(logging.is_progress_bar_enabled())"
    )
    for first, then in (("pass", "import transformers"), ("import transformers", "pass")):
        done = subprocess.run([sys.executable, "-c", code.format(first=first, then=then)], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, (first, done.stderr)


def test_ctrl_c_while_torch_imports_is_one_line_without_torchs_log_records():
    """A Ctrl-C in the second torch takes to import, after its fake-tensor module registered an exit hook and before
    torch configured its loggers, printed "FakeTensor cache stats:" and two counts under "interrupted (Ctrl-C)": the
    hook's INFO records reached the CLI's root logger. Here the Ctrl-C comes at the first torch import after it."""
    code = """
import sys
from fasttune.cli import main

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        fake = sys.modules.get("torch._subclasses.fake_tensor")
        if name.startswith("torch.") and hasattr(fake, "dump_cache_stats"):  # its exit hook is registered
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, CtrlC())
sys.exit(main(["doctor"]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "interrupted (Ctrl-C)\n")
