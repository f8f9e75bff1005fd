"""Builds and runs the C++ test drivers (tests/gemm_check.cpp, tests/simd_check.cpp,
tests/kernel_run.cpp) for one kernel variant, either natively or cross-compiled for AArch64 and run
under qemu-user, and checks what the checking ones print. Used by tests/test_gemm.py and
tests/test_simd.py (native, every variant this CPU runs) and by tests/test_aarch64.py (the neon and
portable variants under qemu, where kernel_run stands in for the Python module).

The drivers compile the kernel sources themselves, with each variant's flags as in CMakeLists.txt, so
they reach internals (the general gemm, cpp/simd.h) that the Python module does not expose.
"""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

FLAGS = {  # each variant's compiler flags, as in CMakeLists.txt
    "portable": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
    "neon": ["-DLMLAB_NEON"],
    # The avx512 variant's code on tests/simulated_isa's plain-C++ intrinsics, for any x86-64 CPU: the
    # macros the real avx512 build has, no instruction-set flags (tests/test_avx512_simulated.py).
    "avx512_sim": [f"-I{ROOT / 'tests' / 'simulated_isa'}", "-DLMLAB_SIMULATED_ISA", "-D__AVX512F__",
                   "-D__AVX512DQ__", "-D__AVX512BW__", "-D__AVX512VL__", "-D__AVX2__", "-D__FMA__",
                   "-D__F16C__", "-Wno-psabi"],
}


def kernel_sources() -> list[str]:
    """The sources compiled once per variant: CMakeLists.txt's LMLAB_KERNEL_SOURCES, its one list."""
    text = (ROOT / "CMakeLists.txt").read_text()
    return re.search(r"set\(LMLAB_KERNEL_SOURCES\s+([^)]*)\)", text).group(1).split()


SOURCES = {  # each driver's sources; bf16_path.cpp decides which bf16 paths (amx, avx512_bf16) may run
    "gemm_check": ["tests/gemm_check.cpp", "cpp/gemm.cpp", "cpp/gemm_amx.cpp", "cpp/gemm_dpbf16.cpp",
                   "cpp/bf16_path.cpp"],
    "simd_check": ["tests/simd_check.cpp"],
    "kernel_run": ["tests/kernel_run.cpp", *kernel_sources(), "cpp/bf16_path.cpp"],
}

# Debian's cross compiler and its target libraries (g++-aarch64-linux-gnu), and qemu-user.
AARCH64_CXX = os.environ.get("LMLAB_AARCH64_CXX", "aarch64-linux-gnu-g++")
AARCH64_SYSROOT = os.environ.get("LMLAB_AARCH64_SYSROOT", "/usr/aarch64-linux-gnu")


def sanitize_flags() -> list[str]:
    """ASan + UBSan for the drivers where LMLAB_SANITIZE_DRIVERS=1 (.ci/sanitize sets it), the first
    finding failing the run."""
    if os.environ.get("LMLAB_SANITIZE_DRIVERS") != "1":
        return []
    return ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
            "-g"]


@dataclass(frozen=True)
class Target:
    """Where a driver is built for and how it is run."""

    name: str  # "native" or "aarch64"
    cxx: str
    runner: tuple[str, ...]  # prefix of the command line: () natively, qemu for aarch64
    x86: bool  # x86-64 target: bf16_path.cpp's CPU probes are compiled in

    def build(self, driver: str, isa: str, out_dir: Path) -> Path:
        exe = out_dir / f"{driver}_{self.name}_{isa}"
        defines = ["-DLMLAB_HAVE_AVX512"] if self.x86 else []
        subprocess.run([self.cxx, "-std=c++17", "-O2", "-fopenmp", f"-I{ROOT / 'cpp'}",
                        f"-DLMLAB_ISA_NS={isa}", *defines, *FLAGS[isa], *sanitize_flags(),
                        *(str(ROOT / s) for s in SOURCES[driver]), "-o", str(exe)], check=True)
        return exe

    def run(self, exe: Path, *args: str, stdin: bytes = b"", threads: int | None = None) -> bytes:
        """The driver's output (on `threads` OpenMP threads, if given); a crash or non-zero exit fails
        the test, with what it printed."""
        env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run([*self.runner, str(exe), *args], input=stdin, capture_output=True, env=env)
        assert done.returncode == 0, (f"{exe.name} {' '.join(args)} exited with {done.returncode}:\n"
                                      f"{done.stdout[-2000:]!r}\n{done.stderr.decode(errors='replace')}")
        return done.stdout


class Drivers:
    """The drivers for one target, each built once per variant on first use."""

    def __init__(self, target: Target, out_dir: Path):
        self.target, self.out_dir = target, out_dir
        self.built: dict[tuple[str, str], Path] = {}

    def exe(self, driver: str, isa: str) -> Path:
        if (driver, isa) not in self.built:
            self.built[driver, isa] = self.target.build(driver, isa, self.out_dir)
        return self.built[driver, isa]

    def lines(self, driver: str, isa: str, *args: str) -> list[list[str]]:
        """A checking driver's printed lines, split into fields."""
        text = self.target.run(self.exe(driver, isa), *args).decode()
        return [line.split() for line in text.strip().splitlines()]

    def kernel(self, isa: str, name: str, *args, threads: int | None = None, bf16_path: str | None = None):
        """Runs the kernel `name` of cpp/kernels.h through tests/kernel_run.cpp with the arguments in
        its parameter order (numpy float32/int32 arrays, None, ints, floats), writing the results into
        the arrays passed, as the kernel would; returns the kernel's value, if it has one. bf16_path
        names the path of its bf16 products (default: the fastest the driver finds)."""
        path = () if bf16_path is None else (bf16_path,)
        out = self.target.run(self.exe("kernel_run", isa), name, *path, stdin=encode(args), threads=threads)
        pos = 0
        for a in (a for a in args if isinstance(a, np.ndarray)):
            (count,) = struct.unpack_from("<q", out, pos)
            assert count == a.size, f"{name}: array of {count} elements back for {a.size}"
            a.reshape(-1)[:] = np.frombuffer(out, a.dtype, count, pos + 8)
            pos += 8 + 4 * count
        if pos < len(out):
            assert out[pos:pos + 1] == b"r", f"{name}: unexpected output"
            return struct.unpack_from("<d", out, pos + 1)[0]
        return None


