"""Every party's optimizer and learning-rate schedule behind the one object Trainer expects of each.

The parties step their own optimizers inside ``training_step``; these objects let Trainer save, restore and
step the schedules of all of them, and log one learning rate.
"""

from __future__ import annotations

import warnings
from typing import Any

from .federation import Party


class RoleOptimizers:
    """Every party's optimizer behind the one object Trainer expects.

    The parties step their own optimizers inside ``training_step`` (the server
    several times per global step), so ``step``/``zero_grad`` are no-ops here;
    this object exists so that Trainer saves and restores all their states.
    """

    def __init__(self, parties: dict[str, Party]):
        self.parties = parties

    @property
    def param_groups(self) -> list[dict]:
        return [g for p in self.parties.values() for g in p.optimizer.param_groups]

    @property
    def state(self) -> dict:
        return {}

    def step(self, closure=None) -> None:
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {name: p.optimizer.state_dict() for name, p in self.parties.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, p in self.parties.items():
            p.optimizer.load_state_dict(state[name])


class RoleSchedulers:
    """Steps every party's learning-rate schedule once per global step."""

    def __init__(self, parties: dict[str, Party]):
        self.parties = parties

    def step(self) -> None:
        with warnings.catch_warnings():
            # A client that sat out the round has not stepped its optimizer; its schedule follows the global step.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            for p in self.parties.values():
                p.scheduler.step()

    def get_last_lr(self) -> list[float]:
        return next(iter(self.parties.values())).scheduler.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return {name: p.scheduler.state_dict() for name, p in self.parties.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, p in self.parties.items():
            p.scheduler.load_state_dict(state[name])
