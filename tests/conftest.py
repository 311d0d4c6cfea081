"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch

from .tiny_models import TINY_SIZE


@pytest.fixture(params=["crane", "crane+"])
def variant(request) -> str:
    return request.param


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(1))
