"""Charts of a run for the HTML report, drawn with matplotlib as SVG: the score histogram with the decision threshold,
and per class the image-level ROC and precision-recall curves with the F1-max operating point.

The curves are scikit-learn's `roc_curve` and `precision_recall_curve`; the F1-max point is the point of the
precision-recall curve with the largest F1 = 2 P R / (P + R), the definition of the "Image F1-max" of
`crane_hf.metrics` (`ranking_metrics.f1_max`), so the point drawn is the number in the metric table.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .decision_figure import ANOMALOUS_COLOR, NORMAL_COLOR

THRESHOLD_COLOR = "#1565c0"


@dataclass(frozen=True)
class OperatingPoint:
    """The F1-max point of a precision-recall curve: score threshold (images scoring >= it are flagged), precision,
    recall (= true-positive rate), false-positive rate and F1, all in [0, 1]."""

    threshold: float
    precision: float
    recall: float
    false_positive_rate: float
    f1: float


def svg_data_uri(figure: Figure) -> str:
    """The figure as an SVG data URI (text kept as text), for an `<img src=...>` that needs no other file.

    An `<img>` keeps the SVG's internal ids apart from the page's and from the other charts'. The same figure gives
    the same bytes (fixed ids, no date): a report does not depend on when or by how many processes it was made."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "crane-hf"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def score_histogram(groups: Mapping[str, Sequence[float]], threshold: float, title: str) -> Figure:
    """Stacked histogram of image scores in [0, 1] (40 bins), one colour per group (e.g. "OK" / "ANOMALOUS" or
    "normal" / "anomalous"), with the image threshold as a vertical line."""
    figure = Figure(figsize=(7.0, 2.6), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    colors = [NORMAL_COLOR, ANOMALOUS_COLOR, "#757575", "#6a1b9a"]
    names = [name for name in groups if len(groups[name])]
    if names:
        axes.hist(
            [np.asarray(groups[name], dtype=np.float64) for name in names],
            bins=np.linspace(0.0, 1.0, 41),
            stacked=True,
            color=colors[: len(names)],
            label=[f"{name} ({len(groups[name])})" for name in names],
        )
    axes.axvline(threshold, color=THRESHOLD_COLOR, linewidth=2.0, label=f"image threshold {threshold:.3f}")
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("image anomaly score")
    axes.set_ylabel("images")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, loc="upper right")
    return figure


def f1_max_point(labels: Sequence[int], scores: Sequence[float]) -> OperatingPoint:
    """The F1-max operating point of binary `labels` (1 = anomalous) and `scores`; needs both classes present.

    Raises `ValueError` when only one class is present (the curves are then undefined)."""
    from sklearn.metrics import precision_recall_curve

    labels_array = np.asarray(labels).astype(bool)
    scores_array = np.asarray(scores, dtype=np.float64)
    if labels_array.all() or not labels_array.any():
        raise ValueError("only one class is present; ROC and precision-recall curves are undefined.")
    precision, recall, thresholds = precision_recall_curve(labels_array, scores_array)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f1))
    threshold = float(thresholds[best])
    false_positive_rate = float((scores_array[~labels_array] >= threshold).mean())
    return OperatingPoint(threshold, float(precision[best]), float(recall[best]), false_positive_rate, float(f1[best]))


def roc_pr_curves(labels: Sequence[int], scores: Sequence[float], title: str) -> tuple[Figure, OperatingPoint]:
    """ROC and precision-recall curves side by side, with the F1-max point marked on both; raises `ValueError` when
    only one class is present."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    point = f1_max_point(labels, scores)
    labels_array = np.asarray(labels).astype(bool)
    false_positive_rate, true_positive_rate, _ = roc_curve(labels_array, scores)
    precision, recall, _ = precision_recall_curve(labels_array, scores)
    figure = Figure(figsize=(7.0, 3.0), dpi=100, layout="constrained")
    roc_axes, pr_axes = figure.subplots(1, 2)
    roc_axes.plot(false_positive_rate, true_positive_rate, color="#37474f", linewidth=1.5)
    roc_axes.plot([0, 1], [0, 1], color="#bdbdbd", linewidth=0.8, linestyle="--")
    roc_axes.set_xlabel("false-positive rate")
    roc_axes.set_ylabel("true-positive rate")
    roc_axes.set_title("ROC", fontsize=10)
    pr_axes.step(recall, precision, where="post", color="#37474f", linewidth=1.5)
    pr_axes.set_xlabel("recall")
    pr_axes.set_ylabel("precision")
    pr_axes.set_title("precision-recall", fontsize=10)
    label = f"F1-max {point.f1:.3f} at score >= {point.threshold:.3f}"
    roc_axes.plot([point.false_positive_rate], [point.recall], "o", color=ANOMALOUS_COLOR, label=label)
    pr_axes.plot([point.recall], [point.precision], "o", color=ANOMALOUS_COLOR, label=label)
    for axes in (roc_axes, pr_axes):
        axes.set_xlim(-0.02, 1.02)
        axes.set_ylim(-0.02, 1.02)
        axes.legend(fontsize=7, loc="lower right" if axes is roc_axes else "lower left")
    figure.suptitle(title, fontsize=11, parse_math=False)  # a class (folder) name is text, "$...$" included
    return figure, point
