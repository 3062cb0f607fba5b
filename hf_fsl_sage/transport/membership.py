"""Which processes are still in a run, and a process group re-formed without those that are not.

With ``client_failures="drop"`` under several processes, the server's process declares a client process
*lost* when a message to or from it fails (the process died, or did not answer within ``ddp_timeout``) and
from then on sends it nothing and expects nothing from it. At the end of every global step the processes
agree on who is left through the launcher's rendezvous store (a key-value store every process already
holds, not the process group): each client process checks in, the server's process waits for every member
(up to ``ddp_timeout`` in all) and publishes the members. When they change, the survivors destroy the
process group and form a new one among themselves on the same store, so the collectives of the following
steps (Trainer's logging, evaluation, checkpoints) go on without the lost processes. Process ranks keep
their launch numbering everywhere else (placement, checkpoint files); only the wire uses the new ones.

A lost process that is still alive (it had stalled) finds itself excluded at its next message or check-in
and exits with status 0, after logging why, so that ``accelerate launch`` does not stop the others on its
account. A process that *dies* is seen at once, but a launcher on the same machine stops every process it
started when one of them fails: the run then goes on only on other machines (each machine runs its own
``accelerate launch``). The lost process's clients stay out until the run is restarted.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

import torch.distributed as dist
from transformers.utils import logging

from .base import FederationCommError
from .placement import SERVER_RANK


logger = logging.get_logger(__name__)
_PREFIX = "hf_fsl_sage/membership"


class ProcessDropped(SystemExit):
    """Raised in a process the others went on without: it leaves the run with exit status 0."""

    def __init__(self, message: str):
        super().__init__(0)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Membership:
    """The processes still in the run (by launch rank) and the process group among them.

    Args:
        rank: this process's launch rank.
        world_size: the number of processes launched.
        timeout: how long the server's process waits for a client process to check in.
        store: the rendezvous store (default: the one of the default process group).
    """

    def __init__(self, rank: int, world_size: int, timeout: timedelta, store: dist.Store | None = None):
        self.rank, self.timeout = rank, timeout
        self.members = list(range(world_size))
        self.store = store if store is not None else dist.distributed_c10d._get_default_store()
        self.lost: dict[int, str] = {}  # launch rank -> why it was lost (on the server's process)
        self.backend = dist.get_backend() if dist.is_initialized() else "gloo"
        self._abandoned: list[tuple[dist.Work, object]] = []

    def abandon(self, work: dist.Work, tensor: object) -> None:
        """Keep a transfer given up on (and its tensor, which the backend may still write) until the group goes."""
        self._abandoned.append((work, tensor))

    # ------------------------------------------------------------ ranks
    def is_lost(self, rank: int) -> bool:
        return rank in self.lost or rank not in self.members

    def wire_rank(self, rank: int) -> int:
        """The rank of launch rank ``rank`` in the current process group."""
        return self.members.index(rank)

    # ------------------------------------------------------------ declaring and learning losses
    def lose(self, rank: int, cause: str) -> None:
        """On the server's process: stop talking to ``rank``, and say so in the store at once, so that a
        stalled process that wakes up learns it was left out."""
        if rank == SERVER_RANK or rank in self.lost:
            return
        self.lost[rank] = cause
        self.store.set(f"{_PREFIX}/lost", json.dumps(sorted(self.lost)))
        logger.warning(f"process {rank} is out of the run: {cause}")

    def excluded(self) -> bool:
        """On a client process: whether the server's process declared this one lost."""
        key = f"{_PREFIX}/lost"
        try:
            return self.store.check([key]) and self.rank in json.loads(self.store.get(key))
        except Exception:  # noqa: BLE001 -- the store went with the server's machine: not a drop
            return False

    def leave(self, where: str) -> None:
        """Leave the run: log why, and exit this process with status 0 (:class:`ProcessDropped`)."""
        message = (
            f"process {self.rank} was dropped from the run at {where}: it did not answer the server's process "
            f"within ddp_timeout ({int(self.timeout.total_seconds())} s), and the others went on without its "
            "clients (client_failures='drop'). It exits with status 0 so that the launcher keeps the others "
            "running; restart the run from its last checkpoint to bring its clients back."
        )
        logger.error(message)
        raise ProcessDropped(message)

    def sync(self, step: int, where: str) -> list[int]:
        """Agree on the members at the end of global ``step``; re-form the process group if they changed.

        Returns the launch ranks that left the run at this step (the same list on every process).
        """
        key = f"{_PREFIX}/step{step}"
        if self.rank == SERVER_RANK:
            deadline = time.monotonic() + self.timeout.total_seconds()
            for rank in [r for r in self.members if r != SERVER_RANK and r not in self.lost]:
                remaining = max(deadline - time.monotonic(), 0.001)
                try:
                    self.store.wait([f"{key}/in{rank}"], timedelta(seconds=remaining))
                except Exception:  # noqa: BLE001 -- the store's timeout error type differs by version
                    self.lose(rank, f"it did not reach the end of {where} within ddp_timeout "
                                    f"({int(self.timeout.total_seconds())} s)")
            members = [r for r in self.members if r not in self.lost]
            self.store.set(f"{key}/members", json.dumps(members))
            if step > 1:  # every member has read the previous step's keys
                for old in [f"{_PREFIX}/step{step - 1}/members",
                            *(f"{_PREFIX}/step{step - 1}/in{r}" for r in self.members)]:
                    self.store.delete_key(old)
        else:
            self.store.set(f"{key}/in{self.rank}", "1")
            # The server's process may spend a timeout on each process that stalls before it publishes.
            limit = self.timeout.total_seconds() * (len(self.members) + 1)
            deadline = time.monotonic() + limit
            while not self.store.check([f"{key}/members"]):
                if self.excluded():  # declared lost while stalled: this step's keys may already be gone
                    self.leave(where)
                if time.monotonic() > deadline:
                    raise FederationCommError(
                        f"process {self.rank} did not hear from the server's process at the end of {where} within "
                        f"{int(limit)} s: it stopped or died. Resume from the last checkpoint.")
                try:
                    self.store.wait([f"{key}/members"], timedelta(seconds=1))
                except Exception:  # noqa: BLE001 -- not yet: look again whether this process was left out
                    pass
            members = json.loads(self.store.get(f"{key}/members"))
            if self.rank not in members:
                self.leave(where)
        left = [r for r in self.members if r not in members]
        if left:
            self.members = members
            self._regroup(step)
        return left

    def _regroup(self, step: int) -> None:
        """Destroy the process group and form one among the members, on a fresh prefix of the same store."""
        dist.destroy_process_group()
        self._abandoned.clear()
        dist.init_process_group(self.backend, store=dist.PrefixStore(f"{_PREFIX}/group{step}", self.store),
                                rank=self.wire_rank(self.rank), world_size=len(self.members))
