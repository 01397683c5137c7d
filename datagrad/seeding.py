"""Seeds that are pure functions of integer keys: the one place the project turns keys into random generators.

``derived_seed(*key)`` = the first word of ``numpy.random.SeedSequence(key)``'s state, masked to ``bits`` bits (63 by
default, so it fits torch's signed seed); ``seeded_generator(*key, device)`` is a torch generator seeded with it;
``numpy_generator(*key)`` a numpy PCG64 generator on the same SeedSequence. Keys such as (seed, step, micro-batch,
rank) make every random draw reproducible across resumes and process counts, and independent of call order.
"""

from __future__ import annotations

import numpy as np
import torch


def derived_seed(*key: int, bits: int = 63) -> int:
    """A ``bits``-bit integer that is a pure function of the integers ``key``."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & ((1 << bits) - 1)


def seeded_generator(*key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with ``derived_seed(*key)``."""
    return torch.Generator(device=device).manual_seed(derived_seed(*key))


def numpy_generator(*key: int) -> np.random.Generator:
    """A numpy PCG64 generator on ``SeedSequence(key)``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))
