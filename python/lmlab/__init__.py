"""lmlab: train small GPT language models on a CPU and watch them learn.

The compiled kernels live in lmlab._core (private); lmlab.ops wraps them one function per kernel.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .ops import cpu_info, get_num_threads, set_num_threads  # noqa: E402

__all__ = ["__version__", "cpu_info", "get_num_threads", "set_num_threads"]
