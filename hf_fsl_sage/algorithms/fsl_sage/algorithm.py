"""FSL-SAGE: local steps on an auxiliary gradient estimate, periodically aligned to the server's gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...federation.federation import Client, Federation, load_trainable_state, trainable_state
from ..auxiliary import AuxiliaryLossAlgorithm, AuxModel
from ..base import StepResult
from ..registry import register
from .alignment import align
from .buffer import UploadBuffer


@dataclass
class ServerAux:
    """What the server keeps for one client: its copy of the client's auxiliary model, which it aligns and sends
    down, the alignment optimizer and the client's recent uploads."""

    aux: AuxModel
    optimizer: torch.optim.Optimizer
    buffer: UploadBuffer


@register("fsl_sage")
class FSLSage(AuxiliaryLossAlgorithm):
    """Clients step on the gradient of their auxiliary model's loss w.r.t. the smashed activations.

    Every ``server_update_interval`` local steps (from the first) a client
    uploads its activations and labels; the server steps on them and keeps them
    in the client's alignment buffer. In every ``align_interval``-th round,
    right after a client's first upload, the server aligns its copy of that
    client's auxiliary model on the buffer (gradient matching) and sends it
    down; the client loads it. The auxiliary model is never trained by the client itself.
    """

    display_name = "FSL-SAGE (federated split learning with smashed-activation gradient estimation)"
    reply_kind = "aux_model"

    def __init__(self, federation: Federation, *, align_interval: int = 10, align_buffer_size: int = 64,
                 align_epochs: int = 40, align_learning_rate: float = 2e-4, **aux_settings: Any):
        super().__init__(federation, **aux_settings)
        self.align_interval, self.align_buffer_size = align_interval, align_buffer_size
        self.align_epochs, self.align_learning_rate = align_epochs, align_learning_rate
        self.server_aux: dict[int, ServerAux] = {}
        if federation.placement.is_server:
            for c in federation.clients:  # its head reads the embedding of the global client model the server holds
                aux = self.build_aux(c.index, federation.split.client.input_embeddings())
                optimizer = federation.make_optimizer(aux.module, align_learning_rate)[0]
                self.server_aux[c.index] = ServerAux(aux, optimizer, UploadBuffer(align_buffer_size))
        self._cosines: list[tuple[float, float, int]] = []

    @classmethod
    def from_config(cls, args: Any, federation: Federation) -> FSLSage:
        return cls(federation, align_interval=args.align_interval, align_buffer_size=args.align_buffer_size,
                   align_epochs=args.align_epochs, align_learning_rate=args.align_learning_rate or args.learning_rate,
                   **cls.aux_settings(args))

    def begin_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        self._cosines = []
        return super().begin_round(round_index, participants)

    def replies_at(self, round_index: int, local_step: int) -> bool:
        return round_index % self.align_interval == 0 and local_step == 0

    def client_compute(self, client: Client, batch, round_index: int, local_step: int):
        smashed, loss = self.aux_forward(client, batch)
        activations = smashed.activations()  # the hidden states (and any carried activations)
        estimates = torch.autograd.grad(loss, list(activations.values()), retain_graph=True, allow_unused=True)
        smashed.backward(dict(zip(activations, estimates)))  # through the client only: the aux model is not trained
        self.fed.client_step(client)
        return StepResult(loss=float(loss.detach())), (smashed, batch["labels"])

    def serve(self, client: Client, upload, round_index: int, local_step: int):
        fed, held = self.fed, self.server_aux[client.index]
        smashed, labels = upload
        self.measure_heldout(client, smashed, labels)  # before the server steps and the upload is buffered
        result = StepResult(server_loss=fed.server_step(smashed, labels))
        held.buffer.push(smashed, labels)
        if not self.replies_at(round_index, local_step):
            return result, None
        with fed.timer("align"):
            before, after = align(held.aux.module, held.aux.loss, fed.server_loss, fed.server.module,
                                  list(held.buffer), self.align_epochs, held.optimizer, fed.label_smoothing)
        self._cosines.append((before, after, held.buffer.num_sequences))
        return result, trainable_state(held.aux.module)

    def expected_reply(self, client: Client):
        return trainable_state(self.aux[client.index].module)

    def aux_as_client_uses_it(self, client: Client):
        """The server's copy of the client's auxiliary model: the state it last sent down (or the shared start)."""
        return self.server_aux[client.index].aux

    def client_receive(self, client: Client, reply, round_index: int, local_step: int) -> StepResult:
        load_trainable_state(self.aux[client.index].module, reply)
        return StepResult()

    def end_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        metrics = super().end_round(round_index, participants)
        if self._cosines:
            total = sum(n for *_, n in self._cosines)
            metrics["align_grad_cosine_before"] = sum(b * n for b, _, n in self._cosines) / total
            metrics["align_grad_cosine_after"] = sum(a * n for _, a, n in self._cosines) / total
        return metrics

    # ------------------------------------------------------------ what the trainer reads
    def train(self, mode: bool = True) -> None:
        super().train(mode)
        for held in self.server_aux.values():
            held.aux.module.train(mode)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(),
                "server_aux": {c: {"model": trainable_state(h.aux.module), "optimizer": h.optimizer.state_dict(),
                                   "buffer": h.buffer.state_dict()} for c, h in self.server_aux.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for c, held in self.server_aux.items():
            saved = state["server_aux"][c]
            load_trainable_state(held.aux.module, saved["model"])
            held.optimizer.load_state_dict(saved["optimizer"])
            held.buffer.load_state_dict(saved["buffer"])

    def exported_states(self) -> dict[str, dict]:
        return {f"aux/client_{c}": trainable_state(h.aux.module) for c, h in self.server_aux.items()}

    def model_card_rows(self) -> list[tuple[str, Any]]:
        return [*super().model_card_rows(), ("alignment interval (rounds)", self.align_interval),
                ("alignment buffer / epochs / lr",
                 f"{self.align_buffer_size} sequences / {self.align_epochs} / {self.align_learning_rate}")]
