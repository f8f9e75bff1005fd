"""Shared fixtures for lmlab's tests: the kernel variants to run on, seeded generators, and the C++
test drivers built for this machine.

`tests/` is on sys.path (pytest's default "prepend" import mode), so tests import the float64
references and the tolerance check as `import reference`, and the C++ test drivers' build and checks
as `import drivers`.
"""

from __future__ import annotations

import drivers
import numpy as np
import pytest

from lmlab import ops

# Every instruction-set variant this build holds and this CPU runs ("avx512", "avx2", "portable").
AVAILABLE_ISAS = list(ops.cpu_info()["available"])


@pytest.fixture(params=AVAILABLE_ISAS)
def isa(request):
    """Runs the test once on each kernel variant, restoring the active one afterwards."""
    with ops.use_isa(request.param):
        yield request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id, so every test (and parameter set) has its own data and
    a failure reproduces on rerun."""
    seed = sum(ord(ch) * (i + 1) for i, ch in enumerate(request.node.nodeid)) % (2 ** 32)
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def driver(tmp_path_factory):
    """run(driver, isa, *args): a C++ test driver (tests/drivers.py) built on this machine for a
    kernel variant on first use, then run; skipped without a C++ compiler."""
    return drivers.runner(drivers.native_target(), tmp_path_factory)
