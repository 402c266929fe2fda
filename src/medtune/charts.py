"""PNG charts for reports, with Chinese category names that render.

matplotlib's default font (DejaVu Sans) has no CJK glyphs: a label such as 医师考试 would be drawn as empty
boxes. We look for an installed CJK font (Noto Sans CJK from Debian's fonts-noto-cjk, WenQuanYi, Source Han Sans,
the Windows/macOS ones) and put it behind DejaVu Sans, so Latin text keeps its look and Chinese falls back to the
CJK font glyph by glyph. When none is installed, labels that would need it are drawn as numbers and the caller
gets a legend (number -> name) to print next to the chart as text, which the reader's browser can render.

Figures are built with `matplotlib.figure.Figure` directly (not pyplot): no global state, no GUI backend.
"""

from __future__ import annotations

import io
import math
import textwrap
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache

# Family names in order of preference: simplified-Chinese glyph forms first, since CMB is mainland Chinese.
PREFERRED_CJK_FONTS = ("Noto Sans CJK SC", "Source Han Sans SC", "Noto Sans SC", "WenQuanYi Zen Hei",
                       "WenQuanYi Micro Hei", "Microsoft YaHei", "SimHei", "PingFang SC", "Heiti SC",
                       "Droid Sans Fallback", "Noto Serif CJK SC", "AR PL UMing CN")
# Substrings of font file names worth registering when matplotlib's font cache predates their installation.
CJK_FILE_HINTS = ("cjk", "wqy", "sourcehan", "droidsansfallback", "simhei", "msyh", "pingfang", "notosanssc")

COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
CHANCE_COLOUR = "#555555"


@dataclass
class Chart:
    """One rendered chart; `legend` maps a number drawn on the chart to the name it stands for (only when the
    name could not be drawn for want of a CJK font)."""

    title: str
    png: bytes
    legend: list[tuple[str, str]] = field(default_factory=list)
    caption: str = ""  # what the page says under the chart beyond its drawn title (e.g. a full file name)


@dataclass
class Series:
    name: str
    x: list[float]
    y: list[float]
    style: str = "-"


@dataclass
class Panel:
    """One axes of a multi-panel line chart."""

    ylabel: str
    series: list[Series]
    xlabel: str = "step"
    ylim: tuple[float, float] | None = None


@cache
def cjk_font() -> str | None:
    """Family name of an installed font with Chinese glyphs, or None."""
    from matplotlib import font_manager

    def known() -> set[str]:
        return {f.name for f in font_manager.fontManager.ttflist}

    names = known()
    if not any(_is_cjk_name(n) for n in names):
        # matplotlib caches its font list on first use; fonts installed after that are only found by a rescan.
        for path in font_manager.findSystemFonts():
            if any(hint in path.lower().replace(" ", "") for hint in CJK_FILE_HINTS):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):  # unreadable or unsupported font file: skip it
                    continue
        names = known()
    for preferred in PREFERRED_CJK_FONTS:
        if preferred in names:
            return preferred
    return next((n for n in sorted(names) if _is_cjk_name(n)), None)


def _is_cjk_name(name: str) -> bool:
    return "CJK" in name or name in PREFERRED_CJK_FONTS


