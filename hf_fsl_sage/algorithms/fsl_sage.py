"""FSL-SAGE: local steps on an auxiliary gradient estimate, periodically aligned to the server's gradient."""

from __future__ import annotations

import torch

from ..auxiliary import align
from ..federation import Client
from .base import Algorithm, StepResult


class FSLSage(Algorithm):
    """Clients step on the gradient of their auxiliary model's loss w.r.t. the smashed activations.

    Every ``server_update_interval`` local steps (from the first) a client
    uploads its activations and labels; the server steps on them and keeps them
    in the client's alignment buffer. In every ``align_interval``-th round,
    right after a client's first upload, the server aligns that client's
    auxiliary model on the buffer (gradient matching) and sends it back. The
    auxiliary model is never trained by the client itself.
    """

    name = "fsl_sage"
    uses_aux = True

    def __init__(self, federation):
        super().__init__(federation)
        self._cosines: list[tuple[float, float, int]] = []

    def begin_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        self._cosines = []
        return super().begin_round(round_index, participants)

    def local_step(self, client: Client, batch, round_index: int, local_step: int) -> StepResult:
        fed, args = self.fed, self.args
        smashed = fed.client_forward(client, batch)
        hidden = smashed.hidden_states
        loss = client.aux_loss(smashed, batch["labels"], args.label_smoothing_factor)
        (estimate,) = torch.autograd.grad(loss, hidden, retain_graph=True)
        hidden.backward(estimate)
        fed.client_step(client)
        result = StepResult(loss=float(loss.detach()))
        if local_step % args.server_update_interval == 0:
            received, labels = fed.upload(client, smashed, batch["labels"])
            result["server_loss"] = fed.server_step(received, labels)
            fed.remember(client, received, labels)
            if round_index % args.align_interval == 0 and local_step == 0:
                self._align(client)
        return result

    def _align(self, client: Client) -> None:
        fed, args = self.fed, self.args
        before, after = align(
            client.aux, client.aux_loss, fed.server_loss, fed.server.module, list(client.buffer),
            args.align_epochs, client.aux_optimizer, args.label_smoothing_factor,
        )
        fed.transport.to_client(client.index, "aux_model", {n: p for n, p in client.aux.named_parameters()
                                                            if p.requires_grad})
        self._cosines.append((before, after, sum(s.hidden_states.shape[0] for s, _ in client.buffer)))

    def end_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        metrics = super().end_round(round_index, participants)
        if self._cosines:
            total = sum(n for *_, n in self._cosines)
            metrics["align_grad_cosine_before"] = sum(b * n for b, _, n in self._cosines) / total
            metrics["align_grad_cosine_after"] = sum(a * n for _, a, n in self._cosines) / total
        return metrics
