"""Gradient-descent teaching views that need only the package: `demo descent` and `demo landscape`.

descent:    x <- x - lr * f'(x) on the parabola f(x) = x^2 for several learning rates (slow, good,
            overshooting, diverging), the path on the curve, the loss and the step sizes.
landscape:  what can go wrong, and the "advanced versions": a double well (the start decides which
            minimum you end in), a bumpy function whose slope flips sign erratically, and momentum
            and Adam beside plain gradient descent on that bumpy function.
Every number drawn comes back in the DemoResult, computed in float64 by the loops below.
"""

from __future__ import annotations

import math

import numpy as np

from .demo_common import (DemoResult, SettingValueError, check_float, check_int, format_table,
                          new_figure, out_dir, save_gif, save_png, write_text)

DEFAULT_LRS = (0.05, 0.3, 0.9, 1.05)  # slow and steady; good; overshoots and oscillates; diverges
ESCAPE = 1e12  # a diverging path past this |x| has left every chart; stop instead of overflowing
# Most steps a view draws: each descent step is a frame of its animation; the landscape views step
# scalar optimisers in Python (10,000 steps take about a second).
MAX_DESCENT_STEPS = 1_000
# Farthest start from the minimum: the pictures draw the curve out to the start, and the squares of
# a start much larger overflow float64 (--start 1e300 printed 300-digit positions and f = inf).
MAX_START = 1e6
# Largest learning rate: a path stops once past ESCAPE, but one step of --lr 1e300 leapt from the
# start straight past float64 (overflow warnings, inf and nan in the table and the pictures); up
# to this one the step that escapes still lands within range, and diverging needs only lr > 1.
MAX_LR = 1e3
MAX_LANDSCAPE_STEPS = 10_000

REGIME_COLOURS = {
    "slow, steady": "tab:blue",
    "good: fast and steady": "tab:green",
    "overshoots, oscillates": "tab:orange",
    "never settles": "tab:purple",
    "diverges": "tab:red",
    "already at the minimum": "tab:gray",
}


def check_lr(name: str, value, *, positive: bool = False) -> float:
    """A finite learning rate of magnitude at most MAX_LR."""
    lr = check_float(name, value, positive=positive)
    if abs(lr) > MAX_LR:
        raise SettingValueError(name, f"must be within \u00b1{MAX_LR:,.0f}, got {lr:g}")
    return lr


def check_start(name: str, value) -> float:
    """A finite starting x within MAX_START of 0."""
    x = check_float(name, value)
    if abs(x) > MAX_START:
        raise SettingValueError(name, f"must be within \u00b1{MAX_START:,.0f} of the minimum, got {x:g}")
    return x


# ---------------------------------------------------------------------------------------------
# descent on the parabola


def descent_path(start: float, lr: float, steps: int) -> np.ndarray:
    """x_0 = start, x_{k+1} = x_k - lr * 2 x_k (the derivative of x^2 is 2x), float64."""
    xs = [float(start)]
    for _ in range(steps):
        x = xs[-1]
        xs.append(x - lr * 2.0 * x)
        if abs(xs[-1]) > ESCAPE:
            break
    return np.array(xs)


def classify(xs: np.ndarray) -> str:
    """Name what a path on x^2 did, from the path alone."""
    a = np.abs(xs)
    if a[0] == 0.0:
        return "already at the minimum"
    if a[-1] > a[0]:
        return "diverges"
    if a[-1] == a[0]:
        return "never settles"
    if np.any(np.sign(xs[1:]) * np.sign(xs[:-1]) < 0):
        return "overshoots, oscillates"
    return "good: fast and steady" if a[-1] <= 1e-3 * a[0] else "slow, steady"


