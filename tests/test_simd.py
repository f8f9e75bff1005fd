"""The vector API of cpp/simd.h on every variant this CPU runs, through tests/simd_check.cpp (built by
tests/drivers.py): masked tails that never touch memory past n (checked against a guard page), the
NaN rule of vmax / vmin, rounding, the horizontal reductions, the exact scaling by 2^n, and vexp's
special values and its stated error bound (1.07 ulp) on a sample of inputs. tests/test_aarch64.py
runs the same driver for AArch64's neon variant under qemu.
"""

from __future__ import annotations

import pytest

from drivers import check_simd_lines
from lmlab import ops


@pytest.mark.parametrize("isa", ops.cpu_info()["available"])
def test_simd_api(isa, driver):  # driver: conftest.py
    check_simd_lines(driver.lines("simd_check", isa), isa)
