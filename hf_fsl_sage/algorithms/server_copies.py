"""Each client's own copy of the server model (FedAvg keeps them on the clients, SplitFed-V1 on the server)."""

from __future__ import annotations

from typing import Any, ClassVar

from ..federation.federation import Client, Federation, Party, load_trainable_state, trainable_state
from .base import Algorithm


class WithServerCopies(Algorithm):
    """Base of the algorithms where each client trains its own copy of the server model.

    The global server model goes into the participants' copies at the start of a round; their FedAvg goes back
    into it at its end. With ``copies_kind`` the copies live on the clients and travel as ``copies_kind``
    messages; with ``None`` they live on the server, so loading and averaging them costs no traffic.
    """

    copies_kind: ClassVar[str | None] = None

    def __init__(self, federation: Federation):
        super().__init__(federation)
        if self.copies_kind is not None:
            holders = federation.held_clients
        else:
            holders = [c.index for c in federation.clients] if federation.placement.is_server else []
        #: Each client's copy of the server model, with its optimizer and loss, where this process holds it.
        self.server_copies: dict[int, Party] = {c: federation.copy_server() for c in holders}

    @classmethod
    def server_blocks_on_clients(cls, args: Any) -> int | None:
        return None if cls.copies_kind is not None else super().server_blocks_on_clients(args)

    def server_copy(self, client: Client) -> Party:
        return self.server_copies[client.index]

    def begin_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        metrics = super().begin_round(round_index, participants)
        fed = self.fed
        state = trainable_state(fed.server.module) if fed.placement.is_server else None
        fed.load_copies(participants, state, lambda c: self.server_copies[c].module, self.copies_kind)
        return metrics

    def end_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        metrics = super().end_round(round_index, participants)
        fed = self.fed
        template = trainable_state(fed.server.module) if fed.placement.is_server else None
        averaged = fed.average_copies(participants, lambda c: self.server_copies[c].module, self.copies_kind, template)
        if averaged is not None:
            load_trainable_state(fed.server.module, averaged)
        return metrics

    def discard(self, client: Client) -> None:
        super().discard(client)
        if client.index in self.server_copies:
            self.server_copies[client.index].optimizer.zero_grad(set_to_none=True)

    def parties(self) -> dict[str, Party]:
        return {**super().parties(), **{f"server_{c}": party for c, party in self.server_copies.items()}}

    def train(self, mode: bool = True) -> None:
        super().train(mode)
        for party in self.server_copies.values():
            party.module.train(mode)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(),
                "server_copies": {c: trainable_state(p.module) for c, p in self.server_copies.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for c, party in self.server_copies.items():
            load_trainable_state(party.module, state["server_copies"][c])
