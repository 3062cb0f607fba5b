"""FedAvg: every client trains the whole model locally; both halves are averaged after each round."""

from __future__ import annotations

import torch

from ..federation.federation import Client
from .base import StepResult
from .registry import register
from .server_copies import WithServerCopies


@register("fedavg")
class FedAvg(WithServerCopies):
    """Plain federated averaging in the split framework, as the no-split reference.

    Each client holds the client half and its own copy of the server half and
    trains both on the LM loss, so nothing crosses the wire during a round. At
    the start of a round the global halves go down to the participants
    (``client_model`` and ``server_model`` messages); at its end the
    participants send both halves up and they are averaged, weighted by data size.
    The two halves form one party: their gradients are clipped together.
    """

    display_name = "FedAvg"
    copies_kind = "server_model"
    sends_activations = False  # labels and activations never leave the client

    def uploads_at(self, round_index: int, local_step: int) -> bool:
        return False

    def client_compute(self, client: Client, batch, round_index: int, local_step: int):
        fed, server = self.fed, self.server_copy(client)
        smashed = fed.client_forward(client, batch)  # stays on the client: the graph runs through both halves
        loss = server.loss(smashed, batch["labels"], fed.label_smoothing)
        value = float(loss.detach())
        if not fed.guard.finite(value, "loss", f"client {client.index}"):
            return StepResult(loss=value, server_loss=value), None
        loss.backward()
        parties = (client.model, server)
        params = [p for party in parties for p in party.module.parameters() if p.grad is not None]
        norm = 0.0
        if params:
            limit = fed.max_grad_norm if fed.max_grad_norm and fed.max_grad_norm > 0 else float("inf")
            norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
        apply = fed.guard.finite(norm, "gradients", f"client {client.index}")
        for party in parties:
            if apply:
                party.optimizer.step()
            party.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=value, server_loss=value), None
