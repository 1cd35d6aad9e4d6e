"""Figures of the diagnostics: the (p, H) plane, the gradient landscape, the weight distribution and
the Pareto plot. Each function takes plain numbers (from :mod:`eaft_pl.analysis.statistics` or
:mod:`eaft_pl.analysis.compare`) and returns a matplotlib ``Figure``.

Figures are built with ``matplotlib.figure.Figure`` directly, never through ``pyplot``: no GUI backend
is selected, nothing is kept in pyplot's global figure list (a training run draws one per
evaluation), and it is safe on headless machines and in worker threads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.figure import Figure

__all__ = ["PlanePanel", "plane_figure", "weights_figure", "pareto_figure", "pareto_front", "curves_figure", "hexbin_figure", "save_figure"]

#: One heatmap: title, ``(p_bins, h_bins)`` matrix (None = empty bin), colour-bar label, log colours.
PlanePanel = Tuple[str, Sequence[Sequence[Optional[float]]], str, bool]


def plane_figure(
    panels: Sequence[PlanePanel],
    p_edges: Sequence[float],
    h_edges: Sequence[float],
    *,
    title: str = "",
    conflict_box: Optional[Tuple[float, float]] = None,
    h_label: str = "top-K entropy H (nats)",
) -> Figure:
    """Heatmaps on the (label probability, entropy) plane, side by side (Fig. 1b, Fig. 3).

    Args:
        panels: ``(title, matrix, colour-bar label, log scale)`` per panel; ``matrix[i][j]`` is the
            value of probability bin i and entropy bin j. Log panels show log10 of the positive values.
        p_edges: Bin edges of label probability (x axis).
        h_edges: Bin edges of entropy (y axis).
        title: Figure title.
        conflict_box: ``(max label prob, max entropy in nats)``: outline the confident-conflict corner.
        h_label: Label of the entropy axis.
    """
    # No layout engine and no LogNorm: both dominate the drawing time (a constrained layout and log
    # colour-bar ticks cost about 3x the rest), and a training run draws one figure per evaluation.
    fig = Figure(figsize=(4.6 * len(panels), 4.0))
    fig.subplots_adjust(left=0.08 / len(panels) + 0.02, right=0.95, bottom=0.13, top=0.84, wspace=0.35)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, matrix, cbar_label, log) in zip(axes, panels):
        values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float).T  # (H, P)
        if log:
            # Empty bins stay blank (masked), so "no token" and "few tokens" differ visibly.
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.where(values > 0, np.log10(values), np.nan)
            cbar_label = f"log10 {cbar_label}"
        mesh = ax.pcolormesh(p_edges, h_edges, np.ma.masked_invalid(values), cmap="viridis")
        fig.colorbar(mesh, ax=ax, label=cbar_label)
        if conflict_box is not None:
            p_max, h_max = conflict_box
            ax.plot([0, p_max, p_max], [h_max, h_max, 0], color="red", linestyle="--", linewidth=1.2)
            ax.annotate("confident\nconflicts", (p_max, h_max), xytext=(4, 4), textcoords="offset points", color="red", fontsize=8)
        ax.set_xlabel("label probability p")
        ax.set_ylabel(h_label)
        ax.set_title(name, fontsize=10)
    if title:
        fig.suptitle(title)
    return fig


def weights_figure(summaries: Dict[str, Dict[str, Any]], title: str = "EAFT weight H / ln K") -> Figure:
    """Histograms of the weight distributions of :func:`eaft_pl.analysis.statistics.weight_summary`, one
    bar series per source, as shares of each source's tokens."""
    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    ax = fig.subplots()
    n = max(len(summaries), 1)
    for i, (name, s) in enumerate(summaries.items()):
        edges, counts = np.array(s["edges"]), np.array(s["counts"], dtype=float)
        width = (edges[1] - edges[0]) / n
        share = counts / max(counts.sum(), 1.0)
        ax.bar(edges[:-1] + i * width, share, width=width, align="edge", label=f"{name} (mean {s['mean']:.3f})")
    ax.set_xlabel("weight")
    ax.set_ylabel("share of tokens")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def pareto_figure(
    points: Sequence[Dict[str, Any]],
    *,
    base: Optional[Tuple[float, float]] = None,
    x_label: str = "general average",
    y_label: str = "domain average",
    title: str = "",
) -> Figure:
    """Domain score against general score, one point per method (Fig. 5), with error bars.

    Args:
        points: ``{"label", "x", "y", "xerr", "yerr"}`` each (errors may be 0).
        base: ``(x, y)`` of the base model, drawn as a star.
        x_label: Axis label of x.
        y_label: Axis label of y.
        title: Figure title.

    Points on the Pareto front (no other point is at least as good on both axes and better on one)
    are joined by a dashed line.
    """
    fig = Figure(figsize=(7.6, 4.6), layout="constrained")
    ax = fig.subplots()
    # Labels go in the legend: annotations of nearby points (several runs that all learned the domain
    # fully) would overprint each other.
    for i, pt in enumerate(points):
        ax.errorbar(
            # Beyond ten points the colours repeat: change the marker with them.
            pt["x"], pt["y"], xerr=pt.get("xerr") or 0, yerr=pt.get("yerr") or 0, fmt="osD^v"[(i // 10) % 5], color=f"C{i % 10}",
            capsize=3, label=pt["label"],
        )  # fmt: skip
    front = pareto_front([(pt["x"], pt["y"]) for pt in points])
    if len(front) > 1:
        xs, ys = zip(*sorted(front))
        ax.plot(xs, ys, linestyle="--", color="grey", linewidth=1, label="Pareto front")
    if base is not None:
        ax.plot(*base, marker="*", markersize=14, color="black", linestyle="none")
        ax.annotate("base", base, xytext=(6, -10), textcoords="offset points", fontsize=8)
    if points:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def pareto_front(xy: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The points no other point dominates (higher is better on both axes); NaNs are ignored."""
    finite = [(x, y) for x, y in xy if not (math.isnan(x) or math.isnan(y))]
    return [
        (x, y)
        for x, y in finite
        if not any(ox >= x and oy >= y and (ox > x or oy > y) for ox, oy in finite)
    ]


def curves_figure(
    panels: Sequence[Tuple[str, Dict[str, Sequence[Tuple[float, float, float]]]]], *, x_label: str = "optimizer step", title: str = ""
) -> Figure:
    """Small multiples of curves: one panel per ``(title, {label: [(x, mean, std), ...]})``, a line per
    label with a band of +-std (e.g. the conflict cohort's metrics per method, mean over seeds)."""
    cols = min(2, max(1, len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (panel_title, curves) in zip(axes, panels):
        for i, (label, points) in enumerate(curves.items()):
            xs, mean, std = (np.array(v, dtype=float) for v in zip(*points)) if points else ([], [], [])
            ax.plot(xs, mean, marker=".", color=f"C{i % 10}", linestyle="-" if i < 10 else "--", label=label)
            if len(xs):
                ax.fill_between(xs, mean - std, mean + std, color=f"C{i % 10}", alpha=0.15)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if panels:
        axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def hexbin_figure(
    panels: Sequence[Tuple[str, Sequence[float], Sequence[float]]],
    *,
    x_label: str,
    y_label: str,
    diagonal: bool = True,
    ceilings: Optional[Sequence[Optional[float]]] = None,
    ceiling_label: str = "",
    gridsize: int = 40,
    title: str = "",
) -> Figure:
    """Small multiples of point clouds too dense to scatter: one hexagon-binned panel per
    ``(title, xs, ys)`` (log10 counts, empty cells blank), on shared axes so panels compare by eye.

    Args:
        panels: ``(title, xs, ys)`` per panel, one point per ``(x, y)`` pair (e.g. one per token).
        x_label: Axis label of x.
        y_label: Axis label of y.
        diagonal: Draw ``y = x`` (where a panel would lie if y equalled x).
        ceilings: Per panel, a y value to mark with a dotted line (e.g. ``ln K``, the most a top-K
            entropy can reach), or None for none.
        ceiling_label: Legend label of the ceiling lines.
        gridsize: Hexagons across the x axis.
        title: Figure title.
    """
    cols = min(4, max(1, len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.6 * cols, 3.4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True)).ravel()
    arrays = [(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)) for _, xs, ys in panels]
    # One extent for every panel: hexagons of the same size, and sharex/sharey show the same range.
    top = max([float(max(a.max(), b.max())) for a, b in arrays if a.size] + [1e-9])
    extent = (0.0, top, 0.0, top)
    mesh = None
    if ceilings is not None and len(ceilings) != len(panels):
        raise ValueError(f"hexbin_figure: {len(ceilings)} ceilings for {len(panels)} panels; give one (or None) per panel")
    for i, (ax, (panel_title, _, _), (xs, ys)) in enumerate(zip(axes, panels, arrays)):
        if ceilings is not None and ceilings[i] is not None:
            ax.axhline(ceilings[i], color="black", linestyle=":", linewidth=1, label=ceiling_label or None)
        if xs.size:
            mesh = ax.hexbin(xs, ys, gridsize=gridsize, bins="log", mincnt=1, extent=extent, cmap="viridis")
        if diagonal:
            ax.plot([0, top], [0, top], color="red", linestyle="--", linewidth=1, label="y = x")
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    for ax in axes[::cols]:
        ax.set_ylabel(y_label)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if mesh is not None:
        fig.colorbar(mesh, ax=list(axes[: len(panels)]), label="tokens (log scale)")
    if (diagonal or ceiling_label) and panels:
        axes[0].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_figure(fig: Figure, path: Union[str, Path], dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
