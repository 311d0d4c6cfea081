"""Interrupting a run at a chosen moment: the Nth call of a function raises (a Ctrl-C, or a kill simulated in
process), so tests can check what an interrupted run leaves and what --resume makes of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def raise_on_call(
    monkeypatch: pytest.MonkeyPatch,
    owner: Any,
    name: str,
    number: int,
    error: type[BaseException] = KeyboardInterrupt,
    counts: Callable[..., bool] = lambda *args, **kwargs: True,
) -> Callable[..., Any]:
    """Replace `owner.name` so that its `number`-th counted call raises `error`; calls for which
    `counts(*args, **kwargs)` is False are passed through uncounted. Returns the real function."""
    real = getattr(owner, name)
    calls = []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        if counts(*args, **kwargs):
            calls.append(1)
            if len(calls) == number:
                raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    return real
