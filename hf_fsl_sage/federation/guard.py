"""What a federation does with non-finite values and with clients that fail in their local step.

:class:`Guard` holds the two policies (``nonfinite``: raise or skip; ``client_failures``: raise or drop), the
counts the trainer logs (``skipped_updates``, ``dropped_clients``), the clients dropped from the current
round and the clients whose process left the run (out until the run is restarted). Every check names the
party, what was checked and where the run is (round and global step).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.utils import logging

from ..transport.base import flatten


logger = logging.get_logger(__name__)


class NonFiniteError(FloatingPointError):
    """A loss, gradient, message or model state held NaN or infinity, with ``nonfinite="raise"``."""


class SimulatedClientFailure(RuntimeError):
    """A failure drawn by ``simulate_client_failures``."""


def is_finite(value: Any) -> bool:
    """Whether every number in ``value`` (a float, a tensor, or a payload of tensors) is finite."""
    if value is None:
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    return all(bool(torch.isfinite(t).all()) for t in flatten(value)[1] if t.is_floating_point())


class Guard:
    """The policies, the counters and the clients dropped from the current round."""

    def __init__(self, nonfinite: str = "raise", client_failures: str = "raise", context=lambda: ""):
        self.nonfinite, self.client_failures, self.context = nonfinite, client_failures, context
        self.skipped_updates = 0
        self.dropped_clients = 0
        self.dropped: set[int] = set()  # in the current round
        self.lost: set[int] = set()  # their process left the run: out of every later round too

    def finite(self, value: Any, what: str, party: str) -> bool:
        """``True`` if ``value`` is finite; otherwise raise (``"raise"``) or count a skipped update (``"skip"``)."""
        if is_finite(value):
            return True
        where = self.context() or "set-up"
        if self.nonfinite == "raise":
            raise NonFiniteError(
                f"non-finite {what} of {party} at {where}. The run stopped before using it; checkpoints already "
                "written are good: resume from the last one with a lower learning rate or max_grad_norm, check the "
                "data, or set nonfinite='skip' to discard such updates."
            )
        self.skipped_updates += 1
        logger.warning(f"skipped the {what} of {party} at {where}: it holds NaN or infinity (nonfinite='skip').")
        return False

    def drop(self, client: int, error: BaseException) -> None:
        """Drop ``client`` from the rest of the round after ``error``, or re-raise it (``client_failures="raise"``)."""
        if self.client_failures != "drop":
            raise error
        self.dropped.add(client)
        self.dropped_clients += 1
        logger.warning(f"client {client} failed at {self.context() or 'set-up'} and is dropped from the rest of the "
                       f"round: {type(error).__name__}: {error}")

    def lose(self, clients: list[int], count: bool) -> None:
        """Drop ``clients`` from this and every later round: their process left the run. ``count`` them in
        ``dropped_clients`` on one process only (the trainer sums the counts over processes)."""
        new = set(clients) - self.lost
        self.lost |= new
        self.dropped |= new
        if count:
            self.dropped_clients += len(new)

    def new_round(self) -> None:
        self.dropped = set(self.lost)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_updates": self.skipped_updates, "dropped_clients": self.dropped_clients,
                "dropped": sorted(self.dropped), "lost": sorted(self.lost)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counts and the current round's drops; clients of a lost process come back from the next
        round (a restart brings their process back)."""
        self.skipped_updates, self.dropped_clients = state["skipped_updates"], state["dropped_clients"]
        self.dropped = set(state["dropped"])
