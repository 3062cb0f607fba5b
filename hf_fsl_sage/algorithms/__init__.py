"""Algorithms by name. Each is a small :class:`Algorithm` over the shared parts in ``federation``."""

from __future__ import annotations

from .base import Algorithm, StepResult
from .fsl_sage import FSLSage

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FSLSage,)}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator adding an algorithm to :data:`ALGORITHMS` under ``cls.name``."""
    ALGORITHMS[cls.name] = cls
    return cls


__all__ = ["ALGORITHMS", "Algorithm", "FSLSage", "StepResult", "register"]
