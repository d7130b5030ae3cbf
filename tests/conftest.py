"""Shared test fixtures."""

import gc
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


@pytest.fixture(autouse=True)
def _cpu_unless_marked_gpu(request, monkeypatch):
    """A test without the gpu marker runs as on a machine without a GPU, also on one with a GPU (the README's test
    command is the same on both): its reference (eager attention, plain HF, an uninterrupted run) is exact on the CPU,
    and `auto` devices would otherwise train and generate on the GPU. The processes it starts see no GPU either."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


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
