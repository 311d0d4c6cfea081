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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved tiny Crane+ folder, shared by the pipeline and CLI tests (never modified by them)."""
    from .tiny_models import save_tiny_model_folder

    return save_tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny-crane-plus", "crane+")
