"""Train with an experiment preset: `python main.py --experiment quick [--option value ...]` = `fasttune train ...`.

`python main.py generate|chat|eval|doctor|bench|experiments ...` runs that `fasttune` command, and
`python main.py --doctor` runs `fasttune doctor`, `python main.py --version` is `fasttune --version`."""

import difflib
import sys

try:
    from fasttune.cli import COMMANDS
    from fasttune.cli import main as cli_main
except ModuleNotFoundError as e:  # the environment not activated: fasttune, or a package it needs, is not there
    if (e.name or "fasttune.").startswith("fasttune."):
        raise
    print(f"error: {e.name} is not installed for this Python ({sys.executable}); activate fasttune's environment "
          "(. .venv/bin/activate) or install fasttune (scripts/install.sh)", file=sys.stderr)  # fmt: skip
    sys.exit(2)


def main() -> int:
    argv = sys.argv[1:]
    if "--doctor" in argv:
        return cli_main(["doctor", *[a for a in argv if a != "--doctor"]])
    if argv[:1] in (["--version"], ["-V"]):
        return cli_main(argv)
    lead = argv[1:] if argv[:1] == ["--debug"] else argv  # `main.py --debug generate ...`: as fasttune takes it
    word = lead[0] if lead[:1] and not lead[0].startswith("-") else None
    if word and (word in COMMANDS or difflib.get_close_matches(word, COMMANDS, n=1, cutoff=0.7)):
        return cli_main(argv)  # a command, or one mistyped (genrate): named as such, not as an option of train
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
