"""Shared pieces of the teaching views (lmlab.demo): the result object, figure/GIF writing, labels.

Figures are drawn on the Agg canvas directly (matplotlib.figure.Figure + FigureCanvasAgg), never
through pyplot, so that drawing a view neither needs a display nor changes the backend of a user's
interactive session.
"""

from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import check_output_path
from .files import atomic_write, atomic_write_file, atomic_write_text, make_parent_dir

PNG_DPI = 110
GIF_DPI = 70


@dataclass
class DemoResult:
    """What a view drew: the files it wrote, the numbers it showed, and the words that go with them."""

    view: str
    files: dict[str, Path] = field(default_factory=dict)  # role ("figure", "animation", ...) -> path
    numbers: dict[str, Any] = field(default_factory=dict)  # every number drawn or printed, for tests
    explanation: str = ""  # the short lesson printed beside the pictures
    table: str = ""  # plain-text table of the numbers, printed under the explanation

    def report(self) -> str:
        parts = [self.explanation.rstrip(), self.table.rstrip()]
        parts.append("\n".join(f"wrote {p}" for p in self.files.values()))
        return "\n\n".join(p for p in parts if p) + "\n"


class SettingValueError(ValueError):
    """A view's setting refused: "{name} {rest}". The command line names the flag instead of the
    keyword (`lmlab demo sampling --top-p 0`: "--top-p must be in (0, 1], got 0.0")."""

    def __init__(self, name: str, rest: str):
        self.name, self.rest = name, rest
        super().__init__(f"{name} {rest}")


def check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        within = f"in {minimum}..{maximum:,}" if maximum is not None else f">= {minimum}"
        raise SettingValueError(name, f"must be {within}, got {value}")
    return value


def check_float(name: str, value, *, positive: bool = False) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise SettingValueError(name, f"must be finite, got {out}")
    if positive and out <= 0:
        raise SettingValueError(name, f"must be > 0, got {out}")
    return out


def out_dir(path) -> Path:
    """The output directory, checked; it is made by the first file written into it (save_png,
    save_gif, write_text), so a view refused after this check leaves no empty directory."""
    if path is None:
        raise ValueError("out must be a directory path, got None")
    check_output_path("out", path, "the directory to write the images into")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"out must be a directory, but {p} is a file")
    return p


def new_figure(width: float, height: float):
    """A Figure bound to an Agg canvas (raises a clear ImportError when matplotlib is missing)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is a declared dependency
        raise ImportError("the lmlab demo views draw with matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path) -> Path:
    """fig as a PNG at path, written atomically (a kill leaves the previous file or none)."""
    atomic_write(make_parent_dir(path), lambda f: fig.savefig(f, format="png", dpi=PNG_DPI))
    return path


def save_gif(fig, update, frames: int, path: Path, fps: float = 3.0) -> Path:
    """Animate `update(frame)` over `frames` frames into an animated GIF with matplotlib's Pillow writer.

    The layout is solved once on the first frame and then frozen, and each frame is drawn once
    (FuncAnimation would draw twice and re-solve the constrained layout every frame: ~4x slower).
    """
    from matplotlib.animation import PillowWriter

    update(0)
    fig.canvas.draw()
    fig.set_layout_engine("none")
    writer = PillowWriter(fps=fps)

    def draw(tmp: str) -> None:
        with writer.saving(fig, tmp, GIF_DPI):
            for k in range(frames):
                update(k)
                writer.grab_frame()

    atomic_write_file(make_parent_dir(path), draw)  # the writer wants a file name ending .gif
    return path


_font_cmap: dict[int, int] | None = None


def _has_glyph(ch: str) -> bool:
    global _font_cmap
    if _font_cmap is None:
        from matplotlib import font_manager
        from matplotlib.ft2font import FT2Font

        font = FT2Font(font_manager.findfont(font_manager.FontProperties()))
        _font_cmap = font.get_charmap()
    return ord(ch) in _font_cmap


def token_label(text: str, *, for_plot: bool = True) -> str:
    """A token's text made visible: whitespace and control characters shown by a sign or escape.

    For plots, characters the default font cannot draw are written as \\uXXXX (matplotlib would
    otherwise warn about a missing glyph), and '$' is escaped so it is not read as mathtext.
    """
    signs = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\\r"}
    out = []
    for ch in text:
        if ch in signs:
            out.append(signs[ch])
        elif not ch.isprintable():
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        elif for_plot and ch == "$":
            out.append("\\$")
        elif for_plot and not _has_glyph(ch):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out) if out else "\u2205"


def quoted_label(text: str) -> str:
    """token_label(text) between quotes, for a plot's title or legend: repr() of the label would
    double the backslash of each escape token_label writes ('\\$' on the plot for a '$')."""
    return f"'{token_label(text)}'"


def use_colour(colour: bool | None) -> bool:
    """ANSI colours on a terminal unless NO_COLOR is set; `colour` True/False forces the choice."""
    if colour is not None:
        return bool(colour)
    import sys

    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def confidence_rgb(p: float) -> tuple[int, int, int]:
    """Red (p=0) through yellow (p=0.5) to green (p=1): the same map in the terminal and the plot."""
    p = min(max(float(p), 0.0), 1.0)
    if p < 0.5:
        return 220, int(40 + 360 * p), 40
    return int(220 - 400 * (p - 0.5)), 220, 40


def ansi_background(text: str, rgb: tuple[int, int, int]) -> str:
    r, g, b = rgb
    return f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{text}\x1b[0m"


def format_table(header: list[str], rows: list[list], *, indent: str = "  ") -> str:
    """Right-aligned plain-text table; floats shown with 4 significant digits."""

    def cell(v) -> str:
        if isinstance(v, float):
            if v == 0:
                return "0"
            if abs(v) >= 1e5 or abs(v) < 1e-3:
                return f"{v:.3e}"
            return f"{v:.4g}" if abs(v) >= 1 else f"{v:.4f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = [indent + "  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append(indent + "  ".join("-" * w for w in widths))
    lines += [indent + "  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def write_text(path: Path, text: str) -> Path:
    atomic_write_text(make_parent_dir(path), text)
    return path


def clip_text(text: str, width: int) -> str:
    """One visible line of at most `width` characters (textwrap.shorten drops a line with no spaces)."""
    shown = token_label(text)
    return shown if len(shown) <= width else shown[: width - 1] + "\u2026"
