"""AUROC, average precision and F1-max computed exactly from `PositiveRanks` (ties handled as scikit-learn does).

With TP(t) and FP(t) the positives and negatives scoring >= t, P positives and N negatives:
- AUROC = (sum over positives of [#negatives below it + 0.5 #negatives equal to it]) / (P N), the Mann-Whitney form
  of the area under scikit-learn's trapezoidal ROC curve (ties between a positive and a negative count one half).
- AP = sum over distinct positive values t of (#positives equal to t / P) * TP(t) / (TP(t) + FP(t)), scikit-learn's
  step-wise `average_precision_score` (recall only changes at positive values).
- F1-max = max over distinct positive values t of 2 TP(t) / (TP(t) + FP(t) + P): the largest F1 over the points of
  scikit-learn's `precision_recall_curve`. Thresholds at purely negative values cannot win: compared with the next
  higher threshold they add false positives and no true positive.
"""

from __future__ import annotations

import numpy as np

from .score_pool import PositiveRanks

# Integer sums below this bound cannot overflow int64.
_INT64_SAFE = 1 << 62


def auroc(ranks: PositiveRanks) -> float:
    """Area under the ROC curve; requires at least one positive and one negative."""
    twice_wins = 2 * ranks.negatives_below + ranks.negatives_equal  # per distinct positive value, in half-wins
    denominator = 2 * ranks.num_positives * ranks.num_negatives
    if denominator < _INT64_SAFE:
        return int(np.dot(ranks.counts, twice_wins)) / denominator
    return float(np.dot(ranks.counts.astype(np.float64), twice_wins.astype(np.float64))) / denominator


def average_precision(ranks: PositiveRanks) -> float:
    """Average precision (area under the step-wise precision-recall curve, as scikit-learn)."""
    true_positives = ranks.positives_at_or_above
    precision = true_positives / (true_positives + ranks.negatives_at_or_above)
    return float(np.dot(ranks.counts, precision) / ranks.num_positives)


def f1_max(ranks: PositiveRanks) -> float:
    """The largest F1 score over all thresholds of the precision-recall curve."""
    true_positives = ranks.positives_at_or_above
    f1 = 2 * true_positives / (true_positives + ranks.negatives_at_or_above + ranks.num_positives)
    return float(f1.max())
