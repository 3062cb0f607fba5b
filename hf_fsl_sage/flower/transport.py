"""The transport over Flower: the server's process is a ``ServerApp``, each client process a ``ClientApp`` on a
SuperNode, and every message of the protocol rides in a Flower message between them.

Flower lets the server speak first: a SuperNode only answers. So the server's side,
:class:`FlowerServerTransport`, queues what it sends to a node and, when it needs something from that node
(an upload, the end of a global step), sends the queue in one Flower message; the node runs the run's
global steps from where it stopped, as far as it can without a message it has not received (or up to the
next checkpoint), and answers with everything it sent on the way, what its parties reported for each step,
and how far it got. Each direction of each client numbers its messages, so either side knows which message
it is waiting for.

A ``ClientApp`` lives for one message (the deployment engine starts a process per message; the simulation
engine may run the next one in another worker), so the node's side, :class:`FlowerNodeTransport`, stops a
step that needs a message not yet received (:class:`Blocked`), and the node keeps its state at the start
of that step in ``Context.state`` (see :mod:`hf_fsl_sage.flower.node`). The next message replays the step
from there, with the same random draws, resending nothing already sent.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from transformers.trainer_utils import SaveStrategy
from transformers.utils import logging

from ..federation.checkpoint import load_federation_state, save_federation_state, state_file
from ..transport.base import DOWN, UP, FederationCommError, T, Transport, payload_nbytes
from ..transport.placement import Placement
from .records import Item, decode_items, encode_items, state_from_records, state_records


logger = logging.get_logger(__name__)

#: The Flower message type of an exchange between the ServerApp and a node.
MESSAGE_TYPE = "train.hf_fsl_sage"


class Blocked(BaseException):
    """A node's step needs a message the server has not sent yet. Not an ``Exception``: nothing that guards a
    client's own step (see :class:`~hf_fsl_sage.federation.guard.Guard`) may take it for that client's failure."""


class FlowerServerTransport(Transport):
    """The server's side: the ``ServerApp``'s process, rank 0 of ``1 + len(node_ids)`` processes.

    Args:
        grid: the ``ServerApp``'s Flower grid.
        node_ids: the SuperNodes of the run; the node at index ``i`` is process ``i + 1``.
        timeout: seconds to wait for a node's answer before it counts as gone (``ddp_timeout``).
        poll_interval: the longest pause, in seconds, between two looks for answers at the SuperLink (the pause
            starts at 50 ms and grows to it). Flower's ``Grid.send_and_receive`` pauses 3 s between looks.
    """

    def __init__(self, grid: Any, node_ids: list[int], timeout: float, poll_interval: float = 0.5):
        super().__init__()
        self.grid, self.node_ids, self.timeout, self.poll_interval = grid, list(node_ids), timeout, poll_interval
        self.world_size = len(self.node_ids) + 1
        self.placement: Placement | None = None
        self.trainer = None
        ranks = range(1, self.world_size)
        self._outbox: dict[int, list[Item]] = {r: [] for r in ranks}
        self._inbox: dict[int, dict[tuple[int, int], tuple[str, Any]]] = {r: {} for r in ranks}
        self._seq = {UP: defaultdict(int), DOWN: defaultdict(int)}
        self._reports: dict[int, dict[int, dict[str, float]]] = defaultdict(dict)  # step -> client -> result
        self._sums: dict[str, list[tuple[int, torch.Tensor]]] = {"log": [], "time": []}
        self._time_total: torch.Tensor | None = None
        self._done = -1  # the last global step whose reports are all in
        self.position = dict.fromkeys(ranks, 0)  # global steps each node has completed
        self.lost: dict[int, str] = {}  # process -> why it is out of the run
        self._restore: dict[int, Any] = {}  # process -> checkpointed state to hand back
        #: Messages exchanged with the nodes, and where the time of each went (see :meth:`_timed`).
        self.exchanges = 0
        self.timings: list[dict[str, float]] = []

    # ------------------------------------------------------------ set-up
    def place(self, num_clients: int, client_ranks: list[int] | None) -> Placement:
        """The placement of ``num_clients`` clients over the nodes (round-robin unless ``client_ranks``)."""
        self.placement = Placement.build(0, self.world_size, num_clients, client_ranks)
        return self.placement

    def attach(self, trainer: Any) -> None:
        """Serve ``trainer`` (an :class:`~hf_fsl_sage.trainer.FSLSageTrainer` built with this transport)."""
        self.trainer = trainer

    def node_of(self, rank: int) -> str:
        return f"SuperNode {self.node_ids[rank - 1]} (process {rank}, clients {self.placement.clients_of(rank)})"

    # ------------------------------------------------------------ messages
    def _move(self, client_id: int, direction: str, kind: str, payload: T | None) -> T | None:
        rank = self.placement.rank_of(client_id)
        seq = self._seq[direction][client_id]
        self._seq[direction][client_id] += 1
        if rank in self.lost:
            return None  # its node is out of the run: nothing is sent to or expected from it
        if direction == DOWN:
            self._outbox[rank].append((client_id, kind, seq, payload))
            self.ledger.record(DOWN, kind, payload_nbytes(payload))
            return None
        while (client_id, seq) not in self._inbox[rank]:
            self._exchange(self._waiting_with(rank))
            if rank in self.lost:
                return None
        got_kind, received = self._inbox[rank].pop((client_id, seq))
        if got_kind != kind:
            raise FederationCommError(
                f"expected {kind} message {seq} of client {client_id} from {self.node_of(rank)} but got {got_kind} "
                f"({self.context}): the node runs another schedule; start every app with the same code and settings."
            )
        self.ledger.record(UP, kind, payload_nbytes(received))
        return received

    def _from_peer(self, client_id: int, direction: str) -> str | None:
        return self.node_of(self.placement.rank_of(client_id)) if direction == UP else None

    def _waiting_with(self, rank: int) -> list[int]:
        """``rank`` and every other node with messages waiting for it: they are sent in parallel."""
        return sorted({rank} | {r for r, box in self._outbox.items() if box and r not in self.lost})

    def _through(self) -> int:
        """How far a node may run: to the next checkpoint (it saves its state there), at most the last step; under
        a byte budget (``max_comm_bytes``) only the current step, as the budget may stop the run after any step
        and a node that ran ahead would have sent bytes beyond it."""
        state, args = self.trainer.state, self.trainer.args
        step, last = state.global_step, args.max_steps
        if args.max_comm_bytes is not None:
            return min(last, step + 1)
        if args.save_strategy == SaveStrategy.STEPS and state.save_steps:
            return min(last, (step // state.save_steps + 1) * state.save_steps)
        return last

    def _exchange(self, ranks: list[int], through: int | None = None, want_state: bool = False) -> dict[int, Any]:
        """Send each node of ``ranks`` its queued messages and take in its answer; returns the states asked for."""
        through = self._through() if through is None else through
        messages = []
        for rank in ranks:
            meta = {"rank": rank, "world_size": self.world_size, "client_ranks": json.dumps(
                list(self.placement.client_ranks)), "through": through, "want_state": want_state}
            content = RecordDict()
            if rank in self._restore:
                meta["start"] = self.trainer.state.global_step
                content["restore.skeleton"], content["restore.tensors"] = state_records(self._restore.pop(rank))
            content["down.index"], content["down.buffers"] = encode_items(self._outbox[rank])
            self._outbox[rank] = []
            content["meta"] = ConfigRecord(meta)
            messages.append(Message(content, dst_node_id=self.node_ids[rank - 1], message_type=MESSAGE_TYPE))
        self.exchanges += len(messages)
        sent = time.time()
        replies = self._send_and_receive(messages)
        states = {}
        for rank in ranks:
            reply, received = replies.get(self.node_ids[rank - 1], (None, 0.0))
            if reply is None:
                self._lose(rank, f"no answer within {self.timeout:.0f} s (ddp_timeout) at {self.context or 'set-up'}")
            elif reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                self._lose(rank, f"the SuperLink reports its SuperNode offline (no heartbeat) at {self.context}")
            elif reply.has_error():
                self._lose(rank, f"its ClientApp failed at {self.context or 'set-up'}: {reply.error.reason}")
            else:
                states[rank] = self._take(rank, reply.content, want_state)
                self.timings.append(self._timed(reply.content, received - sent))
        return states

    def _send_and_receive(self, messages: list[Message]) -> dict[int, tuple[Message, float]]:
        """Push ``messages`` and pull their answers until all are in or ``timeout`` has passed; returns, by
        destination node, each answer and the time it came in. The SuperLink answers itself, with an error,
        for a node that stopped sending heartbeats."""
        node_of = dict(zip(self.grid.push_messages(messages), (m.metadata.dst_node_id for m in messages)))
        deadline, pause, replies = time.monotonic() + self.timeout, 0.05, {}
        while node_of:
            for reply in self.grid.pull_messages(list(node_of)):
                if (node := node_of.pop(reply.metadata.reply_to_message_id, None)) is not None:
                    replies[node] = reply, time.time()
            if not node_of or time.monotonic() > deadline:
                break
            time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
            pause = min(pause * 1.5, self.poll_interval)
        return replies

    @staticmethod
    def _timed(content: RecordDict, seconds: float) -> dict[str, float]:
        """Where the ``seconds`` of one exchange went: the node's ``start`` (from its ClientApp process's start
        to the message's handling: interpreter, imports, Flower), ``build`` (the trainer and its state), ``steps``
        (training) and ``answer`` (encoding it), and ``flower`` (the rest: queueing and polling at the SuperLink
        and SuperNode, the transfers); ``cpu``: the CPU seconds of the node's process. ``start`` and ``cpu`` are 0
        when the process served earlier messages (the simulation engine's workers)."""
        parts = json.loads(content["meta"].get("seconds", "{}"))
        cpu = float(parts.pop("cpu", 0.0))
        parts = {k: float(parts.get(k, 0.0)) for k in ("start", "build", "steps", "answer")}
        if sum(parts.values()) > seconds:  # the process started before the message was sent: a reused worker
            parts["start"] = cpu = 0.0
        return {"total": seconds, **parts, "flower": max(seconds - sum(parts.values()), 0.0), "cpu": cpu}

    def _take(self, rank: int, content: RecordDict, want_state: bool) -> Any:
        sender = self.node_of(rank)
        try:
            meta = content["meta"]
            position, reports = int(meta["position"]), json.loads(meta["reports"])
        except (KeyError, TypeError, ValueError) as error:
            raise FederationCommError(f"rejected a malformed answer from {sender}: {error}.") from None
        for client, kind, seq, payload in decode_items(content["up.index"], content["up.buffers"], sender):
            if not 0 <= client < len(self.placement.client_ranks) or self.placement.rank_of(client) != rank:
                raise FederationCommError(f"rejected a message from {sender}: it speaks for client {client}, "
                                          "which it does not hold.")
            self._inbox[rank][(client, seq)] = (kind, payload)
        for step, results, log_sums, seconds in reports:
            self._reports[int(step)].update({int(c): r for c, r in results.items()})
            self._sums["log"].append((int(step), torch.tensor(log_sums, dtype=torch.float64)))
            self._sums["time"].append((int(step), torch.tensor(seconds, dtype=torch.float64)))
            seconds = torch.tensor(seconds, dtype=torch.float64)
            self._time_total = seconds if self._time_total is None else self._time_total + seconds
        if position < self.position[rank]:
            raise FederationCommError(f"{sender} went back from global step {self.position[rank]} to {position}.")
        self.position[rank] = position
        if want_state:
            return state_from_records(content["state.skeleton"], content["state.tensors"], f"the state of {sender}")
        return None

    def _lose(self, rank: int, why: str) -> None:
        """A node did not answer: raise, or (``client_failures="drop"``) go on without its clients."""
        clients = self.placement.clients_of(rank)
        if self.trainer.args.client_failures != "drop":
            raise FederationCommError(
                f"{self.node_of(rank)} is gone: {why}. Stopping the run; resume from the last checkpoint, or set "
                "client_failures='drop' to go on without the clients of a node that leaves."
            )
        self.lost[rank] = why
        self._outbox[rank], self._inbox[rank] = [], {}
        self.trainer.federation.guard.lose(clients, count=True)
        logger.warning(f"Going on without {self.node_of(rank)} from {self.context or 'set-up'}; its clients {clients} "
                       f"stay out of the run. Why: {why}")

    # ------------------------------------------------------------ what the trainer asks for
    def step_done(self, step: int) -> dict[int, dict[str, float]]:
        """Wait until every node with a participant in ``step`` has run it; returns what they reported."""
        round_index = self.trainer.schedule.position(step)[0]
        needed = {self.placement.rank_of(c) for c in self.trainer.schedule.participants(round_index)}
        while behind := [r for r in sorted(needed) if r not in self.lost and self.position[r] <= step]:
            before = {r: self.position[r] for r in behind}
            self._exchange(sorted(set(behind) | set(self._waiting_with(behind[0]))))
            if all(r in self.lost or self.position[r] == before[r] for r in behind) and \
                    not any(self._outbox[r] for r in behind):
                raise FederationCommError(f"the nodes {behind} made no progress at {self.context}: they wait for a "
                                          "message the server does not send; start every app with the same code.")
        self._done = step
        return self._reports.pop(step, {})

    def peer_sums(self, name: str, like: torch.Tensor) -> torch.Tensor:
        if name == "time_total":
            return torch.zeros_like(like) if self._time_total is None else self._time_total
        kept, total = [], torch.zeros_like(like)
        for step, values in self._sums[name]:
            if step <= self._done:
                total += values
            else:
                kept.append((step, values))
        self._sums[name] = kept
        return total

    def save_peers(self, directory: str) -> None:
        """Ask each node for its state at this step and write it as that process's share of the checkpoint."""
        live = [r for r in range(1, self.world_size) if r not in self.lost]
        step = self.trainer.state.global_step
        for rank, state in self._exchange(live, through=step, want_state=True).items():
            if self.position[rank] != step:
                raise FederationCommError(f"{self.node_of(rank)} is at global step {self.position[rank]}, not at the "
                                          f"checkpoint's {step}.")
            save_federation_state(state, directory, self._placement_of(rank))

    def load_peers(self, directory: str) -> None:
        """Read each node's share of checkpoint ``directory``; it goes to the node with its next message."""
        for rank in range(1, self.world_size):
            placement = self._placement_of(rank)
            if not os.path.isfile(state_file(directory, placement)):
                raise FileNotFoundError(f"{directory} has no state of process {rank}: resume a Flower run with the "
                                        "number of SuperNodes that wrote the checkpoint.")
            self._restore[rank] = load_federation_state(directory, placement, torch.device("cpu"))
            self.position[rank] = self.trainer.state.global_step

    def _placement_of(self, rank: int) -> Placement:
        return Placement(rank, self.world_size, self.placement.client_ranks)


class FlowerNodeTransport(Transport):
    """A node's side: process ``rank`` of ``world_size``, inside a ``ClientApp``.

    It sends by queueing (what was already sent before a replay is not sent again) and receives from what the
    server's message brought, raising :class:`Blocked` when the message it needs has not come yet.
    """

    def __init__(self, rank: int, world_size: int):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.placement: Placement | None = None
        self.seq = {UP: defaultdict(int), DOWN: defaultdict(int)}  # next message of each client, per direction
        self.sent: dict[int, int] = defaultdict(int)  # messages of each client already sent to the server
        self.inbox: dict[tuple[int, int], Item] = {}  # (client, seq) -> received message not yet used for good
        self.outbox: list[Item] = []

    def place(self, num_clients: int, client_ranks: list[int] | None) -> Placement:
        self.placement = Placement.build(self.rank, self.world_size, num_clients, client_ranks)
        return self.placement

    def _move(self, client_id: int, direction: str, kind: str, payload: T | None) -> T | None:
        if not self.placement.holds_client(client_id):
            return None
        seq = self.seq[direction][client_id]
        if direction == UP:
            self.seq[UP][client_id] += 1
            if seq >= self.sent[client_id]:  # a replayed step does not send its messages again
                self.outbox.append((client_id, kind, seq, payload))
                self.sent[client_id] = seq + 1
            return None
        if (client_id, seq) not in self.inbox:
            raise Blocked(f"client {client_id} waits for {kind} message {seq}")
        _, got_kind, _, received = self.inbox[(client_id, seq)]
        if got_kind != kind:
            raise FederationCommError(f"expected {kind} message {seq} of client {client_id} from the server but got "
                                      f"{got_kind} ({self.context}): start every app with the same code and settings.")
        self.seq[DOWN][client_id] += 1
        return received

    def _from_peer(self, client_id: int, direction: str) -> str | None:
        return "the server (ServerApp)" if direction == DOWN else None

    def counters(self) -> dict[str, Any]:
        """Where each client's messages stand (saved with the node's state)."""
        return {"up": dict(self.seq[UP]), "down": dict(self.seq[DOWN]), "sent": dict(self.sent)}

    def load_counters(self, saved: dict[str, Any]) -> None:
        self.seq = {UP: defaultdict(int, saved["up"]), DOWN: defaultdict(int, saved["down"])}
        self.sent = defaultdict(int, saved["sent"])

    def forget_used(self) -> None:
        """Drop received messages that a completed step used."""
        self.inbox = {key: item for key, item in self.inbox.items() if item[2] >= self.seq[DOWN][item[0]]}
