"""PNG plots for the HTML compare report, rendered with matplotlib's Agg canvas (no pyplot, no window).

matplotlib is optional (``pip install qcast[report]``): :func:`load` returns ``None`` when it is missing, and the
report then says so in the page and warns once.
"""
from __future__ import annotations

import base64
import io
import math
import warnings
from typing import Sequence

NOTICE = "Plots need matplotlib: pip install qcast[report]"
_warned = False

INT8_COLOR, FLOAT_COLOR = "#1f77b4", "#ff7f0e"


def load():
    """matplotlib's ``Figure`` class, or ``None`` (with a one-time warning) when matplotlib is not installed."""
    global _warned
    try:
        from matplotlib.figure import Figure  # Figure.savefig uses the Agg canvas: no pyplot, no GUI backend
    except ImportError:
        if not _warned:
            _warned = True
            warnings.warn(f"qcast report: {NOTICE} (the HTML report has tables only)", RuntimeWarning, stacklevel=3)
        return None
    return Figure


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(values: Sequence[float | None]) -> tuple[list[float], float]:
    """Values with +inf (identical outputs) drawn at a cap above the largest finite one, -inf/None at 0."""
    fin = [v for v in values if v is not None and math.isfinite(v)]
    cap = (max(fin) if fin else 0.0) + 10.0
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)) or v == -math.inf:
            out.append(0.0)
        elif v == math.inf:
            out.append(cap)
        else:
            out.append(v)
    return out, cap


def sqnr_chart(Figure, layers) -> str:
    """Bar chart of accumulated and isolated SQNR per layer, in graph order, coloured by precision."""
    n = len(layers)
    fig = Figure(figsize=(max(6.0, min(0.35 * n + 2, 40.0)), 4.5))
    ax = fig.add_subplot()
    acc, cap = _finite([r.sqnr for r in layers])
    iso, _ = _finite([r.sqnr_isolated for r in layers])
    colors = [INT8_COLOR if r.precision == "int8" else FLOAT_COLOR for r in layers]
    x = list(range(n))
    w = 0.4
    ax.bar([i - w / 2 for i in x], acc, w, color=colors, edgecolor="black", linewidth=0.3)
    has_iso = [r.sqnr_isolated is not None for r in layers]
    ax.bar([i + w / 2 for i in x if has_iso[i]], [iso[i] for i in x if has_iso[i]], w,
           color=[colors[i] for i in x if has_iso[i]], alpha=0.45, hatch="//", edgecolor="black", linewidth=0.3)
    if any(r.sqnr == math.inf or r.sqnr_isolated == math.inf for r in layers):
        ax.axhline(cap, color="grey", linestyle=":", linewidth=0.8)
        ax.text(n - 0.5, cap, " inf (identical)", va="bottom", ha="right", fontsize=7, color="grey")
    ax.set_xticks(x)
    ax.set_xticklabels([r.name for r in layers], rotation=70, ha="right", fontsize=7)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylabel("SQNR vs float (dB)")
    ax.set_title("Per-layer SQNR, graph order (solid: accumulated, hatched: isolated)")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=INT8_COLOR, label="int8"), Patch(color=FLOAT_COLOR, label="float"),
                       Patch(facecolor="white", edgecolor="black", label="accumulated"),
                       Patch(facecolor="white", edgecolor="black", hatch="//", label="isolated")],
              fontsize=7, loc="best")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def histogram(Figure, layer, values, fmin: float, fmax: float) -> str:
    """Histogram of a layer's float activations (a bounded sample) with the int8 clipping range as lines."""
    import numpy as np

    fig = Figure(figsize=(6.0, 3.2))
    ax = fig.add_subplot()
    lo, hi = layer.range
    left, right = min(fmin, lo), max(fmax, hi)
    pad = 0.02 * (right - left or 1.0)
    ax.hist(np.asarray(values, dtype=np.float64), bins=100, range=(left - pad, right + pad), color="#7f7f7f")
    ax.set_yscale("log")
    for v, label in ((lo, "clip min"), (hi, "clip max")):
        ax.axvline(v, color="#d62728", linestyle="--", linewidth=1.2)
        ax.text(v, 1.0, f" {label} {v:.4g}", transform=ax.get_xaxis_transform(), va="top", fontsize=7,
                color="#d62728", rotation=90)
    sat = "n/a" if layer.saturation is None else f"{100 * layer.saturation:.2f}%"
    ax.set_title(f"{layer.name} ({layer.op}): saturated {sat}, SQNR {layer.sqnr:.1f} dB", fontsize=9)
    ax.set_xlabel(f"float activation ({len(values)} sampled values; float min {fmin:.4g}, max {fmax:.4g})", fontsize=8)
    ax.set_ylabel("count (log)")
    return _png(fig)
