"""FSL-SAGE: local steps on an auxiliary gradient estimate, periodically aligned to the server's gradient."""

from __future__ import annotations

import torch

from ..auxiliary import align
from ...federation.federation import Client, load_trainable_state, trainable_state
from ..base import Algorithm, StepResult


class FSLSage(Algorithm):
    """Clients step on the gradient of their auxiliary model's loss w.r.t. the smashed activations.

    Every ``server_update_interval`` local steps (from the first) a client
    uploads its activations and labels; the server steps on them and keeps them
    in the client's alignment buffer. In every ``align_interval``-th round,
    right after a client's first upload, the server aligns its copy of that
    client's auxiliary model on the buffer (gradient matching) and sends it
    down; the client loads it. The auxiliary model is never trained by the client itself.
    """

    name = "fsl_sage"
    uses_aux = True
    aligns_aux = True
    reply_kind = "aux_model"

    def __init__(self, federation):
        super().__init__(federation)
        self._cosines: list[tuple[float, float, int]] = []

    def begin_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        self._cosines = []
        return super().begin_round(round_index, participants)

    def uploads_at(self, round_index: int, local_step: int) -> bool:
        return local_step % self.args.server_update_interval == 0

    def replies_at(self, round_index: int, local_step: int) -> bool:
        return round_index % self.args.align_interval == 0 and local_step == 0

    def client_compute(self, client: Client, batch, round_index: int, local_step: int):
        fed, args = self.fed, self.args
        smashed = fed.client_forward(client, batch)
        hidden = smashed.hidden_states
        loss = client.aux_loss(smashed, batch["labels"], args.label_smoothing_factor)
        (estimate,) = torch.autograd.grad(loss, hidden, retain_graph=True)
        hidden.backward(estimate)
        fed.client_step(client)
        return StepResult(loss=float(loss.detach())), (smashed, batch["labels"])

    def serve(self, client: Client, upload, round_index: int, local_step: int):
        fed, args = self.fed, self.args
        smashed, labels = upload
        result = StepResult(server_loss=fed.server_step(smashed, labels))
        fed.remember(client, smashed, labels)
        if not self.replies_at(round_index, local_step):
            return result, None
        before, after = align(
            client.server_aux, client.server_aux_loss, fed.server_loss, fed.server.module, list(client.buffer),
            args.align_epochs, client.align_optimizer, args.label_smoothing_factor,
        )
        self._cosines.append((before, after, sum(s.hidden_states.shape[0] for s, _ in client.buffer)))
        return result, trainable_state(client.server_aux)

    def expected_reply(self, client: Client):
        return trainable_state(client.aux)

    def client_receive(self, client: Client, reply, round_index: int, local_step: int) -> StepResult:
        load_trainable_state(client.aux, reply)
        return StepResult()

    def end_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        metrics = super().end_round(round_index, participants)
        if self._cosines:
            total = sum(n for *_, n in self._cosines)
            metrics["align_grad_cosine_before"] = sum(b * n for b, _, n in self._cosines) / total
            metrics["align_grad_cosine_after"] = sum(a * n for _, a, n in self._cosines) / total
        return metrics
