"""The parties of a federated split run and the operations every algorithm shares.

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
from .auxiliary import build_aux_model, trainable_parameters
from .communication import Transport
from .config import FSLSageConfig
from .loss import ChunkedLMLoss
from .split import Smashed, SplitCausalLM

OptimizerFactory = Callable[[nn.Module, float | None], tuple[torch.optim.Optimizer, object]]


def copy_sharing_frozen(module: nn.Module) -> nn.Module:
    """Deep copy of ``module`` whose frozen parameters and buffers are the original tensors."""
    memo = {id(p): p for p in module.parameters() if not p.requires_grad}
    memo.update({id(b): b for b in module.buffers()})
    return copy.deepcopy(module, memo)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in trainable_parameters(module).items()}


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
    index: int
    num_examples: int
    model: Party
    aux: nn.Module | None = None
    aux_loss: ChunkedLMLoss | None = None
    aux_optimizer: torch.optim.Optimizer | None = None
    aux_scheduler: object | None = None  # set when the client trains its auxiliary model itself (CSE-FSL)
    # The client's own copy of the server model (SplitFed-V1 keeps it on the server, FedAvg on the client).
    server: Party | None = None
    server_loss: ChunkedLMLoss | None = None
    # Uploads the server keeps for this client's alignment: (smashed, labels), newest last.
    buffer: deque = field(default_factory=deque)


class Federation:
    """Clients, server and transport of one run; algorithms drive it through a few operations."""

    def __init__(
        self,
        split: SplitCausalLM,
        args: FSLSageConfig,
        client_sizes: list[int],
        transport: Transport,
        make_optimizer: OptimizerFactory,
        with_aux: bool,
        client_trains_aux: bool = False,
        server_copies: bool = False,
    ):
        self.split = split
        self.args = args
        self.transport = transport
        self.server = Party(split.server, *make_optimizer(split.server, None))
        self.server_loss = ChunkedLMLoss(split.server, args.loss_chunk_tokens)
        self.clients: list[Client] = []
        for index, size in enumerate(client_sizes):
            module = copy_sharing_frozen(split.client)
            client = Client(index, size, Party(module, *make_optimizer(module, None)))
            if with_aux:
                aux = build_aux_model(split, args.aux_num_layers, args.aux_init, module.input_embeddings())
                client.aux, client.aux_loss = aux, ChunkedLMLoss(aux, args.loss_chunk_tokens)
                if client_trains_aux:  # steps with the client model, on the client's learning-rate schedule
                    client.aux_optimizer, client.aux_scheduler = make_optimizer(aux, None)
                else:
                    client.aux_optimizer = make_optimizer(aux, args.align_learning_rate or args.learning_rate)[0]
            if server_copies:
                own = copy_sharing_frozen(split.server)
                client.server = Party(own, *make_optimizer(own, None))
                client.server_loss = ChunkedLMLoss(own, args.loss_chunk_tokens)
            self.clients.append(client)
        # The aggregated auxiliary model when clients train and average theirs (CSE-FSL); it starts as client 0's.
        self.global_aux: dict[str, torch.Tensor] | None = None
        if with_aux and client_trains_aux:
            self.global_aux = {n: t.clone() for n, t in trainable_state(self.clients[0].aux).items()}

    # ------------------------------------------------------------ model exchange
    def broadcast(self, clients: list[int]) -> None:
        """Send the global client model to each of ``clients``, which load it."""
        state = trainable_state(self.split.client)
        for c in clients:
            load_trainable_state(self.clients[c].model.module, self.transport.to_client(c, "client_model", state))

    def aggregate(self, clients: list[int]) -> None:
        """Clients upload their models; the server averages them, weighted by data size, into the global model."""
        states = [self.transport.to_server(c, "client_model", trainable_state(self.clients[c].model.module))
                  for c in clients]
        load_trainable_state(self.split.client, weighted_average(states, [self.clients[c].num_examples for c in clients]))

    def broadcast_copies(self, clients: list[int], role: str, kind: str | None) -> None:
        """Load the global ``role`` model (``"server"`` or ``"aux"``) into each of ``clients``' own copies.

        With ``kind`` it travels to the client through the transport (FedAvg's server half, CSE-FSL's
        auxiliary model); with ``None`` the copies sit on the server (SplitFed-V1) and nothing crosses the wire.
        """
        state = trainable_state(self.server.module) if role == "server" else self.global_aux
        for c in clients:
            load_trainable_state(self._copy(c, role), state if kind is None else self.transport.to_client(c, kind, state))

    def aggregate_copies(self, clients: list[int], role: str, kind: str | None) -> None:
        """FedAvg of ``clients``' copies of the ``role`` model into the global one (uploaded as ``kind`` unless None)."""
        states = [trainable_state(self._copy(c, role)) for c in clients]
        if kind is not None:
            states = [self.transport.to_server(c, kind, s) for c, s in zip(clients, states)]
        averaged = weighted_average(states, [self.clients[c].num_examples for c in clients])
        if role == "server":
            load_trainable_state(self.server.module, averaged)
        else:
            self.global_aux = averaged

    def _copy(self, client: int, role: str) -> nn.Module:
        c = self.clients[client]
        module = (c.server and c.server.module) if role == "server" else c.aux
        if module is None or (role == "aux" and self.global_aux is None):
            raise ValueError(f"client {client} has no own {role} model to exchange")
        return module

    def train(self, mode: bool = True) -> None:
        """Set the training mode of every model of the run (the copies do not follow ``split.train()``)."""
        self.split.train(mode)
        for c in self.clients:
            for module in (c.model.module, c.aux, c.server and c.server.module):
                if module is not None:
                    module.train(mode)

    # ------------------------------------------------------------ per-step operations
    def client_forward(self, client: Client, batch: dict[str, torch.Tensor]) -> Smashed:
        return client.model.module(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))

    def client_step(self, client: Client) -> float:
        return clip_and_step(client.model.module, client.model.optimizer, self.args.max_grad_norm)

    def upload(self, client: Client, smashed: Smashed, labels: torch.Tensor) -> tuple[Smashed, torch.Tensor]:
        return self.transport.to_server(client.index, "smashed", (smashed, labels))

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

    # ------------------------------------------------------------ global model
    def global_loss(self, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
        smashed = self.split.client(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        return self.server_loss(smashed, batch["labels"], label_smoothing)

    def parties(self) -> dict[str, Party]:
        out = {"server": self.server}
        out.update({f"client_{c.index}": c.model for c in self.clients})
        out.update({f"server_{c.index}": c.server for c in self.clients if c.server is not None})
        out.update({f"aux_{c.index}": Party(c.aux, c.aux_optimizer, c.aux_scheduler)
                    for c in self.clients if c.aux_scheduler is not None})
        return out

    # ------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {
            "server": trainable_state(self.server.module),
            "clients": [trainable_state(c.model.module) for c in self.clients],
            "aux": [None if c.aux is None else trainable_state(c.aux) for c in self.clients],
            "aux_optimizers": [None if c.aux_optimizer is None else c.aux_optimizer.state_dict() for c in self.clients],
            "buffers": [list(c.buffer) for c in self.clients],
            "ledger": self.transport.ledger.state_dict(),
            "server_copies": [None if c.server is None else trainable_state(c.server.module) for c in self.clients],
            "global_aux": self.global_aux,
        }

    def load_state_dict(self, state: dict) -> None:
        load_trainable_state(self.server.module, state["server"])
        for client, params, aux, aux_opt, buffer in zip(
            self.clients, state["clients"], state["aux"], state["aux_optimizers"], state["buffers"]
        ):
            load_trainable_state(client.model.module, params)
            if client.aux is not None:
                load_trainable_state(client.aux, aux)
                client.aux_optimizer.load_state_dict(aux_opt)
            client.buffer = deque(buffer)
        self.transport.ledger.load_state_dict(state["ledger"])
        for client, params in zip(self.clients, state.get("server_copies", [None] * len(self.clients))):
            if client.server is not None:
                load_trainable_state(client.server.module, params)
        if self.global_aux is not None:
            self.global_aux = state["global_aux"]
