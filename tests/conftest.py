"""Shared, generic test fixtures: a fixed global seed for every test and an opt-in float64 default dtype."""

import pytest
import torch


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed torch's global RNG before every test so results do not depend on test order."""
    torch.manual_seed(0)
    return 0


@pytest.fixture
def float64():
    """Make float64 the default dtype for the test (for finite differences and tight comparisons)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(previous)


@pytest.fixture
def single_thread():
    """Run the test on one intra-op thread: tiny tensors gain nothing from more, and on a busy 2-core machine
    OpenMP's thread hand-offs can make each small op milliseconds slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
