"""Reading evaluation curves: targets, the point a run converged to, byte costs, and the tuning choice.

A *curve* is a list of evaluation points, each a dict with at least ``bytes`` (cumulative bytes on the wire at
that evaluation), ``validation_loss`` and ``test_loss``; the first point is the model before training
(``bytes`` 0). Everything here is a pure function of such lists, so it can be checked by hand.

Protocol (see ``compare_algorithms.py``): choices (the tuning configuration, the point a run converged to) are
made on the validation curve only; the figures reported are read from the test curve.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


Point = dict[str, Any]
GAP_SHARES = (0.8, 0.9, 0.95, 0.99)


def gap_targets(base: float, reference: float, shares: Iterable[float] = GAP_SHARES) -> dict[str, float]:
    """The losses that close each share of the gap between the base model's loss and the reference's."""
    return {str(s): base - s * (base - reference) for s in shares}


def gap_closed(base: float, reference: float, loss: float) -> float:
    """Share of the gap between ``base`` and ``reference`` that ``loss`` closes (1.0: as good as the reference)."""
    return (base - loss) / (base - reference)


def best_point(curve: Sequence[Point], key: str = "validation_loss") -> Point:
    """The first evaluation with the lowest ``key``: where early stopping on that curve leaves the model."""
    return min(curve, key=lambda p: p[key])  # min keeps the first of equal values


def crossing(curve: Sequence[Point], target: float, key: str = "test_loss", x: str = "bytes") -> dict[str, Any] | None:
    """Where ``key`` first reaches ``target`` (at or below), in units of ``x``; None if it never does.

    Between the last evaluation above the target and the first at or below it, ``key`` is taken as linear in
    ``log(x)`` (linear in ``x`` when the earlier evaluation is at 0). Returns ``{"value": interpolated x,
    "bracket": [x before, x after]}``; a curve that starts at or below the target gives its first point.
    """
    for i, point in enumerate(curve):
        if point[key] > target:
            continue
        if i == 0:
            return {"value": point[x], "bracket": [point[x], point[x]]}
        before = curve[i - 1]
        x0, x1, y0, y1 = before[x], point[x], before[key], point[key]
        share = (y0 - target) / (y0 - y1)  # y0 > target >= y1
        if x0 <= 0:
            value = x0 + share * (x1 - x0)
        else:
            value = math.exp(math.log(x0) + share * (math.log(x1) - math.log(x0)))
        return {"value": value, "bracket": [x0, x1]}
    return None


def value_at(curve: Sequence[Point], budget: float, key: str = "test_loss", x: str = "bytes") -> float | None:
    """``key`` at the last evaluation with at most ``budget`` of ``x`` (what a run stopped there would have); None
    when the run never got that far (its last evaluation is below ``budget`` and the run stopped early)."""
    inside = [p for p in curve if p[x] <= budget]
    return inside[-1][key] if inside else None


def select(candidates: dict[str, Sequence[Point]], key: str = "validation_loss") -> str:
    """The candidate (name -> curve) whose best ``key`` is lowest; ties go to the first in order.

    Only ``key`` is read: with the default, nothing measured on the test split can change the choice.
    """
    return min(candidates, key=lambda name: best_point(candidates[name], key)[key])


def span(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, min and max of the values that exist, and how many are missing (a target a seed did not reach)."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "min": None, "max": None, "n": len(values), "missing": len(values)}
    return {"mean": sum(present) / len(present), "min": min(present), "max": max(present), "n": len(values),
            "missing": len(values) - len(present)}
