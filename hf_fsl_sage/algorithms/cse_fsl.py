"""CSE-FSL: clients train on a local auxiliary loss and upload smashed activations every Q steps."""

from __future__ import annotations

from typing import Any

from ..federation.federation import Client, Federation, Party, clip_and_step, trainable_state
from .auxiliary import AuxiliaryLossAlgorithm
from .base import StepResult
from .registry import register


@register("cse_fsl")
class CSEFSL(AuxiliaryLossAlgorithm):
    """Communication- and storage-efficient FSL: no gradients ever come back from the server.

    Each client trains its half and its auxiliary model jointly on the
    auxiliary model's loss (the auxiliary model has its own optimizer on the
    client's learning-rate schedule). Every ``server_update_interval`` local
    steps (from the first) it uploads its smashed activations and labels, and
    the server steps on them. After each round the client models and the
    auxiliary models are FedAvg'ed; the global auxiliary model goes down to the
    participants at the start of a round and theirs come up at its end
    (``aux_model`` messages).
    """

    display_name = "CSE-FSL (federated split learning with a client-side auxiliary loss)"

    def __init__(self, federation: Federation, **aux_settings: Any):
        super().__init__(federation, **aux_settings)
        # Each auxiliary model steps with its client's model, on the client's learning-rate schedule.
        self.aux_parties = {c: Party(aux.module, *federation.make_optimizer(aux.module, None))
                            for c, aux in self.aux.items()}
        #: The averaged auxiliary model, on the server's process; it starts as client 0's.
        self.global_aux: dict | None = None
        if federation.placement.is_server:
            self.global_aux = trainable_state(self.build_aux(0, federation.split.client.input_embeddings()).module)

    def parties(self) -> dict[str, Party]:
        return {f"aux_{c}": party for c, party in self.aux_parties.items()}

    def begin_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        metrics = super().begin_round(round_index, participants)
        self.fed.load_copies(participants, self.global_aux, lambda c: self.aux[c].module, "aux_model")
        return metrics

    def client_compute(self, client: Client, batch, round_index: int, local_step: int):
        smashed, loss = self.aux_forward(client, batch)
        loss.backward()  # into the auxiliary model and, through the activations, the client half
        self.fed.client_step(client)
        party = self.aux_parties[client.index]
        clip_and_step(party.module, party.optimizer, self.fed.max_grad_norm, self.fed.guard,
                      f"client {client.index}'s auxiliary model")
        return StepResult(loss=float(loss.detach())), (smashed, batch["labels"])

    def discard(self, client: Client) -> None:
        super().discard(client)
        if client.index in self.aux_parties:
            self.aux_parties[client.index].optimizer.zero_grad(set_to_none=True)

    def end_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        metrics = super().end_round(round_index, participants)
        averaged = self.fed.average_copies(participants, lambda c: self.aux[c].module, "aux_model", self.global_aux)
        if averaged is not None:
            self.global_aux = averaged
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "global_aux": self.global_aux}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.global_aux is not None:
            self.global_aux = state["global_aux"]

    def exported_states(self) -> dict[str, dict]:
        return {"aux/global": self.global_aux} if self.global_aux is not None else {}
