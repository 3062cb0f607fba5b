"""The algorithm interface: a schedule over the shared parts of a federation (Flower-style strategy).

A local step of one client has up to three parts, each run on the process
that holds its party (see :mod:`hf_fsl_sage.transport.placement`):

1. :meth:`Algorithm.client_compute` on the client: forward, maybe backward and
   step; returns what it reports and its upload;
2. if :meth:`Algorithm.uploads_at` the step, the upload goes to the server and
   :meth:`Algorithm.serve` runs there, returning what it reports and a reply;
3. if :meth:`Algorithm.replies_at` the step, the reply goes down and
   :meth:`Algorithm.client_receive` runs on the client.

With private labels (``split.private_labels``) the upload leaves without its labels and the server's loss in
:meth:`Algorithm.serve` is a round trip to the client (:mod:`~hf_fsl_sage.algorithms.private_labels`), whose
half is :meth:`Algorithm.client_loss`.

:meth:`Algorithm.local_step` drives them on every process, so a subclass
writes each half as if it were alone.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..federation.federation import Client, Federation, Party
from ..federation.guard import SimulatedClientFailure
from ..splitting.split import Smashed
from ..transport.base import TensorSpec
from ..transport.placement import party_seed
from .private_labels import LabelExchange, head_loss_and_gradient


FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INTEGERS = (torch.int64, torch.int32)


class StepResult(dict):
    """What one local step reports: ``loss`` (the client's training loss), ``server_loss`` when the server stepped."""


class Algorithm:
    """One federated split learning algorithm.

    The trainer calls, for every round: :meth:`begin_round` once, then
    :meth:`local_step` for each participant at each local step (participants
    in ascending order, which is also the order the server serves them), then
    :meth:`end_round`. All three run on every process. Subclasses override only what differs.
    """

    #: The name it is registered under (set by :func:`~hf_fsl_sage.algorithms.registry.register`).
    name: ClassVar[str]
    #: How the model card names it (default: its registered name).
    display_name: ClassVar[str | None] = None
    #: Message kinds of the per-step upload and reply.
    upload_kind: ClassVar[str] = "smashed"
    reply_kind: ClassVar[str | None] = None
    #: Whether activations cross the wire during a round (False: private labels and defences do not apply).
    sends_activations: ClassVar[bool] = True
    #: The ``FSLSageConfig`` fields it reads that not every algorithm reads (see
    #: :func:`~hf_fsl_sage.algorithms.registry.fields_read_by`).
    own_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, federation: Federation):
        self.fed = federation
        #: The round trips of the server's loss when the labels stay on the client (else None).
        self.labels = LabelExchange(self) if federation.private_labels else None

    @classmethod
    def from_config(cls, args: Any, federation: Federation) -> Algorithm:
        """Build the algorithm on ``federation`` with the settings it reads from ``args`` (an ``FSLSageConfig``).

        Subclasses with settings override this and pass each one as a keyword argument to their constructor.
        """
        return cls(federation)

    @classmethod
    def server_blocks_on_clients(cls, args: Any) -> int | None:
        """How many blocks after the cut a process that holds clients (and not the server) needs; None: all.

        The rest of the server half, and an LM head not tied to the input embedding, stay on the ``meta``
        device there (:mod:`hf_fsl_sage.splitting.materialise`). Subclasses whose clients copy server weights
        say so here.
        """
        return 0

    # ------------------------------------------------------------ what the trainer reads
    def parties(self) -> dict[str, Party]:
        """The parties, besides the federation's, whose optimizers and schedules this process steps and saves."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """This process's share of the algorithm's own state, for checkpoints (optimizers go with :meth:`parties`)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def exported_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Trainable states saved beside the final model, by relative path without extension (``"aux/global"``)."""
        return {}

    def log_sums(self) -> dict[str, tuple[float, int]]:
        """Metrics to log as means: ``{name: (sum, count)}`` accumulated on this process since the last call.

        The trainer adds them up over processes, so every process logs the same mean.
        """
        return {}

    def model_card_rows(self) -> list[tuple[str, Any]]:
        """The algorithm's own settings, as ``(parameter, value)`` rows of the model card's training table."""
        return []

    def train(self, mode: bool = True) -> None:
        """Set the training mode of every model of the run; subclasses add the models they hold."""
        self.fed.train(mode)

    # ------------------------------------------------------------ rounds
    def begin_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        """Broadcast the global client model to the participants. Returns metrics to log (may be empty)."""
        self.fed.broadcast(participants)
        return {}

    def end_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        """FedAvg of the participants' client models into the global model."""
        self.fed.aggregate(participants)
        return {}

    # ------------------------------------------------------------ one local step, in halves
    def uploads_at(self, round_index: int, local_step: int) -> bool:
        """Whether the client uploads at this local step (every process must answer the same)."""
        return True

    def replies_at(self, round_index: int, local_step: int) -> bool:
        """Whether the server replies at this local step (only on steps with an upload)."""
        return False

    def client_compute(self, client: Client, batch: dict[str, torch.Tensor], round_index: int,
                       local_step: int) -> tuple[StepResult, Any]:
        """The client's part; returns what it reports and its upload (ignored unless :meth:`uploads_at`)."""
        raise NotImplementedError

    def serve(self, client: Client, upload: Any, round_index: int, local_step: int) -> tuple[StepResult, Any]:
        """The server's part, on a received upload; returns what it reports and its reply."""
        raise NotImplementedError

    def client_receive(self, client: Client, reply: Any, round_index: int, local_step: int) -> StepResult:
        """The client's part after the server's reply."""
        raise NotImplementedError

    def client_loss(self, client: Client, top: Smashed, labels: torch.Tensor) -> tuple[StepResult, Any]:
        """With private labels, the client's half of the server's loss: its final norm and LM head on the server's
        output ``top`` (whose hidden states require grad) with its labels; steps a trainable head. Returns what it
        reports (the loss, as ``server_loss``) and the gradient w.r.t. ``top.hidden_states`` (``None``: skip)."""
        value, gradient = head_loss_and_gradient(self, client, top, labels)
        return StepResult(server_loss=value), gradient

    def expected_upload(self, client: Client) -> tuple[Any, dict[str, int]]:
        """What an upload must look like on the server (see :func:`~hf_fsl_sage.transport.base.conforms`), with
        the limits of its named sizes: smashed activations of the model's width, the inputs the family's server
        blocks read besides (``SplitCausalLM.carried_shapes``) and their labels, at
        most one batch of sequences."""
        seq, split = ("batch", "seq"), self.fed.split
        carried = {name: TensorSpec((*seq, *shape), FLOATS if dtype.is_floating_point else INTEGERS)
                   for name, (shape, dtype) in split.carried_shapes.items()}
        smashed = Smashed(TensorSpec((*seq, *split.cut_shape), FLOATS),
                          TensorSpec(seq, (torch.bool,), optional=True),
                          TensorSpec((None, "seq"), INTEGERS, optional=True), carried)
        labels = None if split.private_labels else TensorSpec(seq, INTEGERS)
        return (smashed, labels), {"batch": self.fed.batch_size}

    def expected_reply(self, client: Client) -> Any:
        """What a reply must look like on the client (``None``: not checked)."""
        return None

    def discard(self, client: Client) -> None:
        """Forget what the client's part of this step left behind (its step was dropped or skipped)."""
        if client.model is not None:
            client.model.optimizer.zero_grad(set_to_none=True)

    def local_step(self, client_index: int, batch: dict[str, torch.Tensor] | None, round_index: int,
                   local_step: int) -> StepResult:
        """Run this process's share of one local step of client ``client_index``; returns what it computed.

        A client dropped from the round (it failed, see :class:`~hf_fsl_sage.federation.guard.Guard`) uploads
        nothing (an empty message) and gets no reply; an upload or reply that is not finite is not used.
        """
        fed, seed, guard = self.fed, self.fed.seed, self.fed.guard
        client, holds = fed.clients[client_index], fed.placement.holds_client(client_index)
        result, upload = StepResult(), None
        if holds and client_index not in guard.dropped:
            torch.manual_seed(party_seed(seed, round_index, local_step, client_index, "client"))
            try:
                if fed.fails_at(round_index, local_step, client_index):
                    raise SimulatedClientFailure(f"simulated failure (rate {fed.failure_rate})")
                with fed.timer("client_backward_step"):  # what client_forward and aux_forward leave of it
                    reported, upload = self.client_compute(client, batch, round_index, local_step)
                result.update(reported)
            except Exception as error:  # noqa: BLE001 -- any failure of a client's own step; Guard decides
                guard.drop(client_index, error)
                self.discard(client)
                upload = None
        if not self.uploads_at(round_index, local_step):
            return result
        expected, limits = self.expected_upload(client) if fed.placement.is_server else (None, None)
        sent = upload if client_index not in guard.dropped else None
        if self.labels is not None and holds:
            sent = self.labels.keep(client_index, sent)  # the labels stay here
        received = fed.transport.to_server(client_index, self.upload_kind, sent, expected, limits)
        reply = None
        if fed.placement.is_server:
            if received is None:  # the client failed: it is out of the rest of the round
                guard.dropped.add(client_index)
            else:
                if self.labels is not None:
                    self.labels.begin(client_index)
                if guard.finite(received, f"{self.upload_kind} message", f"client {client_index}"):
                    torch.manual_seed(party_seed(seed, round_index, local_step, client_index, "server"))
                    with fed.timer("server_step"):
                        reported, reply = self.serve(client, received, round_index, local_step)
                    result.update(reported)
                if self.labels is not None:
                    self.labels.finish()
        elif self.labels is not None and holds and sent is not None:
            self.labels.answer(client_index)  # the client's half of the server's loss
        if self.labels is not None and holds:
            result.update(self.labels.report(client_index))
        if self.replies_at(round_index, local_step):
            waiting = holds and client_index not in guard.dropped
            expected = self.expected_reply(client) if waiting else None
            received_reply = fed.transport.to_client(client_index, self.reply_kind, reply, expected)
            if waiting:
                if received_reply is not None and guard.finite(received_reply, f"{self.reply_kind} message",
                                                               "the server"):
                    with fed.timer("client_receive"):
                        result.update(self.client_receive(client, received_reply, round_index, local_step))
                else:
                    self.discard(client)
        return result
