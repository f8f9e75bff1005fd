"""The Descent page's endpoint: the path of an optimiser on one of the lecture's 1-D functions.

The numbers come from lmlab.demo_descent, the code behind `lmlab demo descent` and `demo
landscape`: descent_path for plain gradient descent on the parabola, optimise for everything else.
The page gets the whole path once per setting and reveals it one step at a time.
"""

from __future__ import annotations

import numpy as np
from starlette.requests import Request

from .. import demo_descent as dd
from .common import api, choice_value, number_value

MAX_STEPS = 500
CURVE_POINTS = 241


def _parabola(x):
    return x * x


def _parabola_slope(x):
    return 2 * x


# name -> (label, f, slope, x range drawn by default)
FUNCTIONS = {
    "parabola": ("f(x) = x\u00b2", _parabola, _parabola_slope, 5.0),
    "double_well": ("f(x) = x\u2074 \u2212 3x\u00b2 + x (two valleys)", dd.double_well, dd.double_well_slope, 2.5),
    "bumpy": ("f(x) = x\u00b2 + 0.6\u00b7sin(6x) (erratic slope)", dd.bumpy, dd.bumpy_slope, 4.0),
}
METHODS = ("gd", "momentum", "adam")


def path(function: str, method: str, start: float, lr: float, steps: int, beta: float = 0.9) -> dict:
    label, f, slope, reach = FUNCTIONS[function]
    if function == "parabola" and method == "gd":
        xs = dd.descent_path(start, lr, steps)
    else:
        xs = dd.optimise(slope, start, steps, method, lr, beta=beta)
    finite = np.isfinite(xs)
    xs = xs[: int(np.argmin(finite)) if not finite.all() else xs.size]
    shown = np.abs(xs[np.abs(xs) < 50])  # the curve covers the path, but not a runaway one
    if shown.size:
        reach = max(reach, 1.1 * float(shown.max()))
    grid = np.linspace(-reach, reach, CURVE_POINTS)
    losses = [float(v) for v in f(xs)]
    result = {"function": function, "label": label, "method": method, "start": start, "lr": lr,
              "xs": xs.tolist(), "losses": losses, "slopes": [float(v) for v in slope(xs)],
              "curve": {"x": grid.tolist(), "y": [float(v) for v in f(grid)]},
              "diverged": bool(xs.size <= steps)}
    if function == "parabola" and method == "gd":
        result["regime"] = dd.classify(xs)
    return result


@api
async def descent_endpoint(request: Request) -> dict:
    q = request.query_params
    function = choice_value(q, "function", tuple(FUNCTIONS), default="parabola")
    method = choice_value(q, "method", METHODS, default="gd")
    start = number_value(q, "start", default=4.0, lo=-10.0, hi=10.0)
    lr = number_value(q, "lr", default=0.1, lo=0.0, hi=10.0)
    steps = number_value(q, "steps", default=50, lo=1, hi=MAX_STEPS, integer=True)
    beta = number_value(q, "beta", default=0.9, lo=0.0, hi=0.999)
    return path(function, method, start, lr, steps, beta)
