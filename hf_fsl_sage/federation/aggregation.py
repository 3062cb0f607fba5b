"""Aggregation rules as pure functions on state dicts (name -> tensor)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


StateDict = dict[str, torch.Tensor]


def weighted_average(states: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """FedAvg: sum_i w_i * state_i / sum_i w_i, key by key, accumulated in fp32 and cast back."""
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"got {len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights must sum to a positive number, got {list(weights)}")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise ValueError("all states must have the same keys to be averaged")
    out: StateDict = {}
    for key in keys:
        acc = torch.zeros_like(states[0][key], dtype=torch.float32)
        for state, w in zip(states, weights):
            acc.add_(state[key].to(acc.device, torch.float32), alpha=w / total)
        out[key] = acc.to(states[0][key].dtype)
    return out
