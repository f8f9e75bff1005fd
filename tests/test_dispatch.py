"""Runtime CPU dispatch and thread control: what cpu_info reports, LMLAB_ISA forcing the portable path at
import (in a subprocess, since the choice is made once per process), switching variants, and the
thread-count round trip.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lmlab
from lmlab import checks, ops

KNOWN_ISAS = ("avx512", "avx2", "neon", "portable")  # best first; x86-64 builds never hold neon
# A variant lmlab knows that this build or CPU does not run (neon on x86-64, avx2 on AArch64).
UNAVAILABLE_ISA = next(n for n in KNOWN_ISAS if n not in lmlab.cpu_info()["available"])


def test_cpu_info_fields():
    info = lmlab.cpu_info()
    assert set(info) >= {"isa", "available", "openmp", "num_threads"}
    assert info["isa"] in KNOWN_ISAS
    assert info["isa"] in info["available"]
    assert all(name in KNOWN_ISAS for name in info["available"])
    assert len(set(info["available"])) == len(info["available"])
    assert "portable" in info["available"], "the portable baseline runs on every CPU"
    # Best first: the order of KNOWN_ISAS.
    assert info["available"] == sorted(info["available"], key=KNOWN_ISAS.index)
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1
    if not info["openmp"]:
        assert info["num_threads"] == 1


def test_default_is_best_available():
    if os.environ.get("LMLAB_ISA"):
        pytest.skip("LMLAB_ISA is set in this environment, so the import-time choice was forced")
    info = lmlab.cpu_info()
    assert info["isa"] == info["available"][0]


# A child process: imports lmlab with a given environment, reports cpu_info and one kernel result.
CHILD = r"""
import json, sys
import numpy as np
import lmlab
from lmlab import ops
x = np.linspace(-4.0, 4.0, 101, dtype=np.float32)
out = ops.gelu_forward(np.zeros_like(x), x)
w = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
y = ops.matmul_forward(np.zeros((25, 3), np.float32), x[:100].reshape(25, 4), w)
json.dump({"info": lmlab.cpu_info(), "gelu": out.tolist(), "matmul": y.tolist()}, sys.stdout)
"""


def run_child(isa_env):
    env = dict(os.environ)
    env.pop("LMLAB_ISA", None)
    if isa_env is not None:
        env["LMLAB_ISA"] = isa_env
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_lmlab_isa_forces_portable_at_import():
    forced = run_child("portable")
    assert forced["info"]["isa"] == "portable"
    best = run_child(None)
    assert best["info"]["isa"] == best["info"]["available"][0]
    # Same math on both paths: GELU within float32 rounding, matmul of 4-term dot products likewise.
    np.testing.assert_allclose(forced["gelu"], best["gelu"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(forced["matmul"], best["matmul"], rtol=1e-5, atol=1e-6)
    x = np.linspace(-4.0, 4.0, 101)
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(forced["gelu"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sse9000", "neon" if platform.machine() == "x86_64" else "avx2"])
def test_lmlab_isa_naming_no_variant_this_cpu_runs_fails_the_import(name):
    """A forced variant that cannot run is an error, not a silent run on another one (which would
    test or measure something else than asked); the message names what can run."""
    env = dict(os.environ, LMLAB_ISA=name)
    done = subprocess.run([sys.executable, "-c", "import lmlab"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert f"LMLAB_ISA='{name}' names no kernel variant" in done.stderr
    assert "available here: " + ", ".join(lmlab.cpu_info()["available"]) in done.stderr


def _console_script(tmp_path) -> str:
    """The `lmlab` command as pip installs it: a script named lmlab that imports the entry point
    pyproject.toml declares and calls it."""
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    module, function = re.search(r'^lmlab = "([\w.]+):(\w+)"$', pyproject, re.M).groups()
    script = tmp_path / "lmlab"
    script.write_text(f"import re, sys\nfrom {module} import {function}\n"
                      f"if __name__ == '__main__':\n    sys.exit({function}())\n")
    return str(script)


@pytest.mark.parametrize("command", ["console script", "python -m lmlab"])
@pytest.mark.parametrize("variable,value", [("LMLAB_ISA", "junk"), ("LMLAB_BF16", "junk")])
def test_the_command_line_refuses_a_bad_lmlab_isa_in_one_line(tmp_path, command, variable, value):
    """`import lmlab` fails on a bad LMLAB_ISA (the compiled core refuses it as it loads); the
    command line says so as it says any usage error: one line naming the variable, its value and
    what it accepts, exit status 2, no traceback."""
    start = ([sys.executable, _console_script(tmp_path)] if command == "console script"
             else [sys.executable, "-m", "lmlab"])
    package_dir = str(Path(lmlab.__file__).parents[1])
    env = dict(os.environ, **{variable: value},
               PYTHONPATH=os.pathsep.join(filter(None, [package_dir, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([*start, "doctor"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"lmlab: error: {variable}='{value}' names no ")
    accepted = ("; available here: " + ", ".join(lmlab.cpu_info()["available"])
                if variable == "LMLAB_ISA" else "; the paths are ")
    assert accepted in done.stderr, done.stderr
    # Python's own import keeps the ImportError, with the same message.
    done = subprocess.run([sys.executable, "-c", "import lmlab"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert f"ImportError: {variable}='{value}' names no " in done.stderr


@pytest.mark.parametrize("name", lmlab.cpu_info()["available"])
def test_set_isa_switches_and_use_isa_restores(name):
    before = ops.cpu_info()["isa"]
    with ops.use_isa(name):
        assert ops.cpu_info()["isa"] == name
        x = np.linspace(-3, 3, 37, dtype=np.float32)
        out = ops.gelu_forward(np.zeros_like(x), x)
        assert np.all(np.isfinite(out))
    assert ops.cpu_info()["isa"] == before
    ops.set_isa(name)
    try:
        assert ops.cpu_info()["isa"] == name
    finally:
        ops.set_isa(before)


def test_use_isa_restores_after_an_exception():
    before = ops.cpu_info()["isa"]
    with pytest.raises(RuntimeError):
        with ops.use_isa("portable"):
            raise RuntimeError("inside")
    assert ops.cpu_info()["isa"] == before


@pytest.mark.parametrize("name", ["sse9000", "", "AVX512", UNAVAILABLE_ISA])
def test_set_isa_unknown_raises(name):
    before = ops.cpu_info()["isa"]
    with pytest.raises(ValueError, match="not available.*available: .*portable"):
        ops.set_isa(name)
    assert ops.cpu_info()["isa"] == before


def test_num_threads_round_trip():
    before = ops.get_num_threads()
    try:
        for n in (1, 2, 3, before):
            ops.set_num_threads(n)
            expected = n if lmlab.cpu_info()["openmp"] else 1
            assert ops.get_num_threads() == expected
            assert lmlab.get_num_threads() == expected
            assert lmlab.cpu_info()["num_threads"] == expected
    finally:
        ops.set_num_threads(before)


def test_num_threads_belong_to_the_python_thread_that_sets_them():
    """As the docstring, README and DESIGN say: OpenMP's count is per thread, so a new Python
    thread starts at the default, and what it sets stays its own (the KV-cached decode step's one
    thread does not slow a training thread)."""
    import threading

    if not lmlab.cpu_info()["openmp"]:
        pytest.skip("without OpenMP every count is 1")

    def in_a_thread(work):
        out = []
        worker = threading.Thread(target=lambda: out.append(work()))
        worker.start()
        worker.join()
        return out[0]

    before = ops.get_num_threads()
    fresh = in_a_thread(ops.get_num_threads)
    try:
        lmlab._core.set_num_threads(fresh + 1)      # unchecked: the default may be OMP_NUM_THREADS
        assert in_a_thread(ops.get_num_threads) == fresh
        in_a_thread(lambda: lmlab._core.set_num_threads(fresh + 2))
        assert ops.get_num_threads() == fresh + 1
    finally:
        lmlab._core.set_num_threads(before)


def test_num_threads_context_restores():
    before = ops.get_num_threads()
    with ops.num_threads(1):
        assert ops.get_num_threads() == 1
    assert ops.get_num_threads() == before


def test_num_threads_restores_a_count_above_what_callers_may_ask():
    """OMP_NUM_THREADS may start a process above 4 per core; a block run on fewer threads (the
    KV-cached decode step) still gives that count back."""
    before = ops.get_num_threads()
    try:
        lmlab._core.set_num_threads(checks.max_threads() + 1)
        with ops.num_threads(1):
            assert ops.get_num_threads() == 1
        assert ops.get_num_threads() == checks.max_threads() + 1
    finally:
        lmlab._core.set_num_threads(before)


@pytest.mark.parametrize("n", [0, -1, 1.5, "2", None, True, 100_000])
def test_set_num_threads_refuses_what_threads_refuses(n):
    """The rule of threads= and --threads: an integer from 1 to 4 per core. A huge count would
    have OpenMP fail to make the threads and end the process at the next kernel call."""
    before = ops.get_num_threads()
    with pytest.raises(ValueError, match=rf"threads={n!r} is not allowed: expected an integer >= 1 "
                                         rf"and <= {checks.max_threads()}"):
        lmlab.set_num_threads(n)
    assert ops.get_num_threads() == before


# --- bf16 paths ---------------------------------------------------------------------------------------

BF16_PATHS = ("amx", "avx512_bf16", "emulated")  # fastest first


def test_cpu_info_names_the_bf16_paths():
    info = ops.cpu_info()
    assert info["bf16_paths"] and info["bf16_paths"][-1] == "emulated", "emulation runs everywhere"
    assert all(p in BF16_PATHS for p in info["bf16_paths"])
    assert info["bf16_paths"] == sorted(info["bf16_paths"], key=BF16_PATHS.index)
    assert info["bf16_path"] in info["bf16_paths"]
    # Only the avx512 variant holds native bf16 code.
    expected = info["bf16_path"] if info["isa"] == "avx512" else "emulated"
    assert info["bf16_matmul"] == expected
    with ops.use_isa("portable"):
        assert ops.cpu_info()["bf16_matmul"] == "emulated"


def test_default_bf16_path_is_the_fastest():
    if os.environ.get("LMLAB_BF16"):
        pytest.skip("LMLAB_BF16 is set in this environment, so the import-time choice was forced")
    info = ops.cpu_info()
    assert info["bf16_path"] == info["bf16_paths"][0]


@pytest.mark.parametrize("name", lmlab.cpu_info()["bf16_paths"])
def test_use_bf16_path_switches_and_restores(name):
    before = ops.cpu_info()["bf16_path"]
    with ops.use_bf16_path(name):
        assert ops.cpu_info()["bf16_path"] == name
    assert ops.cpu_info()["bf16_path"] == before


@pytest.mark.parametrize("name", ["AMX", "", "fp16", "avx512bf16"])
def test_set_bf16_path_unknown_raises(name):
    before = ops.cpu_info()["bf16_path"]
    with pytest.raises(ValueError, match=f"unknown bf16 path '{name}'; the paths are amx, avx512_bf16, emulated"):
        ops.set_bf16_path(name)
    assert ops.cpu_info()["bf16_path"] == before


def test_set_bf16_path_unavailable_raises():
    missing = [p for p in BF16_PATHS if p not in ops.cpu_info()["bf16_paths"]]
    if not missing:
        pytest.skip("this CPU runs every bf16 path")
    with pytest.raises(ValueError, match=f"'{missing[0]}' is not available.*available: .*emulated"):
        ops.set_bf16_path(missing[0])


def run_child_bf16(value):
    env = dict(os.environ, LMLAB_BF16=value)
    return subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("name", lmlab.cpu_info()["bf16_paths"])
def test_lmlab_bf16_forces_a_path_at_import(name):
    done = run_child_bf16(name)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["info"]["bf16_path"] == name


def test_lmlab_bf16_refuses_what_the_cpu_lacks():
    missing = [p for p in BF16_PATHS if p not in ops.cpu_info()["bf16_paths"]]
    for name in missing + ["tf32"]:
        done = run_child_bf16(name)
        assert done.returncode != 0
        assert f"LMLAB_BF16='{name}'" in done.stderr and "emulated" in done.stderr, done.stderr
