"""How a metric that cannot be computed is reported: `None` plus a `MetricUndefinedWarning` saying why."""

from __future__ import annotations

import warnings


class MetricUndefinedWarning(UserWarning):
    """A metric is undefined for the given data (for example only one class present) and is returned as None."""


def undefined_metric(name: str, reason: str) -> None:
    """Warn that metric `name` is undefined because of `reason` and return None (never NaN)."""
    warnings.warn(f"{name} is undefined and returned as None: {reason}.", MetricUndefinedWarning, stacklevel=3)
    return None
