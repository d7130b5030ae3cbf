"""Train with an experiment preset: `python main.py --experiment quick [--option value ...]` = `fasttune train ...`.

`python main.py generate|chat|eval|doctor|bench|experiments ...` runs that `fasttune` command, and
`python main.py --doctor` runs `fasttune doctor`."""

import sys

from fasttune.cli import COMMANDS
from fasttune.cli import main as cli_main


def main() -> int:
    argv = sys.argv[1:]
    if "--doctor" in argv:
        return cli_main(["doctor", *[a for a in argv if a != "--doctor"]])
    if argv[:1] and argv[0] in COMMANDS:
        return cli_main(argv)
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
