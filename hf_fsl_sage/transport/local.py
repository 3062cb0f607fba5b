"""Both parties in one process: the transport of a single-process run (and of the tests)."""

from __future__ import annotations

import torch

from .base import DOWN, UP, T, Transport, deliver, payload_nbytes


class LocalTransport(Transport):
    """Both parties in this process: delivery detaches (nothing autograd-related crosses) and moves devices."""

    def __init__(self, server_device: torch.device | None = None, client_device: torch.device | None = None):
        super().__init__()
        self.devices = {UP: server_device, DOWN: client_device}

    def _move(self, client_id: int, direction: str, kind: str, payload: T | None) -> T | None:
        self.ledger.record(direction, kind, payload_nbytes(payload))
        return deliver(payload, self.devices[direction])
