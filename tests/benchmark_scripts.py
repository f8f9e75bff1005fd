"""The scripts of benchmarks/ loaded as modules, for the tests that call their functions
(test_bench_runner: bad values refused; test_docs: the commands the docs show parse).

`tests/` is on sys.path (pytest's "prepend" import mode), so tests import this as
`from benchmark_scripts import load_script`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str, monkeypatch):
    """A benchmarks/ script as a module. Some put the checkout's python/ first on sys.path so that
    they run from a checkout: kept to this test, or every later test's subprocess (given sys.path
    as PYTHONPATH) would import the uncompiled source tree instead of the installed package."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # registered, as an import would: a dataclass looks its module up to read its annotations
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module
