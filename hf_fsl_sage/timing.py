"""Where the time of a federated split run goes: exclusive wall time per part of a step, per process.

A :class:`StepTimer` times named sections (``with timer("server_step"): ...``).
Sections nest; each is charged its *exclusive* time (a nested section's time
goes to the nested one only), so the parts add up to the time spent in them.
On a GPU the current CUDA stream is synchronised at both ends of a section, so
queued kernels are charged where they were launched. Only that stream: NCCL runs
its transfers on streams of its own, and a transfer given up on (its peer
stopped) must not hold up the rest of the step, which synchronising the whole
device would.

Parts timed by the trainer (the keys of :data:`PARTS`): the client's forward
pass, its auxiliary model's forward pass, the rest of the client's half of a
step (backward passes through the auxiliary model and the client, optimizer
step), the client's half after a server reply (SplitFed's backward), the
server's step, the alignment, the held-out gradient cosine (a diagnostic, see
``aux_heldout_cosine``), encoding and decoding activations, and moving
messages (in one process: a copy; across processes: sending, receiving, and
waiting for the peer).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


PARTS = ("client_forward", "aux_forward", "client_backward_step", "client_receive", "server_step", "align",
         "heldout_cosine", "transport_encode", "transport_wait")


class StepTimer:
    """Exclusive wall time per named section, since the last :meth:`pop` and in total."""

    def __init__(self, device: torch.device | None = None):
        self.sync = None
        if device is not None and device.type == "cuda":
            self.sync = lambda: torch.cuda.current_stream(device).synchronize()
        self.window: dict[str, float] = defaultdict(float)
        self.total: dict[str, float] = defaultdict(float)
        self._stack: list[float] = []  # time spent in nested sections, per open section

    @contextmanager
    def __call__(self, name: str):
        if self.sync:
            self.sync()
        start = time.perf_counter()
        self._stack.append(0.0)
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            elapsed = time.perf_counter() - start
            nested = self._stack.pop()
            if self._stack:
                self._stack[-1] += elapsed
            self.window[name] += elapsed - nested
            self.total[name] += elapsed - nested

    def pop(self) -> dict[str, float]:
        """Seconds per part since the last call (every part of :data:`PARTS`, zero if not run)."""
        out = {name: self.window.get(name, 0.0) for name in PARTS}
        out.update({k: v for k, v in self.window.items() if k not in out})
        self.window = defaultdict(float)
        return out

    def totals(self) -> dict[str, float]:
        out = {name: self.total.get(name, 0.0) for name in PARTS}
        out.update({k: v for k, v in self.total.items() if k not in out})
        return out


class Timed:
    """A callable whose calls are timed as ``name`` (the auxiliary model's loss, for instance)."""

    def __init__(self, fn, timer: StepTimer, name: str):
        self.fn, self.timer, self.name = fn, timer, name

    def __call__(self, *args, **kwargs):
        with self.timer(self.name):
            return self.fn(*args, **kwargs)


#: The parts a process's seconds are added up over, in order: the timed parts and the rest of the step.
TIME_NAMES = (*PARTS, "other")


def time_vector(seconds: dict[str, float]) -> torch.Tensor:
    """The seconds of :data:`TIME_NAMES` as one float64 vector (zero for a part not run)."""
    return torch.tensor([seconds.get(k, 0.0) for k in TIME_NAMES], dtype=torch.float64)


def per_step(seconds: dict[str, float], steps: int) -> dict[str, float]:
    """``time/<part>`` keys: seconds per global step, rounded to microseconds."""
    return {f"time/{k}": round(v / max(steps, 1), 6) for k, v in seconds.items()}
