"""Which process runs the server and which runs each client.

With one process everything runs there. Under ``accelerate launch
--num_processes P`` (P >= 2) the server runs on process 0, the main process,
which therefore holds the global model that is evaluated, logged, saved and
pushed; the clients are dealt round-robin over processes 1..P-1 (client ``c``
on process ``1 + c % (P - 1)``), or wherever ``client_ranks`` puts them.

Every process runs the same program over the same schedule (SPMD): it builds
every batch, and each operation runs where its party lives. Randomness is
drawn per party and per step (:func:`party_seed`), so dropout masks and any
other random draw do not depend on the placement.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass


SERVER_RANK = 0


@dataclass(frozen=True)
class Placement:
    """This process's rank, the world size, and the rank of each client (the server is on rank 0)."""

    rank: int
    world_size: int
    client_ranks: tuple[int, ...]

    @classmethod
    def build(cls, rank: int, world_size: int, num_clients: int,
              client_ranks: Sequence[int] | None = None) -> Placement:
        """Round-robin over ranks 1..P-1 unless ``client_ranks`` (one rank per client) is given."""
        if world_size == 1:
            ranks = tuple(0 for _ in range(num_clients))
            if client_ranks is not None and any(r != 0 for r in client_ranks):
                raise ValueError(f"client_ranks={list(client_ranks)} names processes other than 0, but this run has "
                                 "a single process; launch with `accelerate launch --num_processes P` or drop it.")
            return cls(rank, 1, ranks)
        if client_ranks is None:
            ranks = tuple(1 + c % (world_size - 1) for c in range(num_clients))
        else:
            ranks = tuple(int(r) for r in client_ranks)
            if len(ranks) != num_clients or any(not 0 <= r < world_size for r in ranks):
                raise ValueError(f"client_ranks={list(client_ranks)} must give one process in 0..{world_size - 1} to "
                                 f"each of the {num_clients} clients.")
        idle = sorted(set(range(1, world_size)) - set(ranks))
        if idle:
            raise ValueError(
                f"processes {idle} of {world_size} would run no client (the server is on process 0 and there are "
                f"{num_clients} clients): launch with --num_processes <= {len(set(ranks)) + 1} or more clients, "
                "or set client_ranks."
            )
        return cls(rank, world_size, ranks)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_server(self) -> bool:
        return self.rank == SERVER_RANK

    def holds_client(self, client: int) -> bool:
        return self.client_ranks[client] == self.rank

    def rank_of(self, client: int) -> int:
        return self.client_ranks[client]

    def clients_of(self, rank: int) -> list[int]:
        return [c for c, r in enumerate(self.client_ranks) if r == rank]

    def describe(self) -> str:
        parts = ["process 0: server" + (f" + clients {self.clients_of(0)}" if self.clients_of(0) else "")]
        parts += [f"process {r}: clients {self.clients_of(r)}" for r in range(1, self.world_size)]
        return "; ".join(parts)


def party_seed(seed: int, round_index: int, local_step: int, client: int, role: str) -> int:
    """Seed of one party's random draws at one local step: the same whichever process runs it."""
    return zlib.crc32(f"{seed}/{round_index}/{local_step}/{client}/{role}".encode())
