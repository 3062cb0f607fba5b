"""The process groups of a multi-process run: gloo for control, the launch's backend for tensors.

*Control* is a gloo group over the processes in the run, on CPU tensors: the header of every message (its
kind, client and tensor layout), the sums behind the logged metrics, the communication budget and the
checkpoint barrier. gloo behaves the same on every machine: ``work.wait(timeout)`` blocks the calling thread
until the bytes have moved or the timeout passes, a dead peer breaks its connection at once, and no watchdog
stops the process. Every wait of this package passes its own timeout (``ddp_timeout``); the group's own
timeout is a backstop beyond all of them (:func:`group_timeout`), because a gloo transfer that reaches it
closes every connection of the group, and a transfer given up on stays posted until the group is formed
again.

*Data* carries the payload of every message (activations, gradients, weights) on this process's device, on
the launch's backend: NCCL on GPUs, gloo on CPUs. NCCL differs from gloo in three ways that matter here
(PyTorch's ``Work.wait`` and ``init_process_group`` documentation, and its ProcessGroupNCCL environment
variables page): ``work.wait()`` without a timeout only makes the current CUDA stream wait and returns at once;
communicators are formed lazily, at the first operation, unless the group is bound to a device
(``device_id``); and a watchdog thread takes the whole process down once an operation has been pending for the
group's timeout (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, default 3). So the data group is

- bound to this process's own device, which also keeps every process on its own GPU once the group is formed
  again with new ranks (without it NCCL guesses a device from the rank);
- waited on by polling ``work.is_completed()`` until the caller's deadline, never by ``wait()`` alone
  (:func:`complete`);
- given the same backstop as its own timeout (:func:`group_timeout`), so that a failed transfer is reported,
  or its process dropped, by this package before NCCL's watchdog acts;
- used only right after the peer has answered on the control group: a message's payload follows its header,
  and the group is connected at formation (one byte between the server's process and each client process)
  rather than at the first payload.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist
from transformers.utils import logging

from .placement import SERVER_RANK


logger = logging.get_logger(__name__)

#: The shortest backstop (:func:`group_timeout`): PyTorch's default timeout for gloo.
MIN_GROUP_TIMEOUT = timedelta(minutes=30)
_POLL_FIRST, _POLL_MAX = 1e-5, 2e-3  # seconds between two looks at a transfer: doubling from the first to the max


def launch_backend() -> str:
    """The backend the launcher initialised (``nccl`` on GPUs, ``gloo`` on CPUs): the data group's."""
    return dist.get_backend()


def group_timeout(timeout: timedelta, world_size: int) -> timedelta:
    """The groups' own timeout, a backstop longer than any wait of this package (``timeout``: ``ddp_timeout``).

    A client process waits up to ``timeout * (world_size + 1)`` for the server's process, which may spend a
    timeout on each process that stalls before it gets to this one (``client_failures="drop"``). A transfer the
    server's process gave up on stays posted until the group is formed again at the end of the step: later by
    at most a timeout per other stalled process and one for the check-ins. Two more cover the rest of the step.
    Never less than :data:`MIN_GROUP_TIMEOUT`: on gloo the helper thread still waiting for a transfer given up on
    wakes at this timeout, and one that wakes while the process exits aborts it (SIGABRT, after a finished run).
    """
    return max(timeout * (world_size + 3), MIN_GROUP_TIMEOUT)


def waits_block(backend: str) -> bool:
    """Whether ``work.wait()`` on ``backend`` blocks the calling thread until the transfer is done (gloo does)."""
    return backend == "gloo"


def complete(work: dist.Work, seconds: float) -> bool:
    """Whether ``work`` completed within ``seconds``, looking at it without blocking; raises what it raised.

    Once complete, ``work.wait()`` orders the current stream after the transfer (NCCL) and raises its error.
    """
    deadline = time.monotonic() + seconds
    pause = _POLL_FIRST
    while not work.is_completed():
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(2 * pause, _POLL_MAX)
    work.wait()
    return True


class ProcessGroups:
    """The control and data groups over the current default process group (formed again after a regroup).

    Args:
        device: this process's device; the data group is bound to it when it is a GPU.
        timeout: ``ddp_timeout``: the bound of every wait, and the unit of the groups' own timeout.
        backend: the data group's backend (default: the launch's, :func:`launch_backend`).
    """

    def __init__(self, device: torch.device, timeout: timedelta, backend: str | None = None):
        self.device, self.timeout = device, timeout
        self.backend = backend or launch_backend()
        self.control: dist.ProcessGroup | None = None
        self.data: dist.ProcessGroup | None = None

    @property
    def data_waits_block(self) -> bool:
        return waits_block(self.backend)

    def form(self) -> None:
        """Create both groups over every process of the default group (all of them call it, in the same order)
        and connect the data group between the server's process and each client process."""
        backstop = group_timeout(self.timeout, dist.get_world_size())
        self.control = dist.new_group(backend="gloo", timeout=backstop)
        bound = self.device if self.device.type == "cuda" else None
        self.data = dist.new_group(backend=self.backend, timeout=backstop, device_id=bound)
        self._connect()

    def _connect(self) -> None:
        """One byte between the server's process and each other process, on the data group, each after a hello on
        the control group: a peer that is not there fails on gloo, within the timeout, instead of leaving an NCCL
        connection (formed at its first use) waiting for it."""
        rank, seconds = dist.get_rank(), self.timeout.total_seconds()
        peers = range(1, dist.get_world_size()) if rank == SERVER_RANK else [SERVER_RANK]
        for peer in peers:
            hello = torch.zeros(1, dtype=torch.uint8)
            post = dist.irecv if rank == SERVER_RANK else dist.isend
            post(hello, peer, group=self.control).wait(self.timeout)
            work = post(torch.zeros(1, dtype=torch.uint8, device=self.device), peer, group=self.data)
            if self.data_waits_block:
                work.wait(self.timeout)
            elif not complete(work, seconds):
                raise TimeoutError(f"process {peer} did not connect on the data group within {seconds:.0f} s")

    def release(self, abort: bool = False) -> None:
        """Forget both groups before the default group is destroyed (which takes them with it).

        ``abort``: transfers given up on are still posted on the data group. On a backend whose ``wait`` does not
        block (NCCL) destroying the group would wait for them, and its watchdog would take the process down at
        the group's timeout, so the group is aborted first (PyTorch's ``_abort_process_group``).
        """
        if abort and not self.data_waits_block and self.data is not None:
            try:
                dist.distributed_c10d._abort_process_group(self.data)
            except Exception as error:  # noqa: BLE001 -- destroying the group is the fallback
                logger.warning(f"could not abort the data group ({error}); destroying it instead.")
        self.control = self.data = None
