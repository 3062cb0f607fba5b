"""Waiting for the main process without a collective deadline.

Some phases run on process 0 alone: a recipe's central pre-training and centralized reference, the evaluation
of the global model (which lives with the server), generation. At GPT-2 medium scale they can outlast any
timeout a collective would be given (``ddp_timeout``, 30 minutes by default; on GPUs NCCL's watchdog then
takes the waiting processes down). So the other processes do not wait for them in a collective: process 0
sets a key in the launch's rendezvous store when it is done (with a JSON value for the others), and they look
for it with no deadline, saying in the log every few minutes that they are still waiting.

Waiting without a deadline cannot hang on a dead process 0: on its machine, its launcher stops the other
processes when it dies; on another machine, the store (served by process 0's launch) goes with it and the
waiting process raises :class:`~hf_fsl_sage.transport.base.FederationCommError`. An error raised in process 0
during the phase is published too, so the others stop with it instead of waiting.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from transformers.utils import logging

from .base import FederationCommError
from .placement import SERVER_RANK


logger = logging.get_logger(__name__)
_PREFIX = "hf_fsl_sage/main"
_LOOK = timedelta(seconds=1)  # how long one look at the store waits for the key
_SAY_AFTER = (60.0, 600.0)  # seconds of waiting before the first "still waiting" line, and between the next ones


class ProcessZero:
    """What process 0 tells the other processes through the store; they wait for it without a deadline.

    Every process calls the same methods in the same order (keys are numbered per description). By default the
    store, rank and number of processes are the current default process group's, read at each call (they
    change when the group is formed again without a lost process).
    """

    def __init__(self, store: dist.Store | None = None, rank: int | None = None, world_size: int | None = None):
        self._store, self._rank, self._world_size = store, rank, world_size
        self._calls: Counter = Counter()

    @property
    def store(self) -> dist.Store:
        return self._store if self._store is not None else dist.distributed_c10d._get_default_store()

    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else dist.get_rank()

    @property
    def world_size(self) -> int:
        return self._world_size if self._world_size is not None else dist.get_world_size()

    def _key(self, desc: str) -> str:
        self._calls[desc] += 1
        return f"{_PREFIX}/{desc}/{self._calls[desc]}"

    def share(self, obj: Any, desc: str) -> Any:
        """``obj`` (JSON-serialisable, given on process 0) on every process; the last reader deletes the key."""
        store, key = self.store, self._key(desc)
        if self.rank == SERVER_RANK:
            store.set(key, json.dumps({"value": obj}))
            return obj
        message = json.loads(self._await(store, key, desc).decode())
        if store.add(f"{key}/read", 1) == self.world_size - 1:
            store.delete_key(key)
            store.delete_key(f"{key}/read")
        if "error" in message:
            raise FederationCommError(f"process 0 failed during {desc}, so process {self.rank} stops too: "
                                      f"{message['error']}")
        return message["value"]

    def fail(self, error: BaseException, desc: str) -> None:
        """On process 0, instead of :meth:`share`: the others raise with ``error``'s line instead of waiting on."""
        self.store.set(self._key(desc), json.dumps({"error": f"{type(error).__name__}: {str(error)[:500]}"}))

    @contextmanager
    def first(self, desc: str) -> Iterator[None]:
        """Run the block on process 0, then on the others (they wait for process 0 without a deadline)."""
        if self.rank != SERVER_RANK:
            self.share(None, desc)
            yield
            return
        try:
            yield
        except BaseException as error:
            self.fail(error, desc)
            raise
        self.share(None, desc)

    def _await(self, store: dist.Store, key: str, desc: str) -> bytes:
        """The value of ``key`` once process 0 sets it, however long that takes."""
        started = said = time.monotonic()
        pause = _SAY_AFTER[0]
        while True:
            try:
                if store.check([key]):
                    return store.get(key)
                store.wait([key], _LOOK)
            except dist.DistStoreError:  # this look timed out: look again
                pass
            except dist.DistError as error:  # the store is gone: so is process 0's launch
                raise FederationCommError(
                    f"process {self.rank} lost the launch's store while waiting for process 0 ({desc}): process 0 "
                    f"or its machine stopped. Resume from the last checkpoint. [{error}]") from None
            if time.monotonic() - said >= pause:
                said, pause = time.monotonic(), _SAY_AFTER[1]
                logger.warning(f"process {self.rank} still waiting for process 0 ({desc}) after "
                               f"{(said - started) / 60:.0f} min (no deadline)")


_default = ProcessZero()  # over the default process group: the functions below


def share_json(obj: Any, desc: str) -> Any:
    """:meth:`ProcessZero.share` over the default process group."""
    return _default.share(obj, desc)


def share_error(error: BaseException, desc: str) -> None:
    """:meth:`ProcessZero.fail` over the default process group."""
    _default.fail(error, desc)


def main_process_first(desc: str) -> contextlib.AbstractContextManager:
    """:meth:`~transformers.TrainingArguments.main_process_first` without its barrier's deadline: the block runs on
    process 0, then on the others, which wait for process 0 on the store (one process: the block just runs)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return contextlib.nullcontext()
    return _default.first(desc)
