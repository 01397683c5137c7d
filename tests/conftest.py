"""Shared, generic test fixtures: one thread for the session, a fixed seed per test, an opt-in float64 dtype."""

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


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run the whole suite on one intra-op thread: the tests use tiny models, which gain nothing from more, and on
    a busy 2-core machine (CI) OpenMP's thread hand-offs make small ops many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
