"""The parties of a federated split run and the operations every algorithm shares.

Each process builds only what its placement gives it (:mod:`hf_fsl_sage.placement`):
the server's process holds the server model, the global client model, the
uploads kept for alignment and any server-side copies; a client's process holds
that client's model and its client-side copies. Round-level exchanges are
called on every process and go through the transport, which delivers each
message where it is needed.

The *global* client model is the client half of the split model itself, so the
split model (and the ``PeftModel`` or ``PreTrainedModel`` it came from) always
holds the aggregated clients plus the server: saving or evaluating it needs no
extra step. Each client trains its own copy, which shares every frozen tensor
with the global model and owns only its trainable ones (its LoRA adapters
when PEFT is used), so frozen weights exist once in memory however many
clients there are.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .aggregation import weighted_average
from ..algorithms.auxiliary import build_aux_model, trainable_parameters
from ..transport.base import Transport
from ..config import FSLSageConfig
from ..splitting.loss import ChunkedLMLoss
from ..transport.placement import Placement, party_seed
from ..splitting.split import Smashed, SplitCausalLM

OptimizerFactory = Callable[[nn.Module, float | None], tuple[torch.optim.Optimizer, object]]


def copy_sharing_frozen(module: nn.Module) -> nn.Module:
    """Deep copy of ``module`` whose frozen parameters and buffers are the original tensors."""
    memo = {id(p): p for p in module.parameters() if not p.requires_grad}
    memo.update({id(b): b for b in module.buffers()})
    return copy.deepcopy(module, memo)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in trainable_parameters(module).items()}


def _state_of(module: nn.Module | None) -> dict[str, torch.Tensor] | None:
    return None if module is None else trainable_state(module)


@torch.no_grad()
def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = trainable_parameters(module)
    if params.keys() != state.keys():
        raise ValueError("trainable parameters do not match the received state")
    for name, p in params.items():
        p.copy_(state[name])


def clip_and_step(module: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> float:
    """Clip this party's gradients, step its optimizer, clear its gradients; returns the pre-clip norm."""
    params = [p for p in module.parameters() if p.grad is not None]
    norm = 0.0
    if params:
        limit = max_grad_norm if max_grad_norm and max_grad_norm > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


@dataclass
class Party:
    """A model owned by one party, with its optimizer and learning-rate schedule."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object


@dataclass
class Client:
    """One client as this process sees it: the client-side fields exist on the client's process, the
    server-side ones on the server's; a process that holds neither sees only the index and the size."""

    index: int
    num_examples: int
    # client side
    model: Party | None = None
    aux: nn.Module | None = None  # the auxiliary model the client computes its local loss with
    aux_loss: ChunkedLMLoss | None = None
    aux_optimizer: torch.optim.Optimizer | None = None  # set when the client trains it itself (CSE-FSL)
    aux_scheduler: object | None = None
    # an own copy of the server model: on the client (FedAvg) or on the server (SplitFed-V1)
    server: Party | None = None
    server_loss: ChunkedLMLoss | None = None
    # server side (FSL-SAGE): the server's copy of the auxiliary model, which it aligns and sends down
    server_aux: nn.Module | None = None
    server_aux_loss: ChunkedLMLoss | None = None
    align_optimizer: torch.optim.Optimizer | None = None
    # uploads the server keeps for this client's alignment: (smashed, labels), newest last
    buffer: deque = field(default_factory=deque)


