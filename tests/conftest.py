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

# Every instruction-set variant this build holds and this CPU runs ("avx512", "avx2", "neon", "portable").
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
    """The C++ test drivers (tests/drivers.py) built on this machine, each for a kernel variant on
    first use; skipped without a C++ compiler."""
    return drivers.drivers(drivers.native_target(), tmp_path_factory)


# Where Precision.BF16 products can run: every bf16 path this CPU has in the avx512 variant (the only
# one with native code: "amx", "avx512_bf16"), and the emulation in each other variant.
AVAILABLE_BF16_PATHS = list(ops.cpu_info()["bf16_paths"])
BF16_VARIANTS = [(isa, path) for isa in AVAILABLE_ISAS
                 for path in (AVAILABLE_BF16_PATHS if isa == "avx512" else ["emulated"])]


@pytest.fixture(params=BF16_VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
def bf16_variant(request):
    """Runs a bf16 test once per kernel variant and bf16 path, restoring both afterwards."""
    isa, path = request.param
    with ops.use_isa(isa), ops.use_bf16_path(path):
        yield request.param
