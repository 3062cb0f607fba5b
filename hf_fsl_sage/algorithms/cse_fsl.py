"""CSE-FSL: clients train on a local auxiliary loss and upload smashed activations every Q steps."""

from __future__ import annotations

from ..federation.federation import Client, clip_and_step
from .base import Algorithm, StepResult


class CSEFSL(Algorithm):
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

    name = "cse_fsl"
    uses_aux = True
    trains_aux = True

    def begin_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        metrics = super().begin_round(round_index, participants)
        self.fed.broadcast_copies(participants, "aux", kind="aux_model")
        return metrics

    def uploads_at(self, round_index: int, local_step: int) -> bool:
        return local_step % self.args.server_update_interval == 0

    def client_compute(self, client: Client, batch, round_index: int, local_step: int):
        fed, args = self.fed, self.args
        smashed = fed.client_forward(client, batch)
        loss = client.aux_loss(smashed, batch["labels"], args.label_smoothing_factor)
        loss.backward()  # into the auxiliary model and, through the activations, the client half
        fed.client_step(client)
        clip_and_step(client.aux, client.aux_optimizer, args.max_grad_norm)
        return StepResult(loss=float(loss.detach())), (smashed, batch["labels"])

    def serve(self, client: Client, upload, round_index: int, local_step: int):
        return StepResult(server_loss=self.fed.server_step(*upload)), None

    def end_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        metrics = super().end_round(round_index, participants)
        self.fed.aggregate_copies(participants, "aux", kind="aux_model")
        return metrics
