"""--resume of a run whose model or project folder moved or changed: the model given again is checked against what
the run recorded, the max-length line says what a resumed run can do, and a --config of the run behaves as a bare
--resume."""

import dataclasses
import json

import pytest
from helpers import save_micro_model, sft_config

from fasttune.errors import ConfigError
from fasttune.train import loop


def _resumed(cfg, model=None, max_steps: int = 3):
    """cfg resumed to `max_steps`, with --model `model` when given."""
    model = dataclasses.replace(cfg.model, path=str(model)) if model is not None else cfg.model
    return dataclasses.replace(cfg, resume=True, model=model,
                               training=dataclasses.replace(cfg.training, max_steps=max_steps))  # fmt: skip


def test_a_resumed_runs_max_length_beyond_its_models_context_says_what_resume_can_do(tmp_path):
    """train() resuming a run whose model's config.json now names a shorter context than the run's data.max_length,
    with no CLI ahead of it that read the model's config (the API, a script): the line says that the run keeps its
    length (a model of that context, or a new run), not "pass --data.max-length 128 or less", which resume refuses."""
    base = save_micro_model(tmp_path / "base")
    cfg = sft_config(tmp_path, base, max_steps=2, save_every=2, eval_every=0)
    loop.train(cfg)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 128}))
    with pytest.raises(ConfigError) as e:
        loop.train(_resumed(cfg))
    assert str(e.value) == (
        f"--resume: the run trained with data.max_length 256 (in {tmp_path / 'run' / 'config.json'}), beyond the "
        f"context of {base} (max_position_embeddings=128); give a model of 256 positions or more (the run's own), or "
        "start a new run with another --output-dir"
    )
