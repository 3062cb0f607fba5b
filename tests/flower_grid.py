"""A stand-in for Flower's grid that runs the ClientApp of each node in this process (the tests' engine).

Every message goes through Flower's protobuf form and back, as on the wire; each node keeps its own
``Context`` between messages, and nothing else: a ClientApp call starts from the message and that context.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid:
    """``get_node_ids``, ``push_messages`` and ``pull_messages`` of a Flower grid over ``num_nodes`` nodes here."""

    def __init__(self, client_app, num_nodes: int, run_config: dict, fail: dict[int, int] | None = None,
                 offline: dict[int, int] | None = None):
        self.client_app = client_app
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # what Flower's runtime sets
        self.contexts = {101 + i: Context(run_id=1, node_id=101 + i, node_config={}, state=RecordDict(),
                                          run_config=run_config) for i in range(num_nodes)}
        self.fail = fail or {}  # node ID -> the number of its messages after which it answers no more
        self.offline = offline or {}  # the same, and the SuperLink then answers for it: "node unavailable"
        self.count: dict[int, int] = {}
        self.wire_bytes = 0
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return [n for n in self.contexts if self.count.get(n, 0) <= self.offline.get(n, self.count.get(n, 0))]

    def push_messages(self, messages) -> list[str]:
        """Deliver each message to its node's ClientApp now; its answer waits for :meth:`pull_messages`."""
        ids = []
        for i, message in enumerate(messages):
            node = message.metadata.dst_node_id
            self.count[node] = self.count.get(node, 0) + 1
            message.metadata.__dict__["_message_id"] = f"{node}-{self.count[node]}-{i}"
            message.metadata.__dict__["_src_node_id"] = 0
            ids.append(message.metadata.message_id)
            if self.count[node] > self.offline.get(node, self.count[node]):  # the SuperLink's answer, as Flower's
                reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, "the node missed its heartbeats"), reply_to=message)
                reply.metadata.__dict__["_src_node_id"] = 0
                self.replies[message.metadata.message_id] = reply
                continue
            if self.count[node] > self.fail.get(node, self.count[node]):
                continue  # gone: no answer
            wire = message_to_proto(message)
            self.wire_bytes += wire.ByteSize()
            TaskIdentity.node_id = node
            try:
                reply = self.client_app(message_from_proto(wire), self.contexts[node])
            finally:
                TaskIdentity.node_id = 0
            reply.metadata.__dict__["_message_id"] = f"reply-{message.metadata.message_id}"
            wire = message_to_proto(reply)
            self.wire_bytes += wire.ByteSize()
            self.replies[message.metadata.message_id] = message_from_proto(wire)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]
