"""The parties of a federated split run and the operations every algorithm shares.

Each process builds only what its placement gives it (:mod:`hf_fsl_sage.transport.placement`):
the server's process holds the server model and the global client model; a
client's process holds that client's model. Whatever else an algorithm needs
per client (auxiliary models, upload buffers, per-client server copies) the
algorithm builds and holds itself (:mod:`hf_fsl_sage.algorithms`). Round-level
exchanges are called on every process and go through the transport, which
delivers each message where it is needed.

The *global* client model is the client half of the split model itself, so the
split model (and the ``PeftModel`` or ``PreTrainedModel`` it came from) always
holds the aggregated clients plus the server: saving or evaluating it needs no
extra step. Each client trains its own copy, which shares every frozen tensor
with the global model and owns only its trainable ones (its LoRA adapters
when PEFT is used), so frozen weights exist once in memory however many
clients there are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..splitting.loss import ChunkedLMLoss
from ..splitting.split import Smashed, SplitCausalLM
from ..splitting.stand_ins import deepcopy_module
from ..timing import StepTimer
from ..transport.base import Transport
from ..transport.defences import ActivationDefence
from ..transport.placement import Placement, party_seed
from .aggregation import weighted_average
from .guard import Guard


#: ``make_optimizer(module, lr)``: an optimizer over ``module``'s trainable parameters and its schedule; with
#: ``lr`` given, a fixed-rate optimizer and no schedule.
OptimizerFactory = Callable[[nn.Module, float | None], tuple[torch.optim.Optimizer, object]]
StateDict = dict[str, torch.Tensor]


def copy_sharing_frozen(module: nn.Module) -> nn.Module:
    """Deep copy of ``module`` whose frozen parameters and buffers are the original tensors."""
    memo = {id(p): p for p in module.parameters() if not p.requires_grad}
    memo.update({id(b): b for b in module.buffers()})
    return deepcopy_module(module, memo)


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def trainable_state(module: nn.Module) -> StateDict:
    return {n: p.detach() for n, p in trainable_parameters(module).items()}


def state_or_none(module: nn.Module | None) -> StateDict | None:
    return None if module is None else trainable_state(module)


@torch.no_grad()
def load_trainable_state(module: nn.Module, state: StateDict) -> None:
    params = trainable_parameters(module)
    if params.keys() != state.keys():
        raise ValueError("trainable parameters do not match the received state")
    for name, p in params.items():
        p.copy_(state[name])


def clip_and_step(module: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                  guard: Guard | None = None, party: str = "") -> float:
    """Clip this party's gradients, step its optimizer, clear its gradients; returns the pre-clip norm.

    With ``guard``, gradients that are not finite are not applied (``guard`` raises or counts a skipped update).
    """
    params = [p for p in module.parameters() if p.grad is not None]
    norm = 0.0
    if params:
        limit = max_grad_norm if max_grad_norm and max_grad_norm > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
    if guard is None or guard.finite(norm, "gradients", party):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


@dataclass
class Party:
    """A model owned by one party, with its optimizer, its learning-rate schedule and, for a server half, its loss."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss: ChunkedLMLoss | None = None


@dataclass
class Client:
    """One client as this process sees it: its model exists on the client's process only."""

    index: int
    num_examples: int
    model: Party | None = None


