"""Shared test fixtures."""

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _reset_global_state():
    """Seeds and the default dtype back to defaults, so a failing test does not leak state into the next."""
    random.seed(0)
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
