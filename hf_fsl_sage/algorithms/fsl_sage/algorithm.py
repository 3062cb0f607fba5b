"""FSL-SAGE: local steps on an auxiliary gradient estimate, periodically aligned to the server's gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...federation.federation import Client, Federation, load_trainable_state, trainable_state
from ...splitting.split import Smashed
from ...transport.base import FederationCommError
from ..auxiliary import AuxiliaryLossAlgorithm, AuxModel
from ..base import StepResult
from ..registry import register
from .alignment import align, true_gradients
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
    down; the client loads it. The auxiliary model is never trained by the client itself. With
    ``server_replay_steps`` the server takes that many more steps after each upload, each on an upload drawn at
    random from every client's buffer (not the one just served while there are others): more server updates
    for no bytes.

    With private labels the server cannot compute a gradient, so the alignment moves to the client: the server
    keeps, per client, the true gradient at the cut of each upload (from the gradient the client returned, with the
    server model of that step), and at an alignment sends those of the buffered uploads down (``cut_gradient``);
    the client aligns its own auxiliary model on its uploads, labels and these targets.
    """

    display_name = "FSL-SAGE (federated split learning with smashed-activation gradient estimation)"
    reply_kind = "aux_model"
    own_settings = AuxiliaryLossAlgorithm.own_settings + (
        "align_interval", "align_buffer_size", "align_epochs", "align_learning_rate", "server_replay_steps")

    def __init__(self, federation: Federation, *, align_interval: int = 10, align_buffer_size: int = 16,
                 align_epochs: int = 5, align_learning_rate: float = 2e-4, server_replay_steps: int = 0,
                 **aux_settings: Any):
        super().__init__(federation, **aux_settings)
        if server_replay_steps and federation.private_labels:
            raise ValueError("server_replay_steps needs the labels on the server, which private labels keep on the "
                             "clients: set server_replay_steps=0 or private_labels=False.")
        self.server_replay_steps = server_replay_steps
        self.align_interval, self.align_buffer_size = align_interval, align_buffer_size
        self.align_epochs, self.align_learning_rate = align_epochs, align_learning_rate
        self.server_aux: dict[int, ServerAux] = {}
        self.private = federation.private_labels
        #: With private labels: the server's true gradients at the cut per client, the clients' own buffers and
        #: alignment optimizers, and the activations of each client's upload in flight.
        self.cut_gradients: dict[int, UploadBuffer] = {}
        self.client_buffers: dict[int, UploadBuffer] = {}
        self.client_align: dict[int, torch.optim.Optimizer] = {}
        self._uploading: dict[int, Smashed] = {}
        if self.private:
            self.reply_kind = "cut_gradient"
            if federation.placement.is_server:
                self.cut_gradients = {c.index: UploadBuffer(align_buffer_size) for c in federation.clients}
            for c, aux in self.aux.items():
                self.client_buffers[c] = UploadBuffer(align_buffer_size)
                self.client_align[c] = federation.make_optimizer(aux.module, align_learning_rate)[0]
        elif federation.placement.is_server:
            for c in federation.clients:  # its head reads the embedding of the global client model the server holds
                aux = self.build_aux(c.index, federation.split.client.input_embeddings())
                optimizer = federation.make_optimizer(aux.module, align_learning_rate)[0]
                self.server_aux[c.index] = ServerAux(aux, optimizer, UploadBuffer(align_buffer_size))
        self._cosines: list[tuple[float, float, int]] = []

    @classmethod
    def from_config(cls, args: Any, federation: Federation) -> FSLSage:
        return cls(federation, align_interval=args.align_interval, align_buffer_size=args.align_buffer_size,
                   align_epochs=args.align_epochs, align_learning_rate=args.align_learning_rate or args.learning_rate,
                   server_replay_steps=args.server_replay_steps, **cls.aux_settings(args))

    def begin_round(self, round_index: int, participants: list[int]) -> dict[str, float]:
        self._cosines = []
        return super().begin_round(round_index, participants)

    def replies_at(self, round_index: int, local_step: int) -> bool:
        # align_epochs=0: no alignment, so the copy the client holds stays right and nothing goes down
        return self.align_epochs > 0 and round_index % self.align_interval == 0 and local_step == 0

    def client_compute(self, client: Client, batch, round_index: int, local_step: int):
        smashed, loss = self.aux_forward(client, batch)
        activations = smashed.activations()  # the hidden states (and any carried activations)
        estimates = torch.autograd.grad(loss, list(activations.values()), retain_graph=True, allow_unused=True)
        smashed.backward(dict(zip(activations, estimates)))  # through the client only: the aux model is not trained
        self.fed.client_step(client)
        if self.private and self.uploads_at(round_index, local_step):
            self._uploading[client.index] = smashed.detach()  # buffered once the server has served it
        return StepResult(loss=float(loss.detach())), (smashed, batch["labels"])

    def serve(self, client: Client, upload, round_index: int, local_step: int):
        if self.private:
            return self._serve_private(client, upload, round_index, local_step)
        fed, held = self.fed, self.server_aux[client.index]
        smashed, labels = upload
        self.measure_heldout(client, smashed, labels)  # before the server steps and the upload is buffered
        result = StepResult(server_loss=fed.server_step(smashed, labels))
        held.buffer.push(smashed, labels)
        self._replay(held.buffer.items[-1])
        if not self.replies_at(round_index, local_step):
            return result, None
        buffer = list(held.buffer)
        with fed.timer("align"):
            targets = true_gradients(fed.server_loss, fed.server.module, buffer, fed.label_smoothing)
            before, after = align(held.aux.module, held.aux.loss, buffer, targets, self.align_epochs,
                                  held.optimizer, fed.label_smoothing)
        self._cosines.append((before, after, held.buffer.num_sequences))
        return result, trainable_state(held.aux.module)

    def _replay(self, served: tuple[Smashed, torch.Tensor]) -> None:
        """``server_replay_steps`` server steps, each on a buffered upload of any client drawn at random (with the
        seed :meth:`local_step` set), not ``served`` while the buffers hold others."""
        if not self.server_replay_steps:
            return
        pool = [item for held in self.server_aux.values() for item in held.buffer]
        pool = [item for item in pool if item is not served] or pool
        for i in torch.randint(len(pool), (self.server_replay_steps,)).tolist():
            self.fed.server_step(*pool[i])

    def _serve_private(self, client: Client, upload, round_index: int, local_step: int):
        smashed, labels = upload
        leaves = smashed.leaves()
        self.fed.server_step(leaves, labels)
        grads = self.cut_gradients[client.index]
        if leaves.hidden_states.grad is not None:  # the round trip gave a gradient: keep it, as the client keeps
            grads.push(_gradients_as_upload(leaves), None)  # the upload (in step with it)
        if not self.replies_at(round_index, local_step):
            return StepResult(), None
        return StepResult(), [_kept_rows(g) for g, _ in grads]

    def client_loss(self, client: Client, top, labels):
        result, gradient = super().client_loss(client, top, labels)
        uploaded = self._uploading.pop(client.index, None)
        if self.private and gradient is not None and uploaded is not None:
            self.client_buffers[client.index].push(uploaded, labels)  # the server keeps its gradient in step
        return result, gradient

    def expected_reply(self, client: Client):
        return None if self.private else trainable_state(self.aux[client.index].module)

    def aux_as_client_uses_it(self, client: Client):
        """The server's copy of the client's auxiliary model: the state it last sent down (or the shared start)."""
        return self.server_aux[client.index].aux

    def client_receive(self, client: Client, reply, round_index: int, local_step: int) -> StepResult:
        if not self.private:
            load_trainable_state(self.aux[client.index].module, reply)
            return StepResult()
        buffer, aux, fed = list(self.client_buffers[client.index]), self.aux[client.index], self.fed
        sizes, got = [_count(_kept_rows(s)) for s, _ in buffer], [_count(rows) for rows in reply]
        if got != sizes:
            raise FederationCommError(f"the cut_gradient message for client {client.index} holds {got} rows per "
                                      f"upload where its buffer holds {sizes}; launch every process with the same "
                                      "script, arguments and seed.")
        targets = [_restored(rows, s) for rows, (s, _) in zip(reply, buffer)]
        with fed.timer("align"):
            before, after = align(aux.module, aux.loss, buffer, targets, self.align_epochs,
                                  self.client_align[client.index], fed.label_smoothing)
        self._cosines.append((before, after, sum(s.hidden_states.shape[0] for s, _ in buffer)))
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
                                   "buffer": h.buffer.state_dict()} for c, h in self.server_aux.items()},
                "cut_gradients": {c: b.state_dict() for c, b in self.cut_gradients.items()},
                "client_align": {c: {"optimizer": o.state_dict(), "buffer": self.client_buffers[c].state_dict()}
                                 for c, o in self.client_align.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for c, held in self.server_aux.items():
            saved = state["server_aux"][c]
            load_trainable_state(held.aux.module, saved["model"])
            held.optimizer.load_state_dict(saved["optimizer"])
            held.buffer.load_state_dict(saved["buffer"])
        for c, buffer in self.cut_gradients.items():
            buffer.load_state_dict(state["cut_gradients"][c])
        for c, optimizer in self.client_align.items():
            optimizer.load_state_dict(state["client_align"][c]["optimizer"])
            self.client_buffers[c].load_state_dict(state["client_align"][c]["buffer"])

    def exported_states(self) -> dict[str, dict]:
        return {f"aux/client_{c}": trainable_state(h.aux.module) for c, h in self.server_aux.items()}

    def model_card_rows(self) -> list[tuple[str, Any]]:
        return [*super().model_card_rows(), ("alignment interval (rounds)", self.align_interval),
                ("alignment buffer / epochs / lr",
                 f"{self.align_buffer_size} sequences / {self.align_epochs} / {self.align_learning_rate}"),
                *([("server replay steps per upload", self.server_replay_steps)] if self.server_replay_steps else [])]


def _gradients_as_upload(leaves: Smashed) -> Smashed:
    """The gradients w.r.t. the activations of ``leaves`` (after a backward pass) in an upload's shape and mask."""
    grads = {n: torch.zeros_like(t) if t.grad is None else t.grad for n, t in leaves.activations().items()}
    return Smashed(grads.pop("hidden_states"), leaves.attention_mask, None, grads)


def _kept_rows(smashed: Smashed) -> torch.Tensor | dict[str, torch.Tensor]:
    """The activations of ``smashed`` at the positions its mask keeps (all without a mask), as rows
    ``(positions, ...)``: a tensor for the hidden states alone, else a dict by name."""
    mask = smashed.attention_mask
    rows = {n: t.flatten(0, 1) if mask is None else t[mask.to(t.device)] for n, t in smashed.activations().items()}
    return rows["hidden_states"] if len(rows) == 1 else rows


def _count(rows: torch.Tensor | dict[str, torch.Tensor]) -> int:
    return (rows["hidden_states"] if isinstance(rows, dict) else rows).shape[0]


def _restored(rows: torch.Tensor | dict[str, torch.Tensor], like: Smashed) -> torch.Tensor:
    """``rows`` (see :func:`_kept_rows`) back in the shape of the upload ``like``, zeros at the positions its mask
    drops, as :func:`~hf_fsl_sage.algorithms.gradients.gradient_wrt_hidden` gives the gradient w.r.t. it."""
    named = rows if isinstance(rows, dict) else {"hidden_states": rows}
    mask, out = like.attention_mask, []
    for name, t in like.activations().items():
        if mask is None:
            out.append(named[name].reshape(t.shape).to(t.dtype))
            continue
        full = torch.zeros_like(t)
        full[mask.to(t.device)] = named[name].to(t.dtype)
        out.append(full)
    return out[0] if len(out) == 1 else torch.cat([g.flatten(1) for g in out], dim=1)
