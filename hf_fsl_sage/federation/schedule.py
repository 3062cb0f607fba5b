"""Which clients train in which round, and on which examples: a pure function of the seed and the step.

Global step ``i`` belongs to round ``i // local_steps``. The participants of a
round are sampled from the seed and the round number. Each client walks its
own partition in an order reshuffled every time it has seen all of it; its
position only advances on steps it takes part in. Because every batch is a
function of ``(seed, step)``, resuming from a checkpoint replays exactly the
same data, and a multi-process run can build any client's batches anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


BatchCollator = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


def steps_per_epoch(sizes: Sequence[int], participants_per_round: int, batch_size: int) -> float:
    """Global steps of one epoch: a pass of every client over its share, on average. The largest share takes
    ``ceil(size / batch_size)`` local steps, and a client takes part in ``participants / clients`` of the rounds."""
    return math.ceil(max(sizes) / batch_size) * len(sizes) / participants_per_round


class RoundSchedule:
    """Participants per round and per-client example indices per local step."""

    def __init__(
        self,
        partitions: Sequence[Sequence[int]],
        participants_per_round: int,
        local_steps: int,
        batch_size: int,
        max_steps: int,
        seed: int,
    ):
        self.partitions = [list(p) for p in partitions]
        self.num_clients = len(self.partitions)
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.seed = seed
        self.num_rounds = -(-max_steps // local_steps)
        self._participants = [self._sample(r, participants_per_round) for r in range(self.num_rounds)]
        # rounds_before[c][r]: rounds < r in which client c took part
        taken = np.zeros((self.num_clients, self.num_rounds + 1), dtype=np.int64)
        for r, clients in enumerate(self._participants):
            taken[clients, r + 1] = 1
        self._rounds_before = taken.cumsum(axis=1)

    def _sample(self, round_index: int, k: int) -> list[int]:
        if k >= self.num_clients:
            return list(range(self.num_clients))
        rng = np.random.default_rng([self.seed, round_index])
        return sorted(int(c) for c in rng.choice(self.num_clients, size=k, replace=False))

    def participants(self, round_index: int) -> list[int]:
        return self._participants[round_index]

    def position(self, step: int) -> tuple[int, int]:
        """(round, local step within the round) of global step ``step``."""
        return divmod(step, self.local_steps)

    def is_round_end(self, step: int) -> bool:
        return step % self.local_steps == self.local_steps - 1 or step == self.max_steps - 1

    def indices(self, client: int, step: int) -> list[int]:
        """Example indices (into the training set) of ``client``'s batch at global step ``step``."""
        round_index, local = self.position(step)
        part = self.partitions[client]
        start = (int(self._rounds_before[client, round_index]) * self.local_steps + local) * self.batch_size
        out: list[int] = []
        for pos in range(start, start + self.batch_size):
            epoch, offset = divmod(pos, len(part))
            order = np.random.default_rng([self.seed, client, epoch]).permutation(len(part))
            out.append(part[int(order[offset])])
        return out


class GlobalStepDataset(torch.utils.data.Dataset):
    """Item ``i`` is everything global step ``i`` needs: round, local step and one batch per participant."""

    def __init__(self, schedule: RoundSchedule, dataset, collator: BatchCollator):
        self.schedule = schedule
        self.dataset = dataset
        self.collator = collator

    def __len__(self) -> int:
        return self.schedule.max_steps

    def __getitem__(self, step: int) -> dict[str, Any]:
        round_index, local = self.schedule.position(step)
        batches = {
            client: self.collator([self.dataset[j] for j in self.schedule.indices(client, step)])
            for client in self.schedule.participants(round_index)
        }
        return {
            "step": step,
            "round": round_index,
            "local_step": local,
            "round_end": self.schedule.is_round_end(step),
            "clients": batches,
        }
