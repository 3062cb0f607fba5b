"""Shared test set-up: quiet transformers, deterministic seeds, few threads."""

import pytest
import torch
import transformers


def pytest_configure(config: pytest.Config) -> None:
    transformers.logging.set_verbosity_error()
    # Tiny models: one thread avoids oversubscription, which slows them down 10x or more on 2 cores.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
