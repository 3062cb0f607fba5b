"""Which processes are still in a run, and a process group re-formed without those that are not.

With ``client_failures="drop"`` under several processes, the server's process declares a client process
*lost* when a message to or from it fails (the process died, or did not answer within ``ddp_timeout``) and
from then on sends it nothing and expects nothing from it. At the end of every global step the processes
agree on who is left through the launcher's rendezvous store (a key-value store every process already
holds, not the process group): each client process checks in, the server's process waits for every member
(up to ``ddp_timeout`` in all) and publishes the members. When they change, the survivors destroy the
process group and form a new one among themselves on the same store, so the collectives of the following
steps (Trainer's logging, evaluation, checkpoints) go on without the lost processes; the control and data
groups (:mod:`~hf_fsl_sage.transport.groups`) are formed again over it. Process ranks keep their launch
numbering everywhere else (placement, checkpoint files); only the wire uses the new ones. On GPUs the new
group is bound to each process's own GPU (``device_id``): its new rank is no longer its GPU's index.

A lost process that is still alive (it had stalled) finds itself excluded at its next message or check-in
and exits with status 0, after logging why, so that ``accelerate launch`` does not stop the others on its
account. A process that *dies* is seen at once (its connection breaks); its launcher then stops every
process it started, so the server's process drops all of that launch's processes together (each records
its launch in the store). The run therefore goes on only when the dead process ran on another machine than
the server's (each machine runs its own ``accelerate launch``). The lost processes' clients stay out until
the run is restarted.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from transformers.utils import logging

from .base import FederationCommError
from .groups import ProcessGroups
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
        machine: which launch (machine) started this process (default: the launcher's ``GROUP_RANK``).
        groups: the control and data groups, formed again with the process group.
    """

    def __init__(self, rank: int, world_size: int, timeout: timedelta, store: dist.Store | None = None,
                 machine: str | None = None, groups: ProcessGroups | None = None):
        self.rank, self.timeout, self.groups = rank, timeout, groups
        self.members = list(range(world_size))
        self.store = store if store is not None else dist.distributed_c10d._get_default_store()
        self.store.set(f"{_PREFIX}/machine{rank}", machine if machine is not None else os.environ.get("GROUP_RANK",
                                                                                                        "0"))
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
    def lose(self, rank: int, cause: str, died: bool = False) -> None:
        """On the server's process: stop talking to ``rank``, and say so in the store at once, so that a
        stalled process that wakes up learns it was left out.

        ``died``: its connection broke (rather than timed out). Its launcher then stops every process it
        started, so those on its machine are lost too, at once, rather than one by one as they go.
        """
        if rank == SERVER_RANK or rank in self.lost:
            return
        self.lost[rank] = cause
        self.store.set(f"{_PREFIX}/lost", json.dumps(sorted(self.lost)))
        logger.warning(f"process {rank} is out of the run: {cause}")
        machine = self._machine(rank)
        if died and machine is not None and machine != self._machine(SERVER_RANK):
            for other in [r for r in self._survivors() if r != SERVER_RANK and self._machine(r) == machine]:
                self.lose(other, f"its launcher stops it: process {rank}, started by the same launch (machine "
                                 f"{machine}), died")

    def _machine(self, rank: int) -> str | None:
        key = f"{_PREFIX}/machine{rank}"
        return self.store.get(key).decode() if self.store.check([key]) else None

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
            f"process {self.rank} was dropped from the run at {where}: the server's process declared it lost (it "
            f"did not answer within ddp_timeout, {int(self.timeout.total_seconds())} s, or a process of its launch "
            "died; the server's log says which), and the others went on without its clients "
            "(client_failures='drop'). It exits with status 0 so that the launcher keeps the others "
            "running; restart the run from its last checkpoint to bring its clients back."
        )
        logger.error(message)
        raise ProcessDropped(message)

    def sync(self, step: int, where: str) -> list[int]:
        """Agree on the members at the end of global ``step``; re-form the process group if they changed.

        Returns the launch ranks that left the run at this step (the same list on every process).
        """
        key, before = f"{_PREFIX}/step{step}", list(self.members)
        if self.rank == SERVER_RANK:
            self._await(key, "in", f"it did not reach the end of {where}")
            self.store.set(f"{key}/members", json.dumps(self._survivors()))
            if step > 1:  # every member has read the previous step's keys
                for old in [f"{_PREFIX}/step{step - 1}/members",
                            *(f"{_PREFIX}/step{step - 1}/in{r}" for r in before)]:
                    self.store.delete_key(old)
        else:
            self.store.set(f"{key}/in{self.rank}", "1")
            self._first([f"{key}/members"], where)
        self._adopt(f"{key}/members", where)
        if self.members != before:
            self._regroup(key, where)
        return [r for r in before if r not in self.members]

    # ------------------------------------------------------------ re-forming the group
    def _regroup(self, key: str, where: str) -> None:
        """Form a process group among the members, on a fresh prefix of the same store.

        Every member says it is ready, the server's process says go, and all join; a member that is not
        ready within the timeout is left out, and one that dies while the group forms makes every join time
        out: then the next attempt finds out who is left.
        """
        for attempt in itertools.count():
            prefix = f"{key}/group{attempt}"
            if attempt:  # who is left after the last attempt
                if self.rank == SERVER_RANK:
                    self.store.set(f"{prefix}/members", json.dumps(self._survivors()))
                else:
                    self._first([f"{prefix}/members"], where)
                self._adopt(f"{prefix}/members", where)
            if self.rank == SERVER_RANK:
                lost_before = set(self.lost)
                self._await(prefix, "ready", f"it did not join the process group formed at the end of {where}")
                if set(self.lost) != lost_before:
                    continue
                self.store.set(f"{prefix}/go", "1")
            else:
                self.store.set(f"{prefix}/ready{self.rank}", "1")
                if self._first([f"{prefix}/go", f"{key}/group{attempt + 1}/members"], where) != f"{prefix}/go":
                    continue
            if self._join(prefix):
                return

    def _join(self, prefix: str) -> bool:
        """Leave the current process group and join the members' under ``prefix``; False if that timed out."""
        self._leave_group()
        device = self.groups.device if self.groups is not None else None
        try:
            dist.init_process_group(self.backend, store=dist.PrefixStore(prefix, self.store),
                                    rank=self.wire_rank(self.rank), world_size=len(self.members),
                                    timeout=self.timeout, device_id=device if self._binds(device) else None)
            if self.groups is not None:
                self.groups.form()
            return True
        except Exception as error:  # noqa: BLE001 -- a member died between go and joining
            logger.warning(f"process {self.rank} could not join the new process group ({error}); trying again.")
            self._leave_group()
            return False

    def _binds(self, device: torch.device | None) -> bool:
        """Whether the group is bound to ``device``: this process's own GPU, whatever its new rank (NCCL would
        otherwise pick a GPU from the rank), and the communicator forms at once instead of at the first use."""
        return device is not None and device.type == "cuda" and self.backend == "nccl"

    def _leave_group(self) -> None:
        if dist.is_initialized():
            if self.groups is not None:
                self.groups.release(abort=bool(self._abandoned))
            dist.destroy_process_group()
        self._abandoned.clear()

    # ------------------------------------------------------------ store helpers
    def _survivors(self) -> list[int]:
        return [r for r in self.members if r not in self.lost]

    def _adopt(self, key: str, where: str) -> None:
        """Take the members published under ``key``; leave if this process is not among them."""
        members = json.loads(self.store.get(key))
        if self.rank not in members:
            self.leave(where)
        self.members = members

    def _await(self, prefix: str, tag: str, why: str) -> None:
        """On the server's process: wait up to the timeout, in all, for every other member's ``prefix/tag<rank>``
        key; declare lost those that do not set it."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        for rank in [r for r in self._survivors() if r != SERVER_RANK]:
            try:
                self.store.wait([f"{prefix}/{tag}{rank}"], timedelta(seconds=max(deadline - time.monotonic(), 1e-3)))
            except Exception:  # noqa: BLE001 -- the store's timeout error type differs by version
                self.lose(rank, f"{why} within ddp_timeout ({int(self.timeout.total_seconds())} s)")

    def _first(self, keys: list[str], where: str) -> str:
        """On a client process: the first of ``keys`` the server's process sets. It may spend a timeout on each
        process that stalls first; leave if it declares this one lost meanwhile (whose keys may be gone)."""
        limit = self.timeout.total_seconds() * (len(self.members) + 1)
        deadline = time.monotonic() + limit
        while True:
            found = [key for key in keys if self.store.check([key])]
            if found:
                # The server's process sets earlier keys first, and may set a later one between two checks here:
                # the earliest key set, looked at again, is the answer.
                return next(key for key in keys if self.store.check([key]))
            if self.excluded():
                self.leave(where)
            if time.monotonic() > deadline:
                raise FederationCommError(
                    f"process {self.rank} did not hear from the server's process at the end of {where} within "
                    f"{int(limit)} s: it stopped or died. Resume from the last checkpoint.")
            try:
                self.store.wait([keys[0]], timedelta(seconds=0.2 if len(keys) > 1 else 1))
            except Exception:  # noqa: BLE001 -- not yet: look again
                pass