def descent(out, *, lr=None, lrs=DEFAULT_LRS, start: float = 4.0, steps: int = 20, gif: bool = True) -> DemoResult:
    """Gradient descent on f(x) = x^2 from `start` for each learning rate in `lrs` (plus `lr`, the user's own).

    Writes descent.png (path on the parabola, loss per step, first step sizes; one column per
    learning rate), descent.gif (the paths growing step by step) and descent.txt.
    """
    start = check_start("start", start)
    steps = check_int("steps", steps, 1, MAX_DESCENT_STEPS)
    rates = [check_lr("lrs", v) for v in lrs]
    if lr is not None:
        lr = check_lr("lr", lr)
        if lr not in rates:
            rates.append(lr)
    if not rates:
        raise SettingValueError("lrs", "must name at least one learning rate (or pass lr), got none")
    out = out_dir(out)

    runs = []
    for r in rates:
        xs = descent_path(start, r, steps)
        runs.append(
            {
                "lr": r,
                "yours": lr is not None and r == lr,
                "xs": xs,
                "losses": xs**2,
                "step_sizes": np.diff(xs),  # = -lr * 2 x_k
                "regime": classify(xs),
            }
        )

    fig = new_figure(3.3 * len(runs), 9.2)
    axes = fig.subplots(3, len(runs), squeeze=False, gridspec_kw={"height_ratios": [3.0, 2.0, 2.2]})
    fig.suptitle(
        f"Gradient descent on f(x) = x\u00b2 from x\u2080 = {start:g}:  slope f\u2032(x) = 2x,  "
        f"step  x \u2190 x \u2212 lr\u00b72x",
        fontsize=13,
    )
    curves = []
    for j, run in enumerate(runs):
        colour = REGIME_COLOURS[run["regime"]]
        xs = run["xs"]
        reach = max(abs(start), float(np.max(np.abs(xs)))) * 1.15 or 1.0
        grid = np.linspace(-reach, reach, 400)
        ax = axes[0, j]
        ax.plot(grid, grid**2, color="0.6", lw=1.5, label="f(x) = x\u00b2")
        (line,) = ax.plot(xs, xs**2, "-o", color=colour, ms=4, lw=1.2, label="path")
        ax.plot(xs[:1], xs[:1] ** 2, "s", color="black", ms=7, label="start")
        curves.append((line, xs))
        who = "  (your lr)" if run["yours"] else ""
        ax.set_title(f"lr = {run['lr']:g}{who}\n{run['regime']}", color=colour, fontsize=11)
        ax.set_xlabel("x (the parameter)")
        ax.set_ylabel("f(x) (the loss)")
        ax.legend(fontsize=8, loc="upper center")

        ax = axes[1, j]
        losses = run["losses"]
        positive = losses > 0
        ax.semilogy(np.arange(len(xs))[positive], losses[positive], "-o", color=colour, ms=3)
        if not positive.all():
            # a log axis cannot show 0 (lr = 0.5 lands exactly on the minimum), so say it instead
            first_zero = int(np.argmin(positive))
            ax.text(0.5, 0.5, f"loss exactly 0\nfrom step {first_zero}", transform=ax.transAxes,
                    ha="center", va="center", color=colour, fontsize=10)
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("loss f(x) (log scale)")
        ax.grid(True, which="major", alpha=0.3)

        ax = axes[2, j]
        ax.axis("off")
        ax.set_title("step sizes: step = \u2212lr \u00b7 slope", fontsize=9)

        def row(k):
            return [str(k), f"{xs[k]:.3g}", f"{2 * xs[k]:.3g}", f"{run['step_sizes'][k]:+.3g}"]

        shown = list(range(min(6, len(xs) - 1)))
        rows = [row(k) for k in shown]
        if len(xs) - 1 > len(shown):
            rows += [["\u2026", "", "", ""], row(len(xs) - 2)]
        tab = ax.table(cellText=rows, colLabels=["k", "x\u2096", "slope 2x\u2096", "step"], loc="upper center")
        tab.auto_set_font_size(False)
        tab.set_fontsize(8)
        tab.scale(1.0, 1.15)
    files = {"figure": save_png(fig, out / "descent.png")}

    if gif:
        anim_fig = new_figure(3.0 * len(runs), 3.4)
        anim_axes = anim_fig.subplots(1, len(runs), squeeze=False)[0]
        moving = []
        for ax, run, (_, xs) in zip(anim_axes, runs, curves):
            reach = max(abs(start), float(np.max(np.abs(xs)))) * 1.15 or 1.0
            grid = np.linspace(-reach, reach, 300)
            ax.plot(grid, grid**2, color="0.6", lw=1.5)
            (trail,) = ax.plot([], [], "-o", color=REGIME_COLOURS[run["regime"]], ms=4, lw=1.2)
            (ball,) = ax.plot([], [], "o", color="black", ms=9)
            ax.set_title(f"lr = {run['lr']:g}: {run['regime']}", fontsize=9)
            ax.set_xlabel("x")
            moving.append((trail, ball, xs))
        anim_axes[0].set_ylabel("f(x) = x\u00b2")
        title = anim_fig.suptitle("")

        def update(k):
            for trail, ball, xs in moving:
                n = min(k, len(xs) - 1)
                trail.set_data(xs[: n + 1], xs[: n + 1] ** 2)
                ball.set_data(xs[n : n + 1], xs[n : n + 1] ** 2)
            title.set_text(f"gradient descent on x\u00b2, step {k}")
            return []

        files["animation"] = save_gif(anim_fig, update, steps + 1, out / "descent.gif")

    head = ["step"]
    for run in runs:
        head += [f"x (lr={run['lr']:g})", "step"]
    longest = max(len(run["xs"]) for run in runs)
    rows = []
    for k in range(longest):
        row = [k]
        for run in runs:
            xs, ds = run["xs"], run["step_sizes"]
            row += [float(xs[k]) if k < len(xs) else "", float(ds[k]) if k < len(ds) else ""]
        rows.append(row)
    table = format_table(head, rows)
    explanation = (
        "Gradient descent on f(x) = x^2. The slope at x is f'(x) = 2x, so every step moves\n"
        "x <- x - lr*2x = (1 - 2 lr) x: each step multiplies x by the same factor (1 - 2 lr).\n"
        "  small lr (0 < lr < 0.5):  the factor is just below 1 -> slow, steady slide to the minimum\n"
        "  lr near 0.5:             the factor is near 0 -> the minimum in a step or two\n"
        "  0.5 < lr < 1:            the factor is negative -> it jumps over the minimum, back and forth,\n"
        "                           and still converges while |1 - 2 lr| < 1\n"
        "  lr > 1:                  |1 - 2 lr| > 1 -> every jump lands further out: it diverges.\n"
        "Training a language model is the same move, with millions of x's and a loss whose slopes\n"
        "the backward pass computes. " + ", ".join(f"lr={r['lr']:g}: {r['regime']}" for r in runs) + "."
    )
    files["text"] = write_text(out / "descent.txt", explanation + "\n\n" + table + "\n")
    numbers = {"start": start, "steps": steps, "runs": runs}
    return DemoResult("descent", files, numbers, explanation, table)


