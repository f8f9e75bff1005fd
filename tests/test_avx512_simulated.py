"""The avx512 variant's kernels on any x86-64 CPU, on simulated intrinsics: every AVX-512,
AVX512-BF16 and AMX intrinsic the kernels use is written as plain C++ in tests/simulated_isa, and the
test drivers (tests/drivers.py's "avx512_sim" variant) compile the kernel sources against it. So the
native bf16 paths (VDPBF16PS and AMX tiles) and the AVX-512 fp32 kernels are tested on every CI
machine, including the many that cannot run them: their packing, blocking, edge handling, thread split
and accumulation order, against the same references and tolerances as the native tests.

What this cannot test: that the real instructions behave as simulated (the native tests do that on a
CPU that has them: test_gemm.py's bit-exact VDPBF16PS check, and every test of the suite with
LMLAB_ISA / LMLAB_BF16 forcing a path), and speed.

- tests/gemm_check.cpp: the general gemm, fp32 and bf16 on each of amx, avx512_bf16 and emulated;
- tests/simd_check.cpp: cpp/simd.h's vector API and vexp's bound;
- every kernel through tests/kernel_run.cpp (tests/kernel_driver_checks.py), bf16 products on each
  path;
- each native path, one slice deep, bit for bit as its instruction's simulated definition sums.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest

from drivers import check_gemm_rows, check_simd_lines
# Every kernel: collected here, run with this module's `kernel` fixture.
from kernel_driver_checks import (BF16, test_adamw_sum_squares_round_bf16,  # noqa: F401
                                  test_attention, test_attention_bf16,
                                  test_bitwise_identical_for_1_and_3_threads,
                                  test_embedding_and_residual, test_gelu, test_layernorm, test_matmul,
                                  test_nan_propagates, test_softmax_and_crossentropy)
from test_gemm import operands, pair_sequence

ISA = "avx512_sim"
NATIVE_PATHS = ["amx", "avx512_bf16"]
BF16_PATHS = NATIVE_PATHS + ["emulated"]  # emulated: the avx512 kernels around fp32 products of rounded operands

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the native bf16 kernels are compiled for x86-64 only")


@pytest.fixture(scope="module", params=BF16_PATHS)
def kernel(request, driver):  # driver: conftest.py
    """kernel(name, *args, threads=None): a kernel of the simulated avx512 variant, its bf16
    products on each bf16 path, called as tests/drivers.py's Drivers.kernel."""
    return lambda name, *args, **kw: driver.kernel(ISA, name, *args, bf16_path=request.param, **kw)


@pytest.mark.parametrize("mode", ["fp32", "bf16:amx", "bf16:avx512_bf16", "bf16:emulated"])
def test_gemm_strides_alpha_accumulate(mode, driver):
    check_gemm_rows(driver.lines("gemm_check", ISA, *mode.split(":")))


def test_simd_api(driver):
    check_simd_lines(driver.lines("simd_check", ISA), ISA)


@pytest.mark.parametrize("path", NATIVE_PATHS)
@pytest.mark.parametrize("scale", [1.0, 2.0 ** -62, 2.0 ** -64])
def test_native_path_sums_as_its_instruction(driver, path, scale):
    """One slice deep (K = 75: one AMX slice, one VDPBF16PS slice), each native path's matmul is the
    simulated instruction's own sequence (test_gemm.pair_sequence) bit for bit: the kernel adds nothing, drops nothing and keeps k in
    order; tiny operands check the flushing."""
    N, C, OC = 17, 75, 40
    inp, weight, _, _ = operands(N, C, OC, seed=5)
    inp, weight = inp * np.float32(scale), weight * np.float32(scale)
    out = np.zeros((N, OC), np.float32)
    driver.kernel(ISA, "matmul_forward", out, inp, weight, None, N, C, OC, BF16, bf16_path=path)
    assert np.array_equal(out, pair_sequence(inp, weight, odd_first=path == "avx512_bf16"))
