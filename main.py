"""Train with an experiment preset: `python main.py --experiment quick [--option value ...]` = `fasttune train ...`.

`python main.py generate|chat|eval|doctor|bench|experiments ...` runs that `fasttune` command, and
`python main.py --doctor` runs `fasttune doctor`."""

import difflib
import sys

from fasttune.cli import COMMANDS
from fasttune.cli import main as cli_main


def main() -> int:
    argv = sys.argv[1:]
    if "--doctor" in argv:
        return cli_main(["doctor", *[a for a in argv if a != "--doctor"]])
    word = argv[0] if argv[:1] and not argv[0].startswith("-") else None
    if word and (word in COMMANDS or difflib.get_close_matches(word, COMMANDS, n=1, cutoff=0.7)):
        return cli_main(argv)  # a command, or one mistyped (genrate): named as such, not as an option of train
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
