"""The round trip that keeps the labels on the client (``private_labels=True``).

With the labels private, an upload carries the cut-layer activations and nothing computed from the tokens it
predicts. The server's loss on it becomes a round trip, run once per upload while the server serves it:

1. the server runs its blocks and sends their output down (``server_hidden``);
2. the client runs its final norm and LM head on it with its labels (:meth:`Algorithm.client_loss`), steps its
   head, and sends the gradient w.r.t. that output back (``head_gradient``);
3. the server backpropagates it through its blocks (and, for the algorithms that reply with it, into the
   uploaded activations).

Both messages go through the activation codec at the upload's kept positions, like the reply of SplitFed. On
a process that holds both the server and the client the client's half runs inline; on a client's own process
:meth:`LabelExchange.answer` runs it at the same point of the protocol.
"""

from __future__ import annotations

from typing import Any

import torch

from ..federation.federation import Client, Party, clip_and_step
from ..splitting.split import Smashed
from ..transport.base import TensorSpec


FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class LabelExchange:
    """One algorithm's private-label round trips; it serves as the federation's ``remote_loss``."""

    def __init__(self, algorithm: Any):  # an Algorithm (whose module imports this one)
        self.algorithm, self.fed = algorithm, algorithm.fed
        self._kept: dict[int, tuple[Smashed, torch.Tensor]] = {}  # client side: the last upload's shape and labels
        self._serving: int | None = None  # server side: the client whose upload is being served
        self._done = False
        self._report: dict[int, dict] = {}  # client side: what the client's half computed
        self.fed.remote_loss = self.server_backward

    # ------------------------------------------------------------ client side
    def keep(self, client_index: int, upload: tuple[Smashed, torch.Tensor] | None):
        """The upload without its labels, which the client keeps for the round trip."""
        if upload is None:
            return None
        smashed, labels = upload
        self._kept[client_index] = (smashed.detach(), labels)
        return smashed, None

    def answer(self, client_index: int) -> None:
        """On a client's process that does not hold the server: the client's half of the round trip."""
        smashed = self._kept[client_index][0]
        shape = (*smashed.hidden_states.shape[:2], *self.fed.split.head_shape)
        down = self.fed.transport.to_client(client_index, "server_hidden", None, TensorSpec(shape, FLOATS))
        self.fed.transport.to_server(client_index, "head_gradient", self._client_half(client_index, down))

    def _client_half(self, client_index: int, hidden: torch.Tensor | None) -> torch.Tensor | None:
        smashed, labels = self._kept.pop(client_index)
        fed = self.fed
        if hidden is None or not fed.guard.finite(hidden, "server_hidden message", "the server"):
            return None
        top = Smashed(hidden.detach().requires_grad_(True), smashed.attention_mask, smashed.position_ids)
        with fed.timer("client_receive"):
            result, gradient = self.algorithm.client_loss(fed.clients[client_index], top, labels)
        self._report[client_index] = result
        return gradient

    def report(self, client_index: int) -> dict:
        """What the client's half of the last round trip of ``client_index`` computed on this process."""
        return self._report.pop(client_index, {})

    # ------------------------------------------------------------ server side
    def begin(self, client_index: int) -> None:
        self._serving, self._done = client_index, False

    def server_backward(self, party: Party, smashed: Smashed) -> bool:
        """``party``'s loss on the upload being served, backpropagated; returns whether gradients were applied."""
        fed, c = self.fed, self._serving
        if c is None or self._done:
            raise RuntimeError("with private_labels, serve computes the server's loss once per upload (one round "
                               "trip to the client); compute it through federation.server_step or backward_loss.")
        self._done = True
        output = party.module(smashed)
        sent = fed.transport.to_client(c, "server_hidden", output)
        gradient = self._client_half(c, sent) if fed.placement.holds_client(c) else None
        received = fed.transport.to_server(c, "head_gradient", gradient, TensorSpec(tuple(output.shape), FLOATS))
        if received is None or not fed.guard.finite(received, "head_gradient message", f"client {c}"):
            return False
        output.backward(received.to(output.dtype))
        return True

    def finish(self) -> None:
        """After the server served (or skipped) an upload: the round trip happens even if its loss was not asked
        for, so that the client is not left waiting (it then gets nothing and sends nothing)."""
        c, self._serving = self._serving, None
        if c is not None and not self._done:
            sent = self.fed.transport.to_client(c, "server_hidden", None)
            gradient = self._client_half(c, sent) if self.fed.placement.holds_client(c) else None
            self.fed.transport.to_server(c, "head_gradient", gradient)


def head_loss_and_gradient(algorithm: Any, client: Client, top: Smashed,
                           labels: torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """The client's loss on the server's output with its labels, its head stepped; the gradient w.r.t. the output
    (``None`` if the loss is not finite)."""
    fed = algorithm.fed
    loss = client.model.loss(top, labels, fed.label_smoothing)
    value = float(loss.detach())
    if not fed.guard.finite(value, "loss", f"client {client.index}"):
        return value, None
    loss.backward()
    head = client.model.module.head
    if any(p.grad is not None for p in head.parameters()):  # a trainable head steps now, clipped on its own
        clip_and_step(head, client.model.optimizer, fed.max_grad_norm, fed.guard, f"client {client.index}'s head")
    return value, top.hidden_states.grad