class Federation:
    """Clients, server and transport of one run; algorithms drive it through a few operations.

    ``server_copies`` is where each client's own copy of the server model lives: ``"client"`` (FedAvg),
    ``"server"`` (SplitFed-V1) or None.
    """

    def __init__(
        self,
        split: SplitCausalLM,
        args: FSLSageConfig,
        client_sizes: list[int],
        transport: Transport,
        make_optimizer: OptimizerFactory,
        with_aux: bool,
        client_trains_aux: bool = False,
        server_aligns_aux: bool = False,
        server_copies: str | None = None,
        placement: Placement | None = None,
    ):
        self.split = split
        self.args = args
        self.transport = transport
        self.placement = placement or Placement.build(0, 1, len(client_sizes))
        on_server = self.placement.is_server
        self.server = Party(split.server, *make_optimizer(split.server, None)) if on_server else None
        self.server_loss = ChunkedLMLoss(split.server, args.loss_chunk_tokens) if on_server else None
        align_lr = args.align_learning_rate or args.learning_rate
        self.clients: list[Client] = []
        for index, size in enumerate(client_sizes):
            client = Client(index, size)
            if self.placement.holds_client(index):
                module = copy_sharing_frozen(split.client)
                client.model = Party(module, *make_optimizer(module, None))
                if with_aux:
                    client.aux = self._build_aux(index, module.input_embeddings())
                    client.aux_loss = ChunkedLMLoss(client.aux, args.loss_chunk_tokens)
                    if client_trains_aux:  # steps with the client model, on the client's learning-rate schedule
                        client.aux_optimizer, client.aux_scheduler = make_optimizer(client.aux, None)
                if server_copies == "client":
                    self._add_server_copy(client, make_optimizer)
            if on_server:
                if server_aligns_aux:  # its head reads the embedding of the global client model the server holds
                    client.server_aux = self._build_aux(index, split.client.input_embeddings())
                    client.server_aux_loss = ChunkedLMLoss(client.server_aux, args.loss_chunk_tokens)
                    client.align_optimizer = make_optimizer(client.server_aux, align_lr)[0]
                if server_copies == "server":
                    self._add_server_copy(client, make_optimizer)
            self.clients.append(client)
        # The aggregated auxiliary model when clients train and average theirs (CSE-FSL); it starts as client 0's.
        self.global_aux: dict[str, torch.Tensor] | None = None
        if with_aux and client_trains_aux and on_server:
            self.global_aux = trainable_state(self._build_aux(0, split.client.input_embeddings()))

    def _build_aux(self, index: int, embedding: nn.Module) -> nn.Module:
        """Client ``index``'s auxiliary model; its random draws depend on the index only, not on the process."""
        device = next(self.split.server.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(party_seed(self.args.seed, -1, 0, index, "aux_init"))
            return build_aux_model(self.split, self.args.aux_num_layers, self.args.aux_init, embedding)

    def _add_server_copy(self, client: Client, make_optimizer: OptimizerFactory) -> None:
        own = copy_sharing_frozen(self.split.server)
        client.server = Party(own, *make_optimizer(own, None))
        client.server_loss = ChunkedLMLoss(own, self.args.loss_chunk_tokens)

    # ------------------------------------------------------------ model exchange (called on every process)
    def broadcast(self, clients: list[int]) -> None:
        """Send the global client model to each of ``clients``, which load it."""
        state = trainable_state(self.split.client) if self.placement.is_server else None
        for c in clients:
            received = self.transport.to_client(c, "client_model", state, self._held_state(c, lambda cl: cl.model.module))
            if self.placement.holds_client(c):
                load_trainable_state(self.clients[c].model.module, received)

    def aggregate(self, clients: list[int]) -> None:
        """Clients upload their models; the server averages them, weighted by data size, into the global model."""
        expected = trainable_state(self.split.client) if self.placement.is_server else None
        states = [self.transport.to_server(c, "client_model", self._held_state(c, lambda cl: cl.model.module), expected)
                  for c in clients]
        if self.placement.is_server:
            load_trainable_state(self.split.client, self._average(states, clients))

    def broadcast_copies(self, clients: list[int], role: str, kind: str | None) -> None:
        """Load the global ``role`` model (``"server"`` or ``"aux"``) into each of ``clients``' own copies.

        With ``kind`` it travels to the client through the transport (FedAvg's server half, CSE-FSL's
        auxiliary model); with ``None`` the copies sit on the server (SplitFed-V1) and nothing crosses the wire.
        """
        state = None
        if self.placement.is_server:
            state = trainable_state(self.server.module) if role == "server" else self.global_aux
        for c in clients:
            if kind is None:
                if self.placement.is_server:
                    load_trainable_state(self._copy(c, role), state)
                continue
            received = self.transport.to_client(c, kind, state, self._held_state(c, lambda cl: self._copy(cl.index, role)))
            if self.placement.holds_client(c):
                load_trainable_state(self._copy(c, role), received)

    def aggregate_copies(self, clients: list[int], role: str, kind: str | None) -> None:
        """FedAvg of ``clients``' copies of the ``role`` model into the global one (uploaded as ``kind`` unless None)."""
        if kind is None:
            states = [trainable_state(self._copy(c, role)) for c in clients] if self.placement.is_server else []
        else:
            expected = None
            if self.placement.is_server:
                expected = trainable_state(self.server.module) if role == "server" else self.global_aux
            states = [self.transport.to_server(c, kind, self._held_state(c, lambda cl: self._copy(cl.index, role)),
                                               expected) for c in clients]
        if not self.placement.is_server:
            return
        averaged = self._average(states, clients)
        if role == "server":
            load_trainable_state(self.server.module, averaged)
        else:
            self.global_aux = averaged

    def _held_state(self, c: int, module_of: Callable[[Client], nn.Module]) -> dict[str, torch.Tensor] | None:
        return trainable_state(module_of(self.clients[c])) if self.placement.holds_client(c) else None

    def _average(self, states: list[dict[str, torch.Tensor]], clients: list[int]) -> dict[str, torch.Tensor]:
        return weighted_average(states, [self.clients[c].num_examples for c in clients])

    def _copy(self, client: int, role: str) -> nn.Module:
        c = self.clients[client]
        module = (c.server and c.server.module) if role == "server" else c.aux
        if module is None:
            raise ValueError(f"client {client} has no own {role} model to exchange on this process")
        return module

    def train(self, mode: bool = True) -> None:
        """Set the training mode of every model of the run (the copies do not follow ``split.train()``)."""
        self.split.train(mode)
        for c in self.clients:
            for module in (c.model and c.model.module, c.aux, c.server and c.server.module, c.server_aux):
                if module is not None:
                    module.train(mode)

    # ------------------------------------------------------------ per-step operations
    def client_forward(self, client: Client, batch: dict[str, torch.Tensor]) -> Smashed:
        return client.model.module(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))

    def client_step(self, client: Client) -> float:
        return clip_and_step(client.model.module, client.model.optimizer, self.args.max_grad_norm)

    def server_step(self, smashed: Smashed, labels: torch.Tensor) -> float:
        """One server update on a received batch; returns its loss."""
        loss = self.server_loss(smashed, labels, self.args.label_smoothing_factor)
        loss.backward()
        clip_and_step(self.server.module, self.server.optimizer, self.args.max_grad_norm)
        return float(loss.detach())

    def remember(self, client: Client, smashed: Smashed, labels: torch.Tensor) -> None:
        """Keep an upload in the client's alignment buffer (at most ``align_buffer_size`` sequences)."""
        size = self.args.align_buffer_size
        client.buffer.append((smashed, labels))
        while sum(s.hidden_states.shape[0] for s, _ in client.buffer) > size and len(client.buffer) > 1:
            client.buffer.popleft()
        s, y = client.buffer[0]
        if s.hidden_states.shape[0] > size:  # a single upload larger than the buffer keeps its newest rows
            client.buffer[0] = (Smashed(*(None if t is None else t[-size:] for t in (s.hidden_states, s.attention_mask,
                                                                                   s.position_ids))), y[-size:])

    # ------------------------------------------------------------ global model (on the server's process)
    def global_loss(self, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
        smashed = self.split.client(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        return self.server_loss(smashed, batch["labels"], label_smoothing)

    def parties(self) -> dict[str, Party]:
        """The parties this process steps: their optimizers and schedules are saved with its checkpoint state."""
        out = {"server": self.server} if self.server is not None else {}
        out.update({f"client_{c.index}": c.model for c in self.clients if c.model is not None})
        out.update({f"server_{c.index}": c.server for c in self.clients if c.server is not None})
        out.update({f"aux_{c.index}": Party(c.aux, c.aux_optimizer, c.aux_scheduler)
                    for c in self.clients if c.aux_scheduler is not None})
        return out

    def server_aux_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """The auxiliary models the server holds, by name: each client's aligned one, or the averaged one."""
        out = {f"client_{c.index}": trainable_state(c.server_aux) for c in self.clients if c.server_aux is not None}
        if self.global_aux is not None:
            out["global"] = self.global_aux
        return out

    # ------------------------------------------------------------ checkpoint state (this process's share)
    def state_dict(self) -> dict:
        clients = {}
        for c in self.clients:
            held = {
                "model": _state_of(c.model and c.model.module),
                "aux": _state_of(c.aux),
                "server_copy": _state_of(c.server and c.server.module),
                "server_aux": _state_of(c.server_aux),
                "align_optimizer": None if c.align_optimizer is None else c.align_optimizer.state_dict(),
                "buffer": list(c.buffer) if self.placement.is_server else None,
            }
            clients[c.index] = {k: v for k, v in held.items() if v is not None}
        return {
            "placement": {"world_size": self.placement.world_size, "client_ranks": list(self.placement.client_ranks)},
            "server": _state_of(self.server and self.server.module),
            "clients": clients,
            "ledger": self.transport.ledger.state_dict(),
            "global_aux": self.global_aux,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state["placement"]
        if saved != {"world_size": self.placement.world_size, "client_ranks": list(self.placement.client_ranks)}:
            raise ValueError(
                f"the checkpoint was written by {saved['world_size']} process(es) with clients on processes "
                f"{saved['client_ranks']}; this run has {self.placement.world_size} with clients on "
                f"{list(self.placement.client_ranks)}. Resume with the same --num_processes and client_ranks."
            )
        if self.server is not None:
            load_trainable_state(self.server.module, state["server"])
        for c in self.clients:
            held = state["clients"][c.index]
            if c.model is not None:
                load_trainable_state(c.model.module, held["model"])
            if c.aux is not None:
                load_trainable_state(c.aux, held["aux"])
            if c.server is not None:
                load_trainable_state(c.server.module, held["server_copy"])
            if c.server_aux is not None:
                load_trainable_state(c.server_aux, held["server_aux"])
                c.align_optimizer.load_state_dict(held["align_optimizer"])
            if "buffer" in held:
                c.buffer = deque(held["buffer"])
        self.transport.ledger.load_state_dict(state["ledger"])
        if self.global_aux is not None:
            self.global_aux = state["global_aux"]
