"""Partition a training set among federated clients.

* ``iid``: a random permutation cut into ``num_clients`` near-equal parts.
* ``dirichlet``: non-IID by group (the value of a column, or of any function
  of a row, e.g. a slot of E2E's meaning representation). For every group, client
  shares are drawn from Dirichlet(alpha): small ``alpha`` concentrates each
  group on few clients, large ``alpha`` approaches IID.

Every function returns a list with one sorted list of row indices per client;
each index of the dataset appears in exactly one client.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import datasets
import numpy as np


NONE_GROUP = "<none>"
SCHEMES = ("iid", "dirichlet")


def _check_counts(num_examples: int, num_clients: int, min_size: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}.")
    if num_examples < num_clients * min_size:
        raise ValueError(
            f"Cannot give {num_clients} clients at least {min_size} example(s) each from "
            f"{num_examples} examples; use fewer clients, a smaller min_size or more data."
        )


def partition_iid(num_examples: int, num_clients: int, seed: int = 0) -> list[list[int]]:
    """Shuffle ``range(num_examples)`` and cut it into parts whose sizes differ by at most 1."""
    _check_counts(num_examples, num_clients, 1)
    perm = np.random.default_rng(seed).permutation(num_examples)
    return [sorted(chunk.tolist()) for chunk in np.array_split(perm, num_clients)]


def partition_dirichlet(
    groups: Sequence[Hashable],
    num_clients: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 1,
    max_resamples: int = 10,
) -> list[list[int]]:
    """Non-IID partition: each group's rows are shared among clients by a Dirichlet(alpha) draw.

    ``groups[i]`` is the group of row ``i``. The whole draw is repeated (up to
    ``max_resamples`` times) until every client holds at least ``min_size`` rows;
    if that still fails, as it may for tiny ``alpha``, rows are moved one at a
    time from the largest client to the smallest until it holds. The result
    depends only on the arguments.
    """
    num_examples = len(groups)
    _check_counts(num_examples, num_clients, min_size)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}.")
    rng = np.random.default_rng(seed)

    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)

    parts: list[list[int]] = []
    for _ in range(max(1, max_resamples)):
        parts = [[] for _ in range(num_clients)]
        for rows in members.values():
            shuffled = rng.permutation(rows)
            share = rng.dirichlet(np.full(num_clients, float(alpha)))
            counts = rng.multinomial(len(shuffled), share / share.sum())
            for client, chunk in enumerate(np.split(shuffled, np.cumsum(counts)[:-1])):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        _repair(parts, min_size, rng)
    return [sorted(p) for p in parts]


def _repair(parts: list[list[int]], min_size: int, rng: np.random.Generator) -> None:
    """Move random rows from the largest client to the smallest until all reach ``min_size``.

    Terminates because the caller checked ``total >= num_clients * min_size``, so
    the largest client always has more than ``min_size`` rows while one has fewer.
    """
    while True:
        sizes = [len(p) for p in parts]
        low = int(np.argmin(sizes))
        if sizes[low] >= min_size:
            return
        high = int(np.argmax(sizes))
        donor = parts[high]
        j = int(rng.integers(len(donor)))
        donor[j], donor[-1] = donor[-1], donor[j]
        parts[low].append(donor.pop())


GroupBy = str | Callable[[dict[str, Any]], Hashable]


def partition_groups(ds: datasets.Dataset, group_by: GroupBy) -> list[Hashable]:
    """Group of every row: the value of column ``group_by``, or ``group_by(row)`` for a callable.

    ``None`` values form the group :data:`NONE_GROUP`.
    """
    if callable(group_by):
        values = [group_by(row) for row in ds]
    else:
        if group_by not in ds.column_names:
            raise ValueError(f"No column {group_by!r} to group by (found {ds.column_names}); pass the name of a "
                             "column of the training set, or a function of a row.")
        values = ds[group_by]
    if values and not all(isinstance(v, Hashable) for v in values):
        raise ValueError(f"The groups of {group_by!r} are unhashable ({type(values[0]).__name__}); group by another.")
    return [NONE_GROUP if v is None else v for v in values]


def partition(
    ds: datasets.Dataset,
    num_clients: int,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    group_by: GroupBy | None = None,
    min_size: int = 1,
) -> list[list[int]]:
    """Partition the rows of ``ds`` among ``num_clients`` clients.

    ``scheme="iid"`` ignores ``alpha`` and ``group_by``. ``scheme="dirichlet"`` groups rows by
    ``group_by`` (a column name or a function of a row) and calls :func:`partition_dirichlet`.
    """
    if scheme == "iid":
        return partition_iid(len(ds), num_clients, seed)
    if scheme == "dirichlet":
        if group_by is None:
            raise ValueError("scheme='dirichlet' needs group_by: a column name or a function of a row.")
        return partition_dirichlet(partition_groups(ds, group_by), num_clients, alpha, seed, min_size=min_size)
    raise ValueError(f"Unknown partition scheme {scheme!r}; choose one of {SCHEMES}.")


def client_datasets(ds: datasets.Dataset, parts: Sequence[Sequence[int]]) -> list[datasets.Dataset]:
    """One ``Dataset`` per client, selecting its rows."""
    return [ds.select(list(p)) for p in parts]


def describe_partition(
    parts: Sequence[Sequence[int]], groups: Sequence[Hashable] | None = None
) -> dict[str, Any]:
    """Summary for logs: client sizes and, given ``groups``, each client's group histogram.

    ``mean_tv_distance`` is the mean over non-empty clients of the total variation
    distance between the client's group distribution and the overall one
    (0 = every client mirrors the whole set, near 1 = clients hold disjoint groups).
    """
    sizes = [len(p) for p in parts]
    out: dict[str, Any] = {
        "num_clients": len(parts),
        "num_examples": sum(sizes),
        "sizes": sizes,
        "min_size": min(sizes, default=0),
        "max_size": max(sizes, default=0),
    }
    if groups is None:
        return out
    overall = Counter(groups[i] for p in parts for i in p)
    total = sum(overall.values())
    histograms: list[dict[str, int]] = []
    distances: list[float] = []
    for p in parts:
        hist = Counter(groups[i] for i in p)
        histograms.append({str(g): c for g, c in sorted(hist.items(), key=lambda kv: (-kv[1], str(kv[0])))})
        if p:
            distances.append(0.5 * sum(abs(hist[g] / len(p) - overall[g] / total) for g in overall))
    out["num_groups"] = len(overall)
    out["group_histograms"] = histograms
    out["mean_tv_distance"] = float(np.mean(distances)) if distances else 0.0
    return out
