"""`fasttune train` (and `python main.py`): its options are the whole config tree, on top of an experiment preset."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Annotated

import tyro

from fasttune.command import Command
from fasttune.config import BaseConfig, get_experiment
from fasttune.errors import ConfigError

log = logging.getLogger("fasttune")


@dataclasses.dataclass
class TrainArgs(Command):
    """Train or fine-tune a causal LM. `--experiment NAME` picks a preset (quick, full, sft, lora: see
    `fasttune experiments`); every option below overrides it. Short flags: --model, --data, --max-steps,
    --save-every."""

    config: Annotated[BaseConfig, tyro.conf.arg(name="")] = dataclasses.field(default_factory=BaseConfig)

    @classmethod
    def default_for(cls, args: Sequence[str]) -> TrainArgs:
        """The preset named by `--experiment` in `args` (default quick): the defaults every other option overrides."""
        name = "quick"
        for i, a in enumerate(args):
            if a == "--experiment" or a.startswith("--experiment="):
                name = a.partition("=")[2] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
        if not name or name.startswith("-"):
            from fasttune.config import EXPERIMENTS

            raise ConfigError("--experiment needs a value; choose one of: " + ", ".join(EXPERIMENTS))
        return cls(config=get_experiment(name))

    def run(self) -> int:
        from fasttune.train.loop import train

        cfg = self.config.validate()
        result = train(cfg)
        if result.first_val_loss is not None:
            log.info("validation loss %.4f -> %.4f", result.first_val_loss, result.last_val_loss)
        prompt = result.sample_prompt
        if prompt and result.model_dir is not None:
            from fasttune.generate.generate import generate, load_for_generation

            model, tok = load_for_generation(result.model_dir, cfg.training.device)
            g = generate(model, tok, prompt, max_new_tokens=cfg.generation.max_new_tokens,
                         temperature=cfg.generation.temperature, top_p=cfg.generation.top_p)  # fmt: skip
            print(f"sample ({g.tokens_per_s:.0f} tok/s):\n{prompt}{g.text}")
        return 0
