"""torch.compile on a CPU with no C++ compiler (`--training.compile`, `--training.optimizer adamw_8bit`): one line
before the data is read, naming what needs the compiler and the fix, instead of inductor's traceback mid-run. The
machine is faked in-process: PATH without a compiler, or with a stand-in script."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch._inductor import cpp_builder, exc

from fasttune import cli
from fasttune.compiler import cpp_compiler
from fasttune.config import BaseConfig, TrainingConfig
from fasttune.errors import ConfigError
from fasttune.train import loop
from fasttune.train.device import refuse_cpu_compile_without_compiler


def _inductor_finds(search: tuple) -> str | None:
    """Inductor's own search (uncached), the reference for cpp_compiler()."""
    try:
        return cpp_builder.cpp_compiler_search.__wrapped__(search)
    except exc.InvalidCxxCompiler:
        return None


@pytest.fixture
def no_compiler(tmp_path, monkeypatch):
    """A PATH with no C++ compiler on it (and no $CXX)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)
    return empty


def _stand_in(folder, name: str, code: int) -> None:
    """A `name` on PATH whose --version exits with `code`."""
    script = folder / name
    script.write_text(f"#!/bin/sh\necho '{name} (stand-in) 1.0'\nexit {code}\n")
    script.chmod(0o755)


def test_the_search_agrees_with_inductors(no_compiler, monkeypatch):
    from torch._inductor import config

    search = tuple(config.cpp.cxx)
    assert cpp_compiler() is None and _inductor_finds(search) is None
    _stand_in(no_compiler, "g++", 1)  # there but broken: inductor skips it too
    assert cpp_compiler() is None and _inductor_finds(search) is None
    _stand_in(no_compiler, "g++", 0)
    assert cpp_compiler() == str(no_compiler / "g++") == shutil.which(_inductor_finds(search))


@pytest.mark.parametrize(
    ("training", "names", "fix"),
    [
        (dict(compile=True), "training.compile:", "or drop --training.compile"),
        (dict(optimizer="adamw_8bit"), "training.optimizer=adamw_8bit (torchao", "or use --training.optimizer adamw"),
        (dict(compile=True, optimizer="adamw_8bit"), "training.compile and training.optimizer=adamw_8bit",
         "or drop --training.compile and use --training.optimizer adamw"),
    ],
)  # fmt: skip
def test_compiling_on_the_cpu_without_a_compiler_is_refused(no_compiler, training, names, fix):
    cfg = BaseConfig(training=TrainingConfig(**training))
    with pytest.raises(ConfigError) as e:
        refuse_cpu_compile_without_compiler(cfg, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(names) and msg.endswith(fix)
    assert "torch.compile on the CPU needs a C++ compiler" in msg and "apt-get install g++" in msg
    refuse_cpu_compile_without_compiler(cfg, "cuda")  # inductor writes Triton kernels on a GPU: not asked
    _stand_in(no_compiler, "g++", 0)
    refuse_cpu_compile_without_compiler(cfg, "cpu")  # a compiler: the run goes on
    refuse_cpu_compile_without_compiler(BaseConfig(), "cpu")  # nothing compiled: no compiler needed


def test_the_command_line_stops_before_the_data_is_read(no_compiler, monkeypatch, capsys, tmp_path):
    def tokenized(*a, **k):
        raise AssertionError("the data was read before the refusal")

    monkeypatch.setattr(loop, "_data", tokenized)
    assert not torch.cuda.is_available()  # conftest: `auto` is the CPU
    out = ["--output-dir", str(tmp_path / "run")]
    assert cli.main(["train", "--training.compile", *out]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: --training.compile: torch.compile on the CPU needs a C++ comp")
    assert "(looked for g++ on PATH)" in err and err.endswith("or drop --training.compile")
    assert not (tmp_path / "run").exists()
