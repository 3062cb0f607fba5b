"""Algorithms by name. Each is a small :class:`Algorithm` over the shared parts in ``federation``, registered with
:func:`register` where it is defined; importing this package registers the built-in ones."""

from __future__ import annotations

from .base import Algorithm, StepResult
from .cse_fsl import CSEFSL
from .fedavg import FedAvg
from .fsl_sage import FSLSage
from .registry import ALGORITHMS, register
from .splitfed import SplitFedV1, SplitFedV2


__all__ = ["ALGORITHMS", "Algorithm", "CSEFSL", "FSLSage", "FedAvg", "SplitFedV1", "SplitFedV2", "StepResult",
           "register"]