# ---------------------------------------------------------------------------------------------
# landscapes where plain gradient descent struggles, and the optimisers that help


def double_well(x):
    """x^4 - 3x^2 + x: a global minimum near x = -1.30 and a local one near x = 1.13."""
    return x**4 - 3 * x**2 + x


def double_well_slope(x):
    return 4 * x**3 - 6 * x + 1


BUMP_A, BUMP_B = 0.6, 6.0  # ripple height and frequency: slope ripple a*b = 3.6 beats 2x near |x| < 1.8


def bumpy(x):
    """x^2 + 0.6 sin(6x): a bowl covered in ripples, so the slope flips sign again and again."""
    return x**2 + BUMP_A * np.sin(BUMP_B * x)


def bumpy_slope(x):
    return 2 * x + BUMP_A * BUMP_B * np.cos(BUMP_B * x)


def optimise(slope, start: float, steps: int, method: str = "gd", lr: float = 0.01, *, beta: float = 0.9,
             beta2: float = 0.999, eps: float = 1e-8) -> np.ndarray:
    """The path x_0..x_steps of one optimiser on a 1-D function given its slope (derivative).

    gd:        x <- x - lr g
    momentum:  v <- beta v + g;  x <- x - lr v          (a heavy ball: speed builds up along a slope)
    adam:      m, v running means of g and g^2 (bias-corrected); x <- x - lr m / (sqrt(v) + eps)
               (every step about lr long whatever the slope's size)
    """
    if method not in ("gd", "momentum", "adam"):
        raise ValueError(f"method must be 'gd', 'momentum' or 'adam', got {method!r}")
    x, v, m = float(start), 0.0, 0.0
    xs = [x]
    for t in range(1, steps + 1):
        g = float(slope(x))
        if method == "gd":
            x = x - lr * g
        elif method == "momentum":
            v = beta * v + g
            x = x - lr * v
        else:
            m = beta * m + (1 - beta) * g
            v = beta2 * v + (1 - beta2) * g * g
            x = x - lr * (m / (1 - beta**t)) / (math.sqrt(v / (1 - beta2**t)) + eps)
        xs.append(x)
        if abs(x) > ESCAPE:
            break
    return np.array(xs)


