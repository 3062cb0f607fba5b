"""Moving the inputs of block ``cut_layer`` across the cut: taken on the client, put in place on the server.

The client runs its model until the model calls block ``cut_layer``, which it holds only as a
:class:`CaptureBlock`: the call's arguments are exactly what the server's first block must read (the hidden
states, and for some families a router state, a stack of earlier blocks' inputs or the token ids: see
:class:`~hf_fsl_sage.splitting.families.CarriedInput`). The server runs its model's own forward on a zero
stream; :func:`injected` puts the received values where the unsplit model would have them, for one forward:

- the hidden states are what the stand-in of block ``cut_layer - 1`` returns, so that the model's own
  variables (a residual kept aside, a stack of block inputs, the input of a repeated group of blocks) hold them;
- a carried input goes into block ``cut_layer`` (scope ``"first"``), every server block (``"every"``), or
  replaces the client's entries of a stack wherever the server reads it (``"stack"``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .families import CarriedInput
from .stand_ins import SkippedBlock, StopForward


__all__ = ["CaptureBlock", "argument", "injected", "parameter_names", "stacked_with", "with_argument"]


@functools.cache
def _names_of(forward: Any) -> tuple[str, ...]:
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)[1:]  # without ``self``


def parameter_names(block: nn.Module) -> tuple[str, ...]:
    """The names of the positional parameters of ``block``'s forward, in order (``hidden_states`` first)."""
    return getattr(block, "parameter_names", None) or _names_of(type(block).forward)


def argument(names: tuple[str, ...], args: tuple, kwargs: dict, name: str) -> Any:
    """The value a call ``block(*args, **kwargs)`` gives the parameter ``name`` (``None`` if it gives none)."""
    if name in kwargs:
        return kwargs[name]
    index = names.index(name) if name in names else len(args)
    return args[index] if index < len(args) else None


def with_argument(names: tuple[str, ...], args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the same call with the parameter ``name`` set to ``value``."""
    index = names.index(name) if name in names else len(args)
    if name not in kwargs and index < len(args):
        return (*args[:index], value, *args[index + 1:]), kwargs
    return args, {**kwargs, name: value}


class CaptureBlock(SkippedBlock):
    """Block ``cut_layer`` as the client holds it: same plain attributes, no weights; a call records its arguments
    and ends the client's forward pass (:class:`~hf_fsl_sage.splitting.stand_ins.StopForward`)."""

    def __init__(self, block: nn.Module):
        super().__init__(block)
        self.parameter_names = parameter_names(block)
        self.call: tuple[tuple, dict] | None = None

    def forward(self, *args, **kwargs):
        self.call = (args, kwargs)
        raise StopForward

    def take(self, carried: tuple[CarriedInput, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """The hidden states and the carried inputs of the recorded call, which is then forgotten."""
        if self.call is None:
            return None
        (args, kwargs), self.call = self.call, None
        names = self.parameter_names
        hidden = argument(names, args, kwargs, names[0] if names else "hidden_states")
        return hidden, {c.name: argument(names, args, kwargs, c.argument) for c in carried}


def stacked_with(own: torch.Tensor, client: torch.Tensor) -> torch.Tensor:
    """``own`` (the stack as the server's model built it) with its first entries replaced by the client's."""
    return torch.cat([client.to(own.dtype), own[..., client.shape[-2]:, :]], dim=-2)


@contextmanager
def injected(lm: nn.Module, blocks: nn.ModuleList, cut: int, base_path: str, carried: tuple[CarriedInput, ...],
             hidden: torch.Tensor, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Hooks, for the duration of one forward of ``lm``, that put the received ``hidden`` states and carried
    ``values`` where the unsplit model has them (``blocks[cut - 1]`` is the stand-in of the client's last block)."""
    def emit(module, args, output):
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

    def into(block: nn.Module, items: list[CarriedInput]):
        names = parameter_names(block)

        def hook(module, args, kwargs):
            for c in items:
                value = values[c.name]
                if c.scope == "stack":
                    value = stacked_with(argument(names, args, kwargs, c.argument), value)
                args, kwargs = with_argument(names, args, kwargs, c.argument, value)
            return args, kwargs
        return hook

    def into_reader(c: CarriedInput):
        def hook(module, args):
            return (stacked_with(args[0], values[c.name]), *args[1:])
        return hook

    handles = [blocks[cut - 1].register_forward_hook(emit)]
    for i in range(cut, len(blocks)):
        items = [c for c in carried if c.scope in ("every", "stack") or i == cut]
        if items:
            handles.append(blocks[i].register_forward_pre_hook(into(blocks[i], items), with_kwargs=True))
    for c in carried:
        for reader in c.readers:
            module = lm.get_submodule(".".join(p for p in (base_path, reader) if p))
            handles.append(module.register_forward_pre_hook(into_reader(c)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