class Federation:
    """Clients, server and transport of one run; algorithms drive it through a few operations.

    Args:
        split: the split model; its client half is the global client model, its server half the server's.
        client_sizes: examples per client (the FedAvg weights).
        transport: carries every message between clients and the server.
        make_optimizer: builds each party's optimizer and schedule (algorithms use it for their own parties).
        placement: which process holds the server and each client (default: all in this process).
        seed: the run's seed, from which every party's random draws derive.
        max_grad_norm: per-party gradient clipping (0 or None: none).
        label_smoothing: label smoothing of the training losses.
        loss_chunk_tokens: labelled positions per chunk of an LM-head loss.
        batch_size: sequences per client batch (the most an upload may carry).
        guard: the non-finite and client-failure policies (default: raise on both).
        failure_rate: probability that a client fails on purpose at a local step (``simulate_client_failures``).
        defence: perturbations of the client blocks' output in training (:mod:`hf_fsl_sage.transport.defences`).

    When the split keeps the labels on the client (``split.private_labels``), each client's party holds the
    final norm and LM head too (its ``loss`` is theirs), the server's has no loss, and the server's loss on an
    upload is computed through :attr:`remote_loss`, which the algorithm sets (the round trip to the client).
    """

    def __init__(
        self,
        split: SplitCausalLM,
        client_sizes: list[int],
        transport: Transport,
        make_optimizer: OptimizerFactory,
        placement: Placement | None = None,
        *,
        seed: int = 42,
        max_grad_norm: float = 1.0,
        label_smoothing: float = 0.0,
        loss_chunk_tokens: int = 1024,
        batch_size: int = 8,
        guard: Guard | None = None,
        failure_rate: float = 0.0,
        defence: ActivationDefence | None = None,
    ):
        self.split = split
        self.transport = transport
        self.make_optimizer = make_optimizer
        self.placement = placement or Placement.build(0, 1, len(client_sizes))
        self.seed, self.max_grad_norm = seed, max_grad_norm
        self.label_smoothing, self.loss_chunk_tokens = label_smoothing, loss_chunk_tokens
        self.batch_size = batch_size
        self.failure_rate = failure_rate
        self.guard = guard or Guard()
        self.guard.context = lambda: transport.context  # where the run is, for its messages
        self.defence = defence if defence is not None and defence.active else None
        self.private_labels = split.private_labels
        #: ``remote_loss(party, smashed) -> applied``: with private labels, backpropagates ``party``'s loss on an
        #: upload, computed on the client (set by the algorithm; see :meth:`backward_loss`).
        self.remote_loss: Callable[[Party, Smashed], bool] | None = None
        server_loss = not self.private_labels
        self.server = self.new_party(split.server, with_loss=server_loss) if self.placement.is_server else None
        self.server_loss = self.server.loss if self.server is not None else None
        #: The global model's loss on the server's output, with private labels (the client's head).
        self.head_loss = ChunkedLMLoss(split.client.head, loss_chunk_tokens) if self.private_labels else None
        self.clients: list[Client] = []
        for index, size in enumerate(client_sizes):
            client = Client(index, size)
            if self.placement.holds_client(index):
                module = copy_sharing_frozen(split.client)
                client.model = self.new_party(module)
                if self.private_labels:
                    client.model.loss = ChunkedLMLoss(module.head, loss_chunk_tokens)
            self.clients.append(client)

    def new_party(self, module: nn.Module, with_loss: bool = False) -> Party:
        """``module`` with an optimizer on the run's schedule (and its LM loss when it ends in the head)."""
        loss = ChunkedLMLoss(module, self.loss_chunk_tokens) if with_loss else None
        return Party(module, *self.make_optimizer(module, None), loss=loss)

    def copy_server(self) -> Party:
        """An own copy of the server model (sharing its frozen weights), with an optimizer and its loss."""
        return self.new_party(copy_sharing_frozen(self.split.server), with_loss=not self.private_labels)

    @property
    def held_clients(self) -> list[int]:
        """The clients whose model this process holds."""
        return [c.index for c in self.clients if c.model is not None]

    # ------------------------------------------------------------ model exchange (called on every process)
    def broadcast(self, clients: list[int]) -> None:
        """Send the global client model to each of ``clients``, which load it."""
        state = trainable_state(self.split.client) if self.placement.is_server else None
        self.load_copies(clients, state, lambda c: self.clients[c].model.module, "client_model")

    def aggregate(self, clients: list[int]) -> None:
        """Clients upload their models; the server averages them, weighted by data size, into the global model."""
        template = trainable_state(self.split.client) if self.placement.is_server else None
        averaged = self.average_copies(clients, lambda c: self.clients[c].model.module, "client_model", template)
        if averaged is not None:
            load_trainable_state(self.split.client, averaged)

    def load_copies(self, clients: list[int], state: StateDict | None, copy_of: Callable[[int], nn.Module],
                    kind: str | None) -> None:
        """Load ``state`` (given on the server's process) into each of ``clients``' own copy ``copy_of(c)``.

        With ``kind`` the copies live on the clients and the state travels to each as a ``kind`` message;
        with ``None`` they live on the server and nothing crosses the wire.
        """
        for c in clients:
            if kind is None:
                if self.placement.is_server:
                    load_trainable_state(copy_of(c), state)
                continue
            held = self.placement.holds_client(c)
            received = self.transport.to_client(c, kind, state, trainable_state(copy_of(c)) if held else None)
            if held and self.guard.finite(received, f"{kind} message", "the server"):  # else: keep its own
                load_trainable_state(copy_of(c), received)

    def average_copies(self, clients: list[int], copy_of: Callable[[int], nn.Module], kind: str | None,
                       template: StateDict | None = None) -> StateDict | None:
        """FedAvg (weighted by data size) of ``clients``' copies ``copy_of(c)``: on the server's process, else None.

        With ``kind`` each client uploads its copy as a ``kind`` message, which must look like ``template`` (given
        on the server's process); with ``None`` the copies live on the server and nothing crosses the wire.
        Clients dropped from the round send nothing, non-finite states are left out (see :class:`Guard`), and
        the others' weights are renormalised; None if no state is left.
        """
        dropped = self.guard.dropped
        if kind is None:
            states = [None if c in dropped else trainable_state(copy_of(c)) for c in clients] \
                if self.placement.is_server else []
        else:
            states = [self.transport.to_server(c, kind, trainable_state(copy_of(c)) if self.placement.holds_client(c)
                                               and c not in dropped else None, template) for c in clients]
        if not self.placement.is_server:
            return None
        kept = [(c, s) for c, s in zip(clients, states) if s is not None and c not in dropped
                and self.guard.finite(s, f"{kind or 'model'} state", f"client {c}")]
        if not kept:
            return None
        return weighted_average([s for _, s in kept], [self.clients[c].num_examples for c, _ in kept])

    def train(self, mode: bool = True) -> None:
        """Set the training mode of the split model and the clients' copies (which do not follow ``split.train``)."""
        self.split.train(mode)
        for c in self.clients:
            if c.model is not None:
                c.model.module.train(mode)

    # ------------------------------------------------------------ per-step operations
    @property
    def timer(self) -> StepTimer:
        """Times the parts of a step (:mod:`hf_fsl_sage.timing`); shared with the transport."""
        return self.transport.timer

    def client_forward(self, client: Client, batch: dict[str, torch.Tensor]) -> Smashed:
        """The client half on a batch; in training, through the run's defence (what it would send)."""
        module, defence = client.model.module, self.defence
        with self.timer("client_forward"):
            if defence is None or not module.training:
                return module(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
            with defence.on_embeddings(module.input_embeddings()):
                smashed = module(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
            protected = {n: defence.protect(t) for n, t in smashed.activations().items()}
            return Smashed(protected.pop("hidden_states"), smashed.attention_mask, smashed.position_ids,
                           {**smashed.carried, **protected})

    def fails_at(self, round_index: int, local_step: int, client: int) -> bool:
        """Whether ``client`` fails on purpose at this step: a draw from the step and client alone, so it repeats
        exactly on every process and after a resume."""
        if not self.failure_rate:
            return False
        draw = torch.Generator().manual_seed(party_seed(self.seed, round_index, local_step, client, "failure"))
        return float(torch.rand((), generator=draw)) < self.failure_rate

    def client_step(self, client: Client) -> float:
        return clip_and_step(client.model.module, client.model.optimizer, self.max_grad_norm, self.guard,
                             f"client {client.index}")

    def backward_loss(self, party: Party, smashed: Smashed, labels: torch.Tensor | None) -> tuple[bool, float | None]:
        """Backpropagate ``party``'s loss on a received upload (into the party, and into ``smashed.hidden_states``
        when it requires grad); returns whether gradients were applied and the loss where this process knows it.

        With private labels the loss is the client's: :attr:`remote_loss` runs the server's half and the round
        trip, and the value stays on the client (``None`` here).
        """
        if self.private_labels:
            return self.remote_loss(party, smashed), None
        loss = party.loss(smashed, labels, self.label_smoothing)
        value = float(loss.detach())
        if not self.guard.finite(value, "loss", "the server"):
            return False, value
        loss.backward()
        return True, value

    def server_step(self, smashed: Smashed, labels: torch.Tensor | None) -> float | None:
        """One server update on a received batch; returns its loss (``None`` with private labels: the client's)."""
        applied, value = self.backward_loss(self.server, smashed, labels)
        if applied:
            clip_and_step(self.server.module, self.server.optimizer, self.max_grad_norm, self.guard, "the server")
        return value

    # ------------------------------------------------------------ global model (on the server's process)
    def global_loss(self, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
        smashed = self.split.client(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        if self.private_labels:
            top = Smashed(self.split.server(smashed), smashed.attention_mask, smashed.position_ids)
            return self.head_loss(top, batch["labels"], label_smoothing)
        return self.server_loss(smashed, batch["labels"], label_smoothing)

    def parties(self) -> dict[str, Party]:
        """The shared parties this process steps (the server, its clients); algorithms add their own."""
        out = {"server": self.server} if self.server is not None else {}
        out.update({f"client_{c.index}": c.model for c in self.clients if c.model is not None})
        return out

    # ------------------------------------------------------------ checkpoint state (this process's share)
    def state_dict(self) -> dict:
        return {
            "placement": {"world_size": self.placement.world_size, "client_ranks": list(self.placement.client_ranks)},
            "server": state_or_none(self.server and self.server.module),
            "clients": {c.index: {"model": trainable_state(c.model.module)} if c.model is not None else {}
                        for c in self.clients},
            "ledger": self.transport.ledger.state_dict(),
            "guard": self.guard.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["clients"]) != len(self.clients):
            raise ValueError(f"the checkpoint was written by a run with {len(state['clients'])} clients; this run has "
                             f"{len(self.clients)}: resume with num_clients={len(state['clients'])} (the partition, "
                             "the schedule and each client's state depend on it).")
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
            if c.model is not None:
                load_trainable_state(c.model.module, state["clients"][c.index]["model"])
        self.transport.ledger.load_state_dict(state["ledger"])
        self.guard.load_state_dict(state["guard"])
