"""Shared test set-up: quiet transformers, deterministic seeds, few threads."""

import pytest
import torch
import transformers


def pytest_configure(config: pytest.Config) -> None:
    transformers.logging.set_verbosity_error()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