def encode(args) -> bytes:
    """kernel_run's input format (see tests/kernel_run.cpp)."""
    parts = []
    for a in args:
        if a is None:
            parts.append(b"n")
        elif isinstance(a, np.ndarray):
            assert a.dtype in (np.float32, np.int32) and a.flags.c_contiguous, a.dtype
            parts += [b"a", struct.pack("<q", a.size), a.tobytes()]
        elif isinstance(a, (bool, int, np.integer)):
            parts += [b"i", struct.pack("<q", int(a))]
        else:
            parts += [b"f", struct.pack("<d", float(a))]
    return b"".join(parts)


def drivers(found: tuple[Target | None, str], tmp_path_factory, required: bool = False) -> Drivers:
    """The Drivers of a target found by native_target() or aarch64_target(). Without the target the
    test is skipped with the reason (failed, if required)."""
    target, why_not = found
    if target is None:
        if required:
            pytest.fail(f"required, but {why_not}")
        pytest.skip(why_not)
    return Drivers(target, tmp_path_factory.mktemp(f"drivers_{target.name}"))


def find_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def native_target() -> tuple[Target | None, str]:
    """The machine's own compiler, or None and why not."""
    cxx = find_compiler()
    if cxx is None:
        return None, "no C++ compiler to build the test drivers"
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return Target("native", cxx, (), x86), ""


def aarch64_target() -> tuple[Target | None, str]:
    """The AArch64 cross compiler and qemu-user, or None and why not."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return None, "this machine is AArch64: the native tests already run the neon variant"
    cxx = shutil.which(AARCH64_CXX)
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if cxx is None or qemu is None:
        missing = [n for n, p in ((AARCH64_CXX, cxx), ("qemu-aarch64", qemu)) if p is None]
        return None, (f"{' and '.join(missing)} not found (Debian: apt-get install "
                      "g++-aarch64-linux-gnu qemu-user; .ci/aarch64 installs them)")
    if not Path(AARCH64_SYSROOT, "lib").is_dir():
        return None, f"no AArch64 libraries at {AARCH64_SYSROOT} (set LMLAB_AARCH64_SYSROOT)"
    return Target("aarch64", cxx, (qemu, "-L", AARCH64_SYSROOT), False), ""


# --- what the drivers print, checked ------------------------------------------------------------------

def gemm_tolerance(depth: int) -> float:
    """fp32 rounding over a depth-d reduction, relative to the size of the terms summed (the float64
    product of absolute values): well below 1e-5 * max(1, sqrt(d / 64)). bf16 cases compare with the
    same rounded operands, so the same bound holds."""
    return 1e-5 * max(1.0, math.sqrt(depth / 64))


def check_gemm_rows(rows: list[list[str]]) -> None:
    assert len(rows) == 74  # 18 sizes x 4 stride patterns, and 2 zero-depth cases
    seen = set()
    for M, N, K, trans_a, trans_b, alpha, accumulate, err, bitwise, guard in rows:
        case = f"M={M} N={N} K={K} transA={trans_a} transB={trans_b} alpha={alpha} acc={accumulate}"
        assert float(err) < gemm_tolerance(int(K)), case
        assert bitwise == "1", f"{case}: serial, 1-thread, 2-thread and nested calls differ"
        assert guard == "1", f"{case}: wrote outside the C window"
        seen.add((trans_a, trans_b, accumulate))
    assert len(seen) == 8  # every stride pattern with and without accumulate


# vexp's error bound in ulp, as cpp/simd.h states it (measured over every fp32 input on x86).
EXP_MAX_ULP = 1.07
SIMD_CHECKS = {"tails", "select_rules", "rounding", "bf16_rounding", "horizontal", "ldexp", "exp_special", "exp_finite"}
LANES = {"avx512": 16, "avx512_sim": 16, "avx2": 8, "neon": 4, "portable": 1}  # cpp/simd.h's kW per variant


def check_simd_lines(lines: list[list[str]], isa: str) -> None:
    results = {line[0]: line[1:] for line in lines}
    assert set(results) == SIMD_CHECKS | {"exp_max_ulp"}, sorted(results)
    for name in SIMD_CHECKS:
        failures, *detail = results[name]
        assert failures == "0", f"{name}: {failures} failures ({' '.join(detail)})"
    ulp, lanes = results["exp_max_ulp"]
    assert float(ulp) <= EXP_MAX_ULP, f"vexp max error {ulp} ulp"
    # The variant's own branch of cpp/simd.h was compiled, not another one.
    assert lanes == f"kW={LANES[isa]}", lanes
