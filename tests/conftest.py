"""Shared test fixtures."""

import gc
import os
import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _reset_global_state():
    """Seeds, the default dtype and the attention package's caches (kernel report, SDPA choices, plans, probes,
    memo, dynamo's recompile limit) back to defaults, so a failing test does not leak state into the next."""
    from fasttune.attention import state

    random.seed(0)
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    state.reset()
    yield
    state.reset()
    torch.set_default_dtype(dtype)


_REAL_CUDA = torch.cuda.is_available
_REAL_VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.fixture(scope="session", autouse=True)
def _no_gpu_unless_marked():
    """Tests run as on a machine without a GPU, also on one with a GPU (the README's test command is the same on
    both), except those with the gpu marker: a CPU test's reference (eager attention, plain HF, an uninterrupted run)
    is exact on the CPU, and `auto` devices would otherwise train and generate on the GPU. From the start of the
    session, so that module-scoped fixtures (a run trained once for a file's tests) see no GPU either; the processes
    tests start see none (CUDA_VISIBLE_DEVICES)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        mp.setenv("CUDA_VISIBLE_DEVICES", "")
        yield


@pytest.fixture(autouse=True)
def _gpu_for_gpu_tests(request, _no_gpu_unless_marked):
    """A test with the gpu marker sees the machine's GPU (collection, which skips it without one, saw it already)."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", _REAL_CUDA)
        if _REAL_VISIBLE is None:
            mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            mp.setenv("CUDA_VISIBLE_DEVICES", _REAL_VISIBLE)
        yield


@pytest.fixture
def frozen_gc():
    """gc.collect() looks only at what the test makes: the tests that count what layers keep alive collect after
    every forward, and a third of their time went to walking torch and transformers."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def prompts_seen(monkeypatch):
    """The token ids every generate_ids call gets (the rendered prompts), recorded while it runs as usual."""
    import fasttune.generate.generate as gen

    seen, real = [], gen.generate_ids
    monkeypatch.setattr(gen, "generate_ids", lambda model, tok, batch, **kw: seen.extend(batch) or real(
        model, tok, batch, **kw))  # fmt: skip
    return seen


@pytest.fixture(scope="session")
def _two_checkpoints_trained(tmp_path_factory, _no_gpu_unless_marked):
    """The run two_checkpoints copies, trained once a session."""
    from helpers import train_once

    return train_once(tmp_path_factory, "two-checkpoints", max_steps=4, save_every=2, eval_every=0)


@pytest.fixture
def two_checkpoints(_two_checkpoints_trained, tmp_path):
    """(config, result) of a tiny run of 4 steps with a checkpoint at steps 2 and 4, each test's own copy."""
    from helpers import copy_of_run

    return copy_of_run(_two_checkpoints_trained, tmp_path)


@pytest.fixture(scope="session")
def _finished_trained(tmp_path_factory, _no_gpu_unless_marked):
    """The run `finished` copies, trained once a session (test_run_dir.py and test_resume_checks.py use it)."""
    from helpers import train_once

    return train_once(tmp_path_factory, "finished", max_steps=3, save_every=3, eval_every=0)


@pytest.fixture
def finished(_finished_trained, tmp_path):
    """(config, result) of a finished 3-step run (a checkpoint at step 3) in tmp_path / "run": each test's own copy
    of the run trained once a session."""
    from helpers import copy_of_run

    return copy_of_run(_finished_trained, tmp_path)


@pytest.fixture(scope="session")
def _finished_sft_trained(tmp_path_factory, _no_gpu_unless_marked):
    """The project finished_sft copies (base/ a micro model, d.json a copy of GSM8K, run/), trained once a session."""
    import shutil

    from helpers import GSM8K, save_micro_model, sft_config, train_fresh

    root = tmp_path_factory.mktemp("finished-sft")
    shutil.copy(GSM8K, root / "d.json")
    train_fresh(sft_config(root, save_micro_model(root / "base"), root / "d.json", max_steps=2, save_every=2,
                           eval_every=0))  # fmt: skip
    return root


@pytest.fixture
def finished_sft(_finished_sft_trained, tmp_path):
    """A finished 2-step sft run (a checkpoint at step 2) of the micro model tmp_path / "base" on tmp_path / "d.json"
    in tmp_path / "run": each test's own copy (its model and data may be removed) of the run trained once a session."""
    from helpers import copy_of_project

    return copy_of_project(_finished_sft_trained, tmp_path)


@pytest.fixture
def fixtures_unchanged():
    """The test leaves the files of tests/fixtures byte-for-byte and mtime-for-mtime as they were (the data-error
    tests ask for it, pytestmark: none may change the user's files)."""
    import hashlib

    from helpers import FIXTURES

    def snapshot():
        return {
            p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in FIXTURES.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }

    before = snapshot()
    yield
    assert snapshot() == before
