"""A node's share of the run, one Flower message at a time.

Every message, the ``ClientApp`` builds the node's trainer (the same :class:`~hf_fsl_sage.trainer.FSLSageTrainer`
as every other process of the run, with a :class:`~hf_fsl_sage.flower.transport.FlowerNodeTransport`), loads
the node's state from ``Context.state`` (or from a checkpoint the server hands back), and runs the run's
global steps with ``training_step``, as Trainer would, until it reaches the step the server allowed or a step
needs a message that has not come. That step is undone (the state taken at its start is loaded back) and
replayed with the next message. The node's state, what it sent, and what it reported for each completed step
go back in the answer; its state also stays in ``Context.state`` for the next message.
"""

from __future__ import annotations

import json
import time
from typing import Any

import psutil
from flwr.app import ConfigRecord, Context, Message, RecordDict

from ..federation import state_io
from ..federation.schedule import GlobalStepDataset
from ..timing import time_vector
from ..transport.base import FederationCommError
from .records import decode_items, encode_items, state_from_records, state_records
from .transport import Blocked, FlowerNodeTransport


SERVER = "the server (ServerApp)"


def cloned(state: Any) -> Any:
    """A copy of ``state`` that shares no tensor with it."""
    skeleton, tensors = state_io.encode_state(state)
    return state_io.decode_state(skeleton, {name: t.clone() for name, t in tensors.items()})


class NodeRunner:
    """Runs a node's trainer over the global steps, stopping before a step that waits for the server."""

    def __init__(self, trainer: Any, transport: FlowerNodeTransport):
        self.trainer, self.transport = trainer, transport
        trainer.create_optimizer_and_scheduler(num_training_steps=trainer.args.max_steps)
        self.steps = GlobalStepDataset(trainer.schedule, trainer.train_dataset, trainer.data_collator)
        self.position = 0  # global steps completed

    # ------------------------------------------------------------ state
    def load(self, state: dict[str, Any], position: int) -> None:
        """Continue from ``state`` (:meth:`~hf_fsl_sage.trainer.FSLSageTrainer.process_state`) at ``position``."""
        self.trainer.load_process_state(state)
        guard = self.trainer.federation.guard
        self.trainer._guard_seen = [guard.skipped_updates, guard.dropped_clients]  # reported before this message
        self.position = position

    def save(self, records: RecordDict) -> None:
        """Keep the node's state in ``records`` (``Context.state``)."""
        transport = self.transport
        records["node.skeleton"], records["node.tensors"] = state_records(self.trainer.process_state())
        records["node.inbox.index"], records["node.inbox.buffers"] = encode_items(list(transport.inbox.values()))
        records["node.meta"] = ConfigRecord({"position": self.position, "counters": json.dumps(transport.counters())})

    def restore(self, records: RecordDict) -> bool:
        """Continue from what :meth:`save` kept in ``records``; False if it holds nothing."""
        if "node.meta" not in records:
            return False
        meta = records["node.meta"]
        self.load(state_from_records(records["node.skeleton"], records["node.tensors"], "the node's saved state"),
                  int(meta["position"]))
        self.transport.load_counters(_int_keys(json.loads(meta["counters"])))
        self.receive(decode_items(records["node.inbox.index"], records["node.inbox.buffers"], "the node's state"))
        return True

    def receive(self, items: list) -> None:
        for item in items:
            if not self.trainer.placement.holds_client(item[0]):
                raise FederationCommError(f"rejected a message from {SERVER} for client {item[0]}, which this node "
                                          "does not hold.")
            self.transport.inbox[(item[0], item[2])] = item

    # ------------------------------------------------------------ steps
    def run(self, through: int) -> list[list[Any]]:
        """Run global steps up to ``through`` (exclusive) or until one waits; returns a report per step run:
        ``[step, {client: results}, log sums, seconds per part]``."""
        trainer, transport, reports = self.trainer, self.transport, []
        while self.position < min(through, trainer.args.max_steps):
            start = cloned(trainer.process_state()), json.loads(json.dumps(transport.counters()))
            try:
                trainer.training_step(trainer.split, self.steps[self.position])
            except Blocked:  # undo the step; what it sent stays sent
                trainer.load_process_state(start[0])
                transport.load_counters({**_int_keys(start[1]), "sent": dict(transport.sent)})
                break
            trainer.lr_scheduler.step()  # what Trainer does after each step
            held = {c: dict(r) for c, r in trainer.step_results.items() if trainer.placement.holds_client(c)}
            reports.append([self.position, held, trainer.log_sums()[1].tolist(),
                            time_vector(trainer.federation.timer.pop()).tolist()])
            self.position += 1
            transport.forget_used()
        return reports


def _int_keys(counters: dict[str, dict[str, int]]) -> dict[str, dict[int, int]]:
    return {name: {int(c): n for c, n in values.items()} for name, values in counters.items()}


def handle(message: Message, context: Context, make_trainer) -> Message:
    """Answer one exchange of the server (see :mod:`hf_fsl_sage.flower.transport`)."""
    began = time.time()
    seconds = {"start": began - psutil.Process().create_time()}
    content = message.content
    meta = content["meta"]
    transport = FlowerNodeTransport(int(meta["rank"]), int(meta["world_size"]))
    trainer = make_trainer(context, transport)
    if list(trainer.placement.client_ranks) != json.loads(meta["client_ranks"]):
        raise FederationCommError(f"this node places the clients on processes {list(trainer.placement.client_ranks)},"
                                  f" the server on {json.loads(meta['client_ranks'])}: give every app the same "
                                  "num_clients and client_ranks.")
    runner = NodeRunner(trainer, transport)
    if "restore.skeleton" in content:  # resuming from a checkpoint
        runner.load(state_from_records(content["restore.skeleton"], content["restore.tensors"], f"{SERVER}'s "
                                       "checkpoint"), int(meta["start"]))
    else:
        runner.restore(context.state)
    runner.receive(decode_items(content["down.index"], content["down.buffers"], SERVER))
    seconds["build"] = time.time() - began
    reports = runner.run(int(meta["through"]))
    seconds["steps"] = time.time() - began - seconds["build"]
    runner.save(context.state)
    reply = RecordDict()
    reply["up.index"], reply["up.buffers"] = encode_items(transport.outbox)
    if meta["want_state"]:
        reply["state.skeleton"], reply["state.tensors"] = state_records(trainer.process_state())
    seconds["answer"] = time.time() - began - seconds["build"] - seconds["steps"]
    seconds["cpu"] = time.process_time()  # of the ClientApp's process since it started
    reply["meta"] = ConfigRecord({"position": runner.position, "reports": json.dumps(reports),
                                  "seconds": json.dumps(seconds)})
    return Message(reply, reply_to=message)
