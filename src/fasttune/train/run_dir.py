"""The run folder: the one place that knows its file names, its marker, and when a folder may be used, resumed or
cleared. Layout:

    .fasttune-run        marker: only folders with it are ever resumed or cleared by --overwrite
    config.json          the resolved config in force (rewritten on resume)
    metrics.jsonl        one JSON record per logged step
    loss.png, throughput.png, tensorboard/
    checkpoints/step-N/  complete checkpoints (see fasttune.train.checkpoint)
    adapter/, merged/    LoRA adapters and the merged model
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

from fasttune.config import BaseConfig, to_dict
from fasttune.config.base_config import may_change_on_resume
from fasttune.errors import ConfigError

MARKER = ".fasttune-run"


@dataclasses.dataclass(frozen=True)
class RunFolder:
    path: Path

    marker = property(lambda self: self.path / MARKER)
    config = property(lambda self: self.path / "config.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    tensorboard = property(lambda self: self.path / "tensorboard")
    adapter = property(lambda self: self.path / "adapter")
    merged = property(lambda self: self.path / "merged")
    loss_plot = property(lambda self: self.path / "loss.png")
    throughput_plot = property(lambda self: self.path / "throughput.png")

    @property
    def artifacts(self) -> tuple[Path, ...]:
        """Everything fasttune writes here (what --overwrite clears; the user's own files stay)."""
        return (self.config, self.metrics, self.checkpoints, self.loss_plot, self.throughput_plot, self.tensorboard,
                self.adapter, self.merged)  # fmt: skip

    @property
    def is_run(self) -> bool:
        return self.marker.is_file()

    def __str__(self) -> str:
        return str(self.path)

    def prepare(self, cfg: BaseConfig) -> None:
        """Check the folder up front (nothing is deleted here): writable, and an existing run is only touched by
        --resume or --overwrite, and a folder of someone else's files never."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--output-dir {path} is a file; choose a folder")
        foreign = [p.name for p in self.artifacts if p.exists()]
        if foreign and not self.is_run:
            raise ConfigError(
                f"--output-dir {path} holds files that fasttune did not write ({', '.join(foreign)}); "
                "choose an empty or new folder"
            )
        if self.is_run and not (cfg.resume or cfg.overwrite):
            raise ConfigError(
                f"--output-dir {path} already holds a run; pass --resume to continue it, --overwrite "
                "to replace it, or choose another --output-dir"
            )
        if cfg.resume and not self.is_run:
            raise ConfigError(f"--resume: {path} holds no run to resume; run without --resume")
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        except OSError as e:
            why = e.strerror or e
            raise ConfigError(f"--output-dir {path} is not writable ({why}); choose another folder") from None

    def check_resume(self, cfg: BaseConfig) -> None:
        """--resume continues the run as it was configured: options that change the data, tokenizer, model or
        schedule must match the run's config.json (fields marked `may_change_on_resume` may differ)."""
        try:
            saved = _flat(json.loads(self.config.read_text()))
        except (OSError, ValueError) as e:
            raise ConfigError(f"--resume: cannot read {self.config} ({e}); start over with --overwrite") from None
        free = may_change_on_resume()
        for key, value in _flat(to_dict(cfg)).items():
            if key in free or key not in saved:
                continue
            old = tuple(saved[key]) if isinstance(saved[key], list) else saved[key]
            if old != value:
                raise ConfigError(
                    f"--resume: {key} is {value!r} but the run was started with {old!r}; resume with the "
                    "same value (or start a new run with another --output-dir)"
                )

    def start(self, cfg: BaseConfig) -> None:
        """Called once everything is checked: clear an old run for --overwrite (only fasttune's files), mark the
        folder as a fasttune run and write the resolved config."""
        if cfg.overwrite:
            for p in self.artifacts:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        self.marker.write_text("fasttune run directory; see config.json\n")
        self.write_config(cfg)

    def write_config(self, cfg: BaseConfig) -> None:
        self.config.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