def steps_to_reach(xs: np.ndarray, target: float, tol: float):
    """First step from which the path stays within tol of target; None if it never settles there."""
    inside = np.abs(xs - target) < tol
    if not inside[-1]:
        return None
    outside = np.nonzero(~inside)[0]
    return int(outside[-1] + 1) if len(outside) else 0


def double_well_minima() -> tuple[float, float]:
    """(global, local) minimum of the double well: the real roots of its slope with positive curvature."""
    roots = np.roots([4.0, 0.0, -6.0, 1.0])
    roots = np.sort(roots[np.abs(roots.imag) < 1e-12].real)
    minima = [r for r in roots if 12 * r * r - 6 > 0]
    minima.sort(key=double_well)
    return float(minima[0]), float(minima[1])


def bumpy_global_min() -> float:
    grid = np.linspace(-4.0, 4.0, 800_001)
    x = float(grid[np.argmin(bumpy(grid))])
    for _ in range(5):  # polish with Newton on the slope
        x -= bumpy_slope(x) / (2 - BUMP_A * BUMP_B**2 * math.sin(BUMP_B * x))
    return x


def _curve_axes(ax, f, lo, hi, title):
    grid = np.linspace(lo, hi, 600)
    ax.plot(grid, f(grid), color="0.55", lw=1.5, label="f(x)")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("x (the parameter)")
    ax.set_ylabel("f(x) (the loss)")


def _loss_axes(ax, title, best, best_label):
    ax.axhline(best, color="0.3", ls=":", lw=1, label=best_label)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step")
    ax.set_ylabel("f(x)")
    ax.legend(fontsize=8)


