"""The algorithm interface: a schedule over the shared parts of a federation (Flower-style strategy)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..federation import Client, Federation


class StepResult(dict):
    """What one local step reports: ``loss`` (client) and, when the server stepped, ``server_loss``."""


class Algorithm:
    """One federated split learning algorithm.

    The trainer calls, for every round: :meth:`begin_round` once, then
    :meth:`local_step` for each participant at each local step (participants
    in ascending order, which is also the order the server serves them), then
    :meth:`end_round`. Subclasses override only what differs.
    """

    name: ClassVar[str]
    uses_aux: ClassVar[bool] = False
    #: Each client trains its auxiliary model itself (own optimizer on the client's schedule); FedAvg'ed (CSE-FSL).
    trains_aux: ClassVar[bool] = False
    #: Each client has its own copy of the server model (SplitFed-V1 at the server, FedAvg on the client).
    server_copies: ClassVar[bool] = False

    def __init__(self, federation: Federation):
        self.fed = federation
        self.args = federation.args

    def begin_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        """Broadcast the global client model to the participants. Returns metrics to log (may be empty)."""
        self.fed.broadcast(participants)
        return {}

    def local_step(self, client: Client, batch: dict[str, torch.Tensor], round_index: int, local_step: int) -> StepResult:
        raise NotImplementedError

    def end_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        """FedAvg of the participants' client models into the global model."""
        self.fed.aggregate(participants)
        return {}
