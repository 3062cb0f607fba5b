"""FSL-SAGE: the algorithm (registered as ``"fsl_sage"``), its upload buffer and the alignment."""

from .algorithm import FSLSage


__all__ = ["FSLSage"]
