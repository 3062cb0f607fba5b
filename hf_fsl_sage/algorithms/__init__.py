"""Algorithms by name. Each is a small :class:`Algorithm` over the shared parts in ``federation``."""

from __future__ import annotations

from .base import Algorithm, StepResult
from .cse_fsl import CSEFSL
from .fedavg import FedAvg
from .fsl_sage.algorithm import FSLSage
from .splitfed import SplitFedV1, SplitFedV2

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (FedAvg, SplitFedV1, SplitFedV2, CSEFSL, FSLSage)
}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator adding an algorithm to :data:`ALGORITHMS` under ``cls.name``."""
    ALGORITHMS[cls.name] = cls
    return cls


__all__ = ["ALGORITHMS", "Algorithm", "CSEFSL", "FSLSage", "FedAvg", "SplitFedV1", "SplitFedV2", "StepResult",
           "register"]
