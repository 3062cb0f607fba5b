"""SplitFed: clients step on the server's true gradient w.r.t. their smashed activations, every step."""

from __future__ import annotations

from ..federation.federation import Client, Party, clip_and_step
from ..splitting.split import Smashed
from .base import Algorithm, StepResult
from .registry import register
from .server_copies import WithServerCopies


@register("splitfed_v2")
class SplitFedV2(Algorithm):
    """SplitFed-V2: one server model serves the participants in turn; client models are FedAvg'ed.

    At every local step a client uploads its smashed activations and labels,
    the server computes the loss, steps, and sends back the gradient w.r.t. the
    activations (and w.r.t. the carried activations of families that have them),
    which the client backpropagates through its half before it steps.
    With private labels the loss is a round trip to the client (its head and labels) before the server steps.
    """

    display_name = "SplitFed-V2"
    reply_kind = "gradient"

    def __init__(self, federation):
        super().__init__(federation)
        self._waiting: dict[int, Smashed] = {}  # each client's activations, until the gradient comes back

    def server_copy(self, client: Client) -> Party:
        """The server model that serves ``client``, with its optimizer and loss."""
        return self.fed.server

    def replies_at(self, round_index: int, local_step: int) -> bool:
        return True

    def client_compute(self, client: Client, batch, round_index: int, local_step: int):
        smashed = self.fed.client_forward(client, batch)
        self._waiting[client.index] = smashed
        return StepResult(), (smashed, batch["labels"])

    def serve(self, client: Client, upload, round_index: int, local_step: int):
        received, labels = upload
        party = self.server_copy(client)
        leaves = received.leaves()
        applied, value = self.fed.backward_loss(party, leaves, labels)
        result = StepResult() if value is None else StepResult(loss=value, server_loss=value)
        if not applied:
            return result, None  # no gradient: the client skips this step
        clip_and_step(party.module, party.optimizer, self.fed.max_grad_norm, self.fed.guard, "the server")
        return result, leaves.gradients()

    def client_loss(self, client: Client, top, labels):
        result, gradient = super().client_loss(client, top, labels)
        return StepResult(loss=result["server_loss"], **result), gradient  # the client's loss is the server's

    def expected_reply(self, client: Client):
        sent = self._waiting[client.index]  # each gradient has its activations' shape and dtype
        return sent.hidden_states if len(sent.activations()) == 1 else sent.activations()

    def discard(self, client: Client) -> None:
        self._waiting.pop(client.index, None)
        super().discard(client)

    def client_receive(self, client: Client, reply, round_index: int, local_step: int) -> StepResult:
        self._waiting.pop(client.index).backward(reply)
        self.fed.client_step(client)
        return StepResult()


@register("splitfed_v1")
class SplitFedV1(WithServerCopies, SplitFedV2):
    """SplitFed-V1: the server keeps one copy of its model per client, FedAvg'ed with the client models.

    The copies live on the server, so loading and averaging them costs no traffic.
    """

    display_name = "SplitFed-V1"
    copies_kind = None