def drawable_labels(names: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(labels to draw, legend). Without a CJK font a name that needs one is drawn as its position (1, 2, ...)
    and listed in the legend, for the page to print next to the chart."""
    if cjk_font() is not None:
        return list(names), []
    labels = [name if name.isascii() else str(number) for number, name in enumerate(names, start=1)]
    return labels, [(label, name) for label, name in zip(labels, names) if label != name]


@contextmanager
def _figure(width: float, height: float) -> Iterator:
    import matplotlib
    from matplotlib.figure import Figure

    families = ["DejaVu Sans"] + ([cjk_font()] if cjk_font() else [])
    # an explicit family list, not "sans-serif": matplotlib falls back glyph by glyph only along such a list
    with matplotlib.rc_context({"font.family": families, "font.size": 9,
                                "axes.spines.top": False, "axes.spines.right": False,
                                "axes.grid": True, "axes.grid.axis": "y", "grid.alpha": 0.3, "axes.axisbelow": True}):
        figure = Figure(figsize=(width, height), layout="constrained")
        yield figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def grouped_bars(title: str, groups: Sequence[str], series: dict[str, Sequence[float | None]], ylabel: str,
                 chance: Sequence[float | None] | None = None, ylim: tuple[float, float] | None = None,
                 value_format: str = "{:.1f}") -> Chart:
    """Bars per group, one colour per series (model), values printed on the bars; `chance` draws a dashed line
    over each group at that group's chance level (None: no line for that group)."""
    labels, legend = drawable_labels(groups)
    # long names side by side would overlap: wrap Latin ones at spaces, slant the axis if still too wide
    labels = [textwrap.fill(label, 16) if label.isascii() else label for label in labels]
    slant = len(groups) > 4 or max((_columns(line) for label in labels for line in label.split("\n")),
                                   default=0) > 16
    count = max(len(series), 1)
    width = 0.8 / count
    with _figure(max(6.0, 2.0 + len(groups) * (0.35 + 0.25 * count)), 3.8) as figure:
        axis = figure.add_subplot()
        for index, (name, values) in enumerate(series.items()):
            xs = [g + (index - (count - 1) / 2) * width for g in range(len(groups))]
            heights = [v if _finite(v) else 0.0 for v in values]
            bars = axis.bar(xs, heights, width * 0.95, label=name, color=COLOURS[index % len(COLOURS)])
            texts = [value_format.format(v) if _finite(v) else "–" for v in values]
            axis.bar_label(bars, texts, fontsize=7, padding=1)
        _draw_chance(axis, chance, len(groups))
        axis.set_xticks(range(len(groups)), labels, rotation=25 if slant else 0, ha="right" if slant else "center",
                        rotation_mode="anchor")
        axis.set_ylabel(ylabel)
        if ylim:
            axis.set_ylim(*ylim)
        axis.set_title(title)
        axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        return Chart(title, _png(figure), legend)


def _columns(text: str) -> int:
    """Width in Latin-letter columns: a CJK character is about two wide."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _draw_chance(axis, chance: Sequence[float | None] | None, groups: int) -> None:
    if not chance:
        return
    if len({c for c in chance if _finite(c)}) == 1 and all(_finite(c) for c in chance):
        axis.axhline(chance[0], color=CHANCE_COLOUR, linestyle="--", linewidth=1,
                     label=f"chance {chance[0]:.1f}")
        return
    labelled = False
    for group, level in enumerate(chance):
        if _finite(level):
            axis.hlines(level, group - 0.45, group + 0.45, colors=CHANCE_COLOUR, linestyles="--", linewidth=1,
                        label=None if labelled else "chance")
            labelled = True


def line_panels(title: str, panels: Sequence[Panel], xticks: Sequence[str] | None = None) -> Chart:
    """Side-by-side line charts sharing a title (e.g. loss and learning rate of one training stage); `xticks`
    names the x positions 0, 1, ... (e.g. models) instead of numbering them."""
    from matplotlib.ticker import MaxNLocator

    labels, legend = drawable_labels(xticks) if xticks else ([], [])
    with _figure(4.2 * len(panels), 3.2) as figure:
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
        for axis, panel in zip(axes, panels):
            for index, series in enumerate(panel.series):
                axis.plot(series.x, series.y, series.style, label=series.name, color=COLOURS[index % len(COLOURS)],
                          marker="o" if len(series.x) <= 12 else None, markersize=3, linewidth=1.4)
            axis.set_xlabel(panel.xlabel)
            axis.set_ylabel(panel.ylabel)
            if panel.ylim:
                axis.set_ylim(*panel.ylim)
            if panel.ylabel == "learning rate":
                axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            if len(panel.series) > 1:
                axis.legend(fontsize=8, frameon=False)
            if labels:
                axis.set_xticks(range(len(labels)), labels)
                axis.set_xlim(-0.5, len(labels) - 0.5)
            else:  # steps: no "2.5"
                axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        figure.suptitle(title)
        return Chart(title, _png(figure), legend)


def histogram(title: str, values: Sequence[float], xlabel: str, bins: int = 30) -> Chart:
    """Distribution of `values` (e.g. token lengths), with the median marked."""
    import statistics

    (drawn,), legend = drawable_labels([title])
    with _figure(4.6, 2.8) as figure:
        axis = figure.add_subplot()
        axis.hist(values, bins=min(bins, max(len(set(values)), 1)), color=COLOURS[0], edgecolor="white")
        median = statistics.median(values)
        axis.axvline(median, color=COLOURS[3], linestyle="--", linewidth=1, label=f"median {median:g}")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("records")
        axis.legend(fontsize=8, frameon=False)
        axis.set_title(drawn, fontsize=9)
        return Chart(title, _png(figure), legend)
