"""Federated split learning on Flower: the same algorithms and trainer, with Flower's apps as the processes.

Needs the ``flower`` extra: ``pip install "hf_fsl_sage[flower]"``.
"""

try:
    import flwr  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError('hf_fsl_sage.flower needs Flower: pip install "hf_fsl_sage[flower]"') from error

from .apps import FlowerApps, flower_apps, wait_for_nodes
from .transport import FlowerNodeTransport, FlowerServerTransport


__all__ = ["FlowerApps", "FlowerNodeTransport", "FlowerServerTransport", "flower_apps", "wait_for_nodes"]
