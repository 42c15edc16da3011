"""Figure helpers shared by the run report and the families' partition figures (matplotlib, no display)."""

from __future__ import annotations

COLORS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def shade_intervals(ax, x, y, intervals, train_intervals, label: str = "block {b}: [{lo:.3g}, {hi:.3g}]") -> None:
    """Shade each block's own slice under the curve (x, y), and hatch the overlap its training slice adds."""
    for b, ((lo, hi), (tlo, thi)) in enumerate(zip(intervals, train_intervals, strict=True)):
        c = COLORS[b % len(COLORS)]
        mask = (x >= lo) & (x <= hi)
        ax.fill_between(x[mask], y[mask], color=c, alpha=0.45, label=label.format(b=b, lo=lo, hi=hi))
        for a, z in ((tlo, lo), (hi, thi)):  # the overlap gamma adds on each side
            if z > a:
                m = (x >= a) & (x <= z)
                ax.fill_between(x[m], y[m], color=c, alpha=0.15, hatch="///", lw=0)
