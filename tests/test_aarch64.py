"""The AArch64 build's kernels without an ARM machine, cross-compiled (Debian's g++-aarch64-linux-gnu)
and run under qemu-user, against the same references and tolerances as the native tests:

- tests/gemm_check.cpp (the general gemm, fp32 and bf16) and tests/simd_check.cpp (cpp/simd.h's vector
  API and vexp's bound) for both AArch64 variants, neon and portable;
- every kernel of cpp/kernels.h on both variants through tests/kernel_run.cpp: the checks of
  tests/kernel_driver_checks.py (tests/reference.py with test_kernels.py's tolerances, on shapes off
  every tile and vector width, and bitwise-identical results for 1 and 3 threads).

Correctness only: qemu says nothing about speed on real ARM hardware. Skipped, with the reason, where
the cross compiler or qemu is missing; .ci/aarch64 installs them and sets LMLAB_REQUIRE_AARCH64=1,
which turns that skip into a failure.
"""

from __future__ import annotations

import os

import pytest

from drivers import aarch64_target, check_gemm_rows, check_simd_lines, drivers
# Every kernel, both variants: collected here, run with this module's `kernel` fixture.
from kernel_driver_checks import (test_adamw_sum_squares_round_bf16, test_attention,  # noqa: F401
                                  test_attention_bf16, test_bitwise_identical_for_1_and_3_threads,
                                  test_embedding_and_residual, test_gelu, test_layernorm, test_matmul,
                                  test_nan_propagates, test_softmax_and_crossentropy)

VARIANTS = ["neon", "portable"]  # what CMakeLists.txt builds on AArch64


@pytest.fixture(scope="module")
def qemu_driver(tmp_path_factory):
    """The drivers cross-built for AArch64, run under qemu."""
    required = os.environ.get("LMLAB_REQUIRE_AARCH64") == "1"
    return drivers(aarch64_target(), tmp_path_factory, required)


@pytest.fixture(scope="module", params=VARIANTS)
def kernel(request, qemu_driver):
    """kernel(name, *args, threads=None): a kernel of each AArch64 variant under qemu, called as
    tests/drivers.py's Drivers.kernel."""
    return lambda name, *args, **kw: qemu_driver.kernel(request.param, name, *args, **kw)


# --- the checking drivers, both variants -----------------------------------------------------------

@pytest.mark.parametrize("mode", ["fp32", "bf16:emulated"])
@pytest.mark.parametrize("isa", VARIANTS)
def test_gemm_under_qemu(isa, mode, qemu_driver):
    # bf16 on AArch64 is the emulated path: fp32 kernels on operands rounded to bfloat16.
    check_gemm_rows(qemu_driver.lines("gemm_check", isa, *mode.split(":")))


@pytest.mark.parametrize("isa", VARIANTS)
def test_simd_api_under_qemu(isa, qemu_driver):
    check_simd_lines(qemu_driver.lines("simd_check", isa), isa)
