"""Algorithms by name. A leaf module: it imports nothing of the package.

Each algorithm module registers its class with one decorator call where it is defined::

    @register("my_algorithm")
    class MyAlgorithm(Algorithm): ...

Importing :mod:`hf_fsl_sage.algorithms` registers the built-in algorithms; an algorithm of your own is
registered once its module is imported (before ``FSLSageConfig(algorithm="my_algorithm")`` checks the name).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


#: Registered algorithm classes by name.
ALGORITHMS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: register an :class:`~hf_fsl_sage.algorithms.base.Algorithm` subclass under ``name``."""

    def add(cls: type) -> type:
        known = ALGORITHMS.get(name, cls)
        if (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):  # not a re-definition
            raise ValueError(f"an algorithm named {name!r} is already registered ({ALGORITHMS[name].__name__}); "
                             "pick another name.")
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return add


def available() -> list[str]:
    """Names of every registered algorithm."""
    return sorted(ALGORITHMS)


def get(name: str) -> Any:
    """The algorithm class registered under ``name``."""
    if name not in available():
        raise ValueError(f"algorithm={name!r} is unknown; choose one of {available()} or register yours with "
                         "hf_fsl_sage.algorithms.register(name).")
    return ALGORITHMS[name]


def fields_read_by(name: str, fields: Iterable[str]) -> list[str]:
    """Of ``fields`` (``FSLSageConfig``'s), those algorithm ``name`` reads: the fields no registered algorithm claims
    as one of its ``own_settings``, and its own."""
    claimed = {field for cls in ALGORITHMS.values() for field in getattr(cls, "own_settings", ())}
    own = set(getattr(get(name), "own_settings", ()))
    return [field for field in fields if field not in claimed or field in own]