def local_global(out, *, starts=(-2.0, 2.0), lr: float = 0.02, steps: int = 60) -> DemoResult:
    """Plain gradient descent on the double well from each start: where you start decides where you end."""
    starts = [check_start("starts", s) for s in starts]
    lr = check_lr("lr", lr, positive=True)
    steps = check_int("steps", steps, 1, MAX_LANDSCAPE_STEPS)
    out = out_dir(out)
    x_global, x_local = double_well_minima()
    runs = []
    for s in starts:
        xs = optimise(double_well_slope, s, steps, "gd", lr)
        end = float(xs[-1])
        near = min((abs(end - x_global), "global"), (abs(end - x_local), "local"))
        runs.append({"start": s, "xs": xs, "end": end, "end_loss": float(double_well(end)),
                     "reached": near[1] if near[0] < 0.05 else "neither"})

    fig = new_figure(11, 4.6)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1.0]})
    lo = min(-2.2, *starts) - 0.1
    hi = max(2.2, *starts) + 0.1
    _curve_axes(ax, double_well, lo, hi, "f(x) = x\u2074 \u2212 3x\u00b2 + x: two valleys")
    colours = ["tab:blue", "tab:red", "tab:green", "tab:purple"]
    for run, c in zip(runs, colours * len(runs)):
        xs = run["xs"]
        ax.plot(xs, double_well(xs), "-o", ms=3, color=c,
                label=f"start {run['start']:g} \u2192 ends at {run['end']:.3f} ({run['reached']} min)")
        ax2.plot(double_well(xs), "-", color=c, label=f"start {run['start']:g}")
    for xm, name in ((x_global, "global minimum"), (x_local, "local minimum")):
        ax.axvline(xm, color="0.3", ls=":", lw=1)
        ax.annotate(name, (xm, double_well(xm)), textcoords="offset points", xytext=(0, -16),
                    ha="center", fontsize=8)
    ax.margins(y=0.12)
    ax.legend(fontsize=8, loc="upper center")
    _loss_axes(ax2, f"loss per step (lr = {lr:g})", double_well(x_global), "best possible")
    files = {"local_global": save_png(fig, out / "landscape_local_global.png")}
    explanation = (
        "A local and a global minimum. Gradient descent only sees the slope where it stands, so it\n"
        "walks downhill into whichever valley it starts in. Both ends below have slope 0, and\n"
        "nothing in the update tells the run that stopped in the higher valley that a lower one exists.\n"
        + "\n".join(f"  start {r['start']:+g} -> x = {r['end']:.4f}, f = {r['end_loss']:.4f} ({r['reached']} minimum)"
                    for r in runs)
        + f"\n  (global minimum x = {x_global:.4f}, local minimum x = {x_local:.4f})"
    )
    numbers = {"x_global": x_global, "x_local": x_local, "lr": lr, "runs": runs}
    return DemoResult("landscape", files, numbers, explanation)


def erratic(out, *, start: float = 3.0, lrs=(0.05, 0.3), steps: int = 60) -> DemoResult:
    """Plain gradient descent on the bumpy function: a small lr sticks in a ripple, a large one bounces."""
    start = check_start("start", start)
    rates = [check_lr("lrs", r, positive=True) for r in lrs]
    steps = check_int("steps", steps, 1, MAX_LANDSCAPE_STEPS)
    out = out_dir(out)
    x_star = bumpy_global_min()
    runs = []
    for r in rates:
        xs = optimise(bumpy_slope, start, steps, "gd", r)
        runs.append({"lr": r, "xs": xs, "end": float(xs[-1]), "end_loss": float(bumpy(xs[-1])),
                     "steps_to_min": steps_to_reach(xs, x_star, 0.1)})

    fig = new_figure(12, 6.4)
    grid = fig.add_gridspec(2, 2, width_ratios=[1.4, 1.0])
    ax = fig.add_subplot(grid[0, 0])
    ax_slope = fig.add_subplot(grid[1, 0], sharex=ax)
    ax_loss = fig.add_subplot(grid[:, 1])
    lo, hi = min(-3.2, start - 0.3), max(3.2, start + 0.3)
    _curve_axes(ax, bumpy, lo, hi, "f(x) = x\u00b2 + 0.6\u00b7sin(6x): a bowl covered in ripples")
    colours = ["tab:blue", "tab:red", "tab:green", "tab:purple"]
    for run, c in zip(runs, colours * len(runs)):
        xs = run["xs"]
        ax.plot(xs, bumpy(xs), "-o", ms=3, lw=0.8, color=c, alpha=0.7, label=f"lr = {run['lr']:g}: ends at x = {run['end']:.2f}")
        ax_loss.plot(bumpy(xs), "-o", ms=2, lw=1, color=c, label=f"lr = {run['lr']:g}")
    ax.axvline(x_star, color="0.3", ls=":", lw=1)
    ax.legend(fontsize=8, loc="upper center")
    xg = np.linspace(lo, hi, 800)
    ax_slope.plot(xg, bumpy_slope(xg), color="tab:brown", label="slope f\u2032(x) = 2x + 3.6\u00b7cos(6x)")
    ax_slope.plot(xg, 2 * xg, color="0.5", ls="--", label="slope of the bowl alone, 2x")
    ax_slope.axhline(0, color="black", lw=0.8)
    ax_slope.set_title("the slope flips sign again and again: every crossing of 0 is a dip or a bump", fontsize=10)
    ax_slope.set_xlabel("x")
    ax_slope.set_ylabel("slope f\u2032(x)")
    ax_slope.legend(fontsize=8)
    _loss_axes(ax_loss, "loss per step", bumpy(x_star), "global minimum")
    files = {"erratic": save_png(fig, out / "landscape_erratic.png")}
    explanation = (
        "An erratic slope. The ripples make the slope swing between large positive and negative\n"
        "values, so the slope at one point says little about the way to the bottom of the bowl:\n"
        "a small learning rate stops in the first ripple it meets, a large one is thrown about.\n"
        + "\n".join(f"  lr {r['lr']:g}: ends at x = {r['end']:.4f}, f = {r['end_loss']:.4f}" for r in runs)
        + f"\n  (global minimum x = {x_star:.4f}, f = {bumpy(x_star):.4f})"
    )
    numbers = {"x_star": x_star, "start": start, "runs": runs}
    return DemoResult("landscape", files, numbers, explanation)


