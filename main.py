"""Train with an experiment preset: `python main.py --experiment quick [--option value ...]`.

`python main.py --doctor` runs `fasttune doctor`. Everything else is `fasttune train` (see --help)."""

import sys

from fasttune.cli import run


def main() -> int:
    argv = sys.argv[1:]
    if "--doctor" in argv:
        return run("doctor", [a for a in argv if a != "--doctor"])
    return run("train", argv)


if __name__ == "__main__":
    sys.exit(main())
