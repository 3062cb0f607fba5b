"""A process-group backend with NCCL's semantics over gloo, for CPU tests: ``import tests.nccl_like`` registers it
as ``nccl_like`` (point-to-point transfers only, all the data group carries).

What it copies from ProcessGroupNCCL (PyTorch's ``Work.wait`` and ``init_process_group`` documentation, and its
NCCL environment variables page):

- ``work.wait()`` returns at once: on NCCL it only makes the current CUDA stream wait. The transfer completes
  in the background and ``work.is_completed()`` says when; a received tensor read before then holds stale
  values, as a host read racing the stream would.
- Connections form lazily: the first transfer between two processes blocks the calling thread until the other
  posts one too (NCCL forms the pair's communicator there), with no timeout.
- A watchdog takes the process down (SIGABRT, after printing ``nccl_like watchdog``) once a transfer has been
  pending for the group's timeout, as ``TORCH_NCCL_ASYNC_ERROR_HANDLING``'s default does. ``abort()`` (what
  ``_abort_process_group`` calls) drops the pending transfers first.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist


NAME = "nccl_like"
_WATCH_EVERY = 0.2  # seconds


class NcclLikeWork(dist.Work):
    """A transfer whose ``wait()`` returns at once; a thread waits for the real (gloo) one."""

    def __init__(self, inner: dist.Work, group: NcclLikeGroup, what: str):
        super().__init__()
        self.inner, self.group, self.what, self.posted = inner, group, what, time.monotonic()
        self.done, self.error = threading.Event(), None
        group.pending.add(self)
        threading.Thread(target=self._finish, daemon=True).start()

    def _finish(self) -> None:
        try:
            self.inner.wait()
        except Exception as error:  # noqa: BLE001 -- raised by wait() once the caller looks
            self.error = error
        self.group.pending.discard(self)
        self.done.set()

    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        if self.done.is_set() and self.error is not None:
            raise self.error
        return True  # NCCL: the stream waits, the host goes on

    def is_completed(self) -> bool:
        return self.done.is_set()


class NcclLikeGroup(dist.ProcessGroup):
    def __init__(self, store: dist.Store, rank: int, size: int, timeout: timedelta):
        super().__init__(rank, size)
        self.store, self.timeout = store, timeout
        self.inner = dist.ProcessGroupGloo(store, rank, size, timedelta(days=1))  # only the watchdog times out
        self.connected: set[int] = set()
        self.pending: set[NcclLikeWork] = set()
        threading.Thread(target=self._watchdog, daemon=True).start()

    def getBackendName(self) -> str:
        return NAME

    def _set_group_name(self, name: str) -> None:  # a Python group holds its name itself (no C++ backend to)
        self._name = name

    @property
    def group_name(self) -> str:
        return self._name

    def _connect(self, peer: int) -> None:
        """Block until ``peer`` posts its first transfer with this process too (no timeout, as NCCL)."""
        if peer in self.connected:
            return
        pair = f"connect/{min(self.rank(), peer)}-{max(self.rank(), peer)}"
        self.store.set(f"{pair}/{self.rank()}", "1")
        self.store.wait([f"{pair}/{peer}"], timedelta(days=1))
        self.connected.add(peer)

    def send(self, tensors, dst: int, tag: int):
        self._connect(dst)
        return NcclLikeWork(self.inner.send(tensors, dst, tag), self, f"send to {dst}")

    def recv(self, tensors, src: int, tag: int):
        self._connect(src)
        return NcclLikeWork(self.inner.recv(tensors, src, tag), self, f"recv from {src}")

    def abort(self) -> None:
        print(f"[rank {self.rank()}] nccl_like: aborted with {len(self.pending)} pending transfer(s)", file=sys.stderr,
              flush=True)
        self.pending.clear()

    def _watchdog(self) -> None:
        while True:
            time.sleep(_WATCH_EVERY)
            for work in list(self.pending):
                if time.monotonic() - work.posted > self.timeout.total_seconds():
                    print(f"[rank {self.rank()}] nccl_like watchdog: {work.what} timed out after "
                          f"{self.timeout.total_seconds():.0f} s; taking the process down", file=sys.stderr,
                          flush=True)
                    os.abort()


def _create(store: dist.Store, rank: int, size: int, timeout: timedelta) -> NcclLikeGroup:
    return NcclLikeGroup(store, rank, size, timeout)


if NAME not in dist.Backend.backend_list:
    dist.Backend.register_backend(NAME, _create, devices=["cpu"])
