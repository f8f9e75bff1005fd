"""The AArch64 build's kernels without an ARM machine: tests/gemm_check.cpp and tests/simd_check.cpp
cross-compiled for the neon and portable variants (Debian's g++-aarch64-linux-gnu) and run under
qemu-user, with the same references and tolerances as the native tests (tests/drivers.py). This checks
correctness only: qemu says nothing about speed on real ARM hardware.

Skipped, with the reason, where the cross compiler or qemu is missing; .ci/aarch64 installs them and
sets LMLAB_REQUIRE_AARCH64=1, which turns that skip into a failure.
"""

from __future__ import annotations

import os

import pytest

from drivers import aarch64_target, check_gemm_rows, check_simd_lines, runner

VARIANTS = ["neon", "portable"]  # what CMakeLists.txt builds on AArch64


@pytest.fixture(scope="module")
def qemu_driver(tmp_path_factory):
    """run(driver, isa, *args) cross-built for AArch64 and run under qemu."""
    required = os.environ.get("LMLAB_REQUIRE_AARCH64") == "1"
    return runner(aarch64_target(), tmp_path_factory, required)


@pytest.mark.parametrize("mode", ["fp32", "bf16:emulated"])
@pytest.mark.parametrize("isa", VARIANTS)
def test_gemm_under_qemu(isa, mode, qemu_driver):
    # bf16 on AArch64 is the emulated path: fp32 kernels on operands rounded to bfloat16.
    check_gemm_rows(qemu_driver("gemm_check", isa, *mode.split(":")))


@pytest.mark.parametrize("isa", VARIANTS)
def test_simd_api_under_qemu(isa, qemu_driver):
    check_simd_lines(qemu_driver("simd_check", isa), isa)