def _check_momentum(momentum) -> float:
    momentum = check_float("momentum", momentum)
    if not 0 <= momentum < 1:
        raise SettingValueError("momentum", f"must be in [0, 1), got {momentum}")
    return momentum


def optimizers(out, *, start: float = 3.0, lr: float = 0.01, momentum: float = 0.9, adam_lr: float = 0.3,
               steps: int = 100, tol: float = 0.1, gif: bool = True) -> DemoResult:
    """Plain GD, momentum and Adam on the bumpy function from one start.

    Documented case (the defaults): from x = 3 plain GD with lr 0.01 stops in a ripple near x = 1.64;
    momentum (same lr, beta 0.9) rolls through the ripples and Adam (lr 0.3) takes even-sized steps
    over them; both settle within 0.1 of the global minimum (x = -0.2396) in under 50 steps.
    """
    start = check_start("start", start)
    lr = check_lr("lr", lr, positive=True)
    momentum = _check_momentum(momentum)
    adam_lr = check_lr("adam_lr", adam_lr, positive=True)
    steps = check_int("steps", steps, 1, MAX_LANDSCAPE_STEPS)
    tol = check_float("tol", tol, positive=True)
    out = out_dir(out)
    x_star = bumpy_global_min()
    setups = {
        "gd": ("plain gradient descent", f"lr {lr:g}", dict(lr=lr), "tab:red"),
        "momentum": ("momentum", f"lr {lr:g}, \u03b2 {momentum:g}", dict(lr=lr, beta=momentum), "tab:blue"),
        "adam": ("Adam", f"lr {adam_lr:g}", dict(lr=adam_lr), "tab:green"),
    }
    runs = {}
    for key, (name, how, kw, colour) in setups.items():
        xs = optimise(bumpy_slope, start, steps, key, **kw)
        runs[key] = {"name": name, "settings": how, "colour": colour, "xs": xs, "end": float(xs[-1]),
                     "end_loss": float(bumpy(xs[-1])), "steps_to_min": steps_to_reach(xs, x_star, tol)}

    def reached(run):
        n = run["steps_to_min"]
        return f"within {tol:g} of the minimum from step {n}" if n is not None else "never settles at the minimum"

    fig = new_figure(12, 4.8)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1.0]})
    lo, hi = min(-3.2, start - 0.3), max(3.2, start + 0.3)
    _curve_axes(ax, bumpy, lo, hi, f"same function, same start (x\u2080 = {start:g}), three optimisers")
    for run, offset in zip(runs.values(), (0.0, 0.35, 0.7)):
        xs = run["xs"]
        # lift each path a little so the three do not hide one another on the curve
        ax.plot(xs, bumpy(xs) + offset, "-o", ms=2.5, lw=0.8, color=run["colour"],
                label=f"{run['name']} ({run['settings']})")
    ax.axvline(x_star, color="0.3", ls=":", lw=1)
    ax.legend(fontsize=8, loc="upper center", title="paths (lifted apart to stay visible)", title_fontsize=8)
    for run in runs.values():
        dist = np.maximum(np.abs(run["xs"] - x_star), 1e-12)
        ax2.semilogy(dist, color=run["colour"], label=f"{run['name']}: {reached(run)}")
    ax2.axhline(tol, color="0.3", ls=":", lw=1, label=f"counted as reached: within {tol:g}")
    ax2.set_title("distance to the global minimum per step", fontsize=11)
    ax2.set_xlabel("step")
    ax2.set_ylabel("|x \u2212 x*| (log scale)")
    ax2.legend(fontsize=7.5)
    files = {"optimizers": save_png(fig, out / "landscape_optimizers.png")}

    if gif:
        anim_fig = new_figure(7.5, 4.2)
        ax = anim_fig.subplots()
        _curve_axes(ax, bumpy, lo, hi, "")
        balls = []
        for run in runs.values():
            (trail,) = ax.plot([], [], "-", color=run["colour"], lw=1, alpha=0.6)
            (ball,) = ax.plot([], [], "o", color=run["colour"], ms=10, label=run["name"])
            balls.append((trail, ball, run["xs"]))
        ax.legend(fontsize=8, loc="upper center")

        def update(k):
            for trail, ball, xs in balls:
                n = min(k, len(xs) - 1)
                trail.set_data(xs[max(0, n - 8) : n + 1], bumpy(xs[max(0, n - 8) : n + 1]))
                ball.set_data(xs[n : n + 1], bumpy(xs[n : n + 1]))
            ax.set_title(f"step {k}: plain GD, momentum and Adam on x\u00b2 + 0.6\u00b7sin(6x)", fontsize=10)
            return []

        frames = min(steps, 70) + 1
        files["animation"] = save_gif(anim_fig, update, frames, out / "landscape_optimizers.gif", fps=8)

    explanation = (
        "The advanced versions. Momentum keeps a running velocity, so a ball that has picked up speed\n"
        "rolls over a small ripple instead of stopping in it. Adam divides each step by a running size\n"
        "of the slope, so every step is about lr long whether the slope is steep or flat.\n"
        + "\n".join(f"  {r['name']:<24} ({r['settings']}): ends at x = {r['end']:.4f}; {reached(r)}"
                    for r in runs.values())
        + f"\n  (global minimum x = {x_star:.4f}) Neither is magic: other starts or rates can still land in a ripple."
    )
    numbers = {"x_star": x_star, "start": start, "tol": tol, "runs": runs}
    return DemoResult("landscape", files, numbers, explanation)


def landscape(out, *, start: float = 3.0, lr: float = 0.01, momentum: float = 0.9, adam_lr: float = 0.3,
              steps: int = 100, gif: bool = True) -> DemoResult:
    """All three 'what can go wrong' pictures: local vs global minimum, erratic slope, optimisers."""
    # every value checked before the first picture is written (each part checks its own too)
    check_start("start", start), check_lr("lr", lr, positive=True)
    check_lr("adam_lr", adam_lr, positive=True)
    check_int("steps", steps, 1, MAX_LANDSCAPE_STEPS)
    _check_momentum(momentum)
    parts = {
        "local_global": local_global(out, steps=max(steps, 60)),
        "erratic": erratic(out, start=start, steps=max(steps, 60)),
        "optimizers": optimizers(out, start=start, lr=lr, momentum=momentum, adam_lr=adam_lr, steps=steps, gif=gif),
    }
    files = {k: v for part in parts.values() for k, v in part.files.items()}
    explanation = "\n\n".join(part.explanation for part in parts.values())
    files["text"] = write_text(out_dir(out) / "landscape.txt", explanation + "\n")
    return DemoResult("landscape", files, {k: v.numbers for k, v in parts.items()}, explanation)
