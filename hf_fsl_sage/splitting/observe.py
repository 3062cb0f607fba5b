"""One forward pass on a tiny input that shows where a model can be cut, and what crosses the cut.

:func:`observe_cut` runs the unsplit model once, with hooks on its decoder blocks and on the modules beside
them, and checks that cutting before block ``cut_layer`` is exact: the blocks before the cut all run before
the blocks after it, block ``cut_layer`` reads exactly what block ``cut_layer - 1`` returned, and nothing else
that a server block reads depends on client-held weights, except the inputs the family declares as carried
(:class:`~hf_fsl_sage.splitting.families.CarriedInput`), which the client sends.
"""

from __future__ import annotations

from collections import UserDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .carried import argument, parameter_names, stacked_with, with_argument
from .families import CarriedInput
from .stand_ins import first_output, join_path


__all__ = ["Observation", "observe_cut"]


@dataclass
class Observation:
    """What :func:`observe_cut` saw."""

    #: Paths (relative to the base model) of the modules that run before the first block: the embedding stage.
    embedding_stage: list[str]
    #: For every block, the length of the tuple it returns (0: a bare tensor).
    outputs: list[int]
    #: Shape of the hidden states at the cut after the batch and sequence dimensions (``(hidden,)`` for most).
    cut_shape: tuple[int, ...]
    #: Each carried input's shape after the batch and sequence dimensions, and its dtype, by name.
    carried: dict[str, tuple[tuple[int, ...], torch.dtype]]
    #: Shape of what the last block returns, after the batch and sequence dimensions (the input of the final norm).
    head_shape: tuple[int, ...]


def _output_count(output: Any) -> int:
    return len(output) if isinstance(output, (tuple, list)) else 0


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class _ReadsRecorded(UserDict):
    """A block's view of a store the model hands to every block (the keys and values some layers share, a
    ``KVSharingDict``): the same storage, so what the block writes reaches the later blocks, but what it reads is
    reported to ``read``."""

    def __init__(self, store: UserDict, read):
        self.data, self._read = store.data, read

    def __getitem__(self, key):
        value = self.data[key]
        self._read(value)
        return value


def _depends(t: torch.Tensor, weights: list[nn.Parameter]) -> bool:
    """Whether ``t`` changes with ``weights`` (a tensor can require grad and not depend on them, e.g. an empty
    slice of a stack the client filled)."""
    draw = torch.Generator(t.device).manual_seed(0)
    probe = (t.float() * torch.randn(t.shape, device=t.device, generator=draw)).sum()
    grads = torch.autograd.grad(probe, weights, retain_graph=True, allow_unused=True)
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def _echo_unheld(base: nn.Module, owners: list[str], blocks: nn.ModuleList, counts: dict[int, int]) -> list[nn.Module]:
    """Make the modules whose weights this process does not hold (all on the ``meta`` device) return their input.

    A client's process holds the blocks after the cut only as far as its auxiliary model needs them
    (:mod:`hf_fsl_sage.splitting.materialise`). The checks of :func:`observe_cut` read what enters each server
    block, never what it computes, so such a block echoes its hidden states in the structure the last block
    before it returned. Undone by deleting the instance attribute ``forward``.
    """
    def unheld(module: nn.Module) -> bool:
        params = list(module.parameters())
        return bool(params) and all(p.is_meta for p in params)

    def echo_block(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        n = counts[max(counts)] if counts else 0
        return (hidden, *[None] * (n - 1)) if n else hidden

    def echo(*args, **kwargs):
        return args[0] if args else next(iter(kwargs.values()))

    echoing = []
    for module, forward in [(b, echo_block) for b in blocks] + [
        (child, echo) for owner in owners for child in base.get_submodule(owner).children()
        if child is not blocks and child not in [base.get_submodule(o) for o in owners]
    ]:
        if unheld(module):
            module.forward = forward
            echoing.append(module)
    return echoing


def observe_cut(base: nn.Module, owners: list[str], blocks: nn.ModuleList, cut_layer: int,
                token_embedding: nn.Module, server_runs: set[str], carried: tuple[CarriedInput, ...],
                model_type: str) -> Observation:
    """Run ``base`` once on a tiny input and check that it can be cut before block ``cut_layer``.

    Client-held weights (everything outside blocks ``[cut_layer, L)`` and the modules the server runs itself),
    and only they, are made to require grad for the run, and what block ``cut_layer`` receives as hidden states
    and carried inputs is detached there (it travels), so that any other input of a server block that depends
    on client-held weights shows it. Raises a ValueError naming the problem when the cut is not exact.
    """
    called: list[tuple[str, str]] = []  # (module path, phase) for the modules beside the blocks
    order: list[int] = []
    firsts: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    suspects: list[tuple[str, torch.Tensor]] = []  # server-block inputs that may depend on client-held weights
    seam: list[bool] = []
    crossing: dict[str, Any] = {}
    everywhere = {c.argument for c in carried if c.scope in ("every", "stack")}
    handles = []
    for owner in owners:
        for name, child in base.get_submodule(owner).named_children():
            path = join_path(owner, name)
            if child is blocks or path in owners:
                continue
            handles.append(child.register_forward_pre_hook(lambda m, a, p=path: called.append(
                (p, "embedding" if not order else "client" if max(order) < cut_layer else "server"))))

    def enter(module, args, kwargs, i):
        names = parameter_names(module)
        hidden = args[0] if args else kwargs.get("hidden_states")
        if i == cut_layer and not seam:
            before = firsts.get(cut_layer - 1)
            seam.append(isinstance(hidden, torch.Tensor) and before is not None and torch.equal(hidden, before))
            crossing.update({c.name: argument(names, args, kwargs, c.argument) for c in carried})
            args = (hidden.detach(), *args[1:]) if args else args
            kwargs = kwargs if args else {**kwargs, "hidden_states": hidden.detach()}
            for c in carried:  # what travels is detached: the server gets it as a leaf
                value = crossing[c.name]
                if isinstance(value, torch.Tensor):
                    args, kwargs = with_argument(names, args, kwargs, c.argument, value.detach())
        if i >= cut_layer and seam:
            for c in carried:  # the client's entries of a stack travel: the server reads them as leaves
                value, client = argument(names, args, kwargs, c.argument), crossing.get(c.name)
                if c.scope == "stack" and isinstance(value, torch.Tensor) and isinstance(client, torch.Tensor):
                    stacked = stacked_with(value, value[..., :client.shape[-2], :].detach())
                    args, kwargs = with_argument(names, args, kwargs, c.argument, stacked)
            skip = everywhere | ({c.argument for c in carried} if i == cut_layer else set())
            rest = [v for k, v in enumerate(args[1:], 1) if (names[k] if k < len(names) else None) not in skip] + \
                [v for k, v in kwargs.items() if k not in skip and not (not args and k == "hidden_states")]
            suspects.extend((f"block {i}", t) for t in _tensors(rest) if t.requires_grad)

            def read(value, where=f"block {i}"):  # an entry a server block takes from a store shared by layers
                suspects.extend((where, t) for t in _tensors(value) if t.requires_grad)
            args = tuple(_ReadsRecorded(v, read) if isinstance(v, UserDict) else v for v in args)
            kwargs = {k: _ReadsRecorded(v, read) if isinstance(v, UserDict) else v for k, v in kwargs.items()}
        order.append(i)
        return args, kwargs

    def leave(module, args, output, i):
        firsts[i], counts[i] = first_output(output), _output_count(output)
        if i == cut_layer - 1:  # what the server's stand-in returns: the smashed activations, received as a leaf
            detached = firsts[i].detach()
            if isinstance(output, torch.Tensor):
                return detached
            if isinstance(output, (tuple, list)):
                return type(output)([detached, *output[1:]])
        return None

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, k, i=i: enter(m, a, k, i), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: leave(m, a, o, i)))
    echoing = _echo_unheld(base, owners, blocks, counts)
    server_params = {id(p) for b in blocks[cut_layer:] for p in b.parameters()}
    server_params |= {id(p) for path in server_runs for p in base.get_submodule(path).parameters()}
    shared = {id(p) for b in blocks[:cut_layer] for p in b.parameters()} & server_params
    grad_flags = [(p, p.requires_grad) for p in base.parameters()]
    modes = [(m, m.training) for m in base.modules()]
    device = token_embedding.weight.device
    ids = torch.tensor([[1, 2]], device=device).clamp(max=token_embedding.num_embeddings - 1)
    try:
        base.eval()
        for p in base.parameters():  # only what depends on client-held weights requires grad in this pass
            p.requires_grad_(p.is_floating_point() and id(p) not in server_params)
        with torch.enable_grad():
            base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            # the modules beside the blocks that run only after the cut are the server's
            server_side = {p for p, phase in called if phase == "server"} - {p for p, ph in called if ph != "server"}
            server_params |= {id(w) for p in server_side for w in base.get_submodule(p).parameters()}
            weights = [w for w in base.parameters() if w.requires_grad and id(w) not in server_params]
            leaks = [where for where, t in suspects if _depends(t, weights)]
    finally:
        for h in handles:
            h.remove()
        for m in echoing:
            del m.forward
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag
    problem = None
    first_server = next((k for k, i in enumerate(order) if i >= cut_layer), len(order))
    between = sorted({p for p, phase in called if phase == "client" and p not in server_runs
                      and any(True for _ in base.get_submodule(p).parameters())})
    missing = [c.argument for c in carried if not isinstance(crossing.get(c.name), torch.Tensor)]
    if shared:
        problem = "blocks on both sides of the cut share weights"
    elif sorted(set(order)) != list(range(len(blocks))) or first_server == len(order) \
            or order[first_server] != cut_layer or any(i >= cut_layer for i in order[:first_server]) \
            or any(i < cut_layer for i in order[first_server:]):
        problem = f"the blocks before the cut do not all run before the blocks after it (observed order {order[:12]})"
    elif not seam or not seam[0]:
        problem = f"block {cut_layer} does not read exactly what block {cut_layer - 1} returned"
    elif between:
        problem = f"the model runs {between[0]!r}, which has weights, between the client's blocks"
    elif missing:
        problem = f"block {cut_layer} is not given {missing[0]!r}, which the family declares it reads"
    elif leaks:
        problem = f"{leaks[0]} reads, besides the hidden states, values computed from client-held weights"
    if problem:
        raise ValueError(f"model_type {model_type!r} cannot be split before block {cut_layer}: {problem}. "
                         "Use a supported family (see docs/supported-families.md).")
    return Observation([p for p, phase in called if phase == "embedding"], [counts[i] for i in range(len(blocks))],
                       tuple(firsts[cut_layer - 1].shape[2:]),
                       {n: (tuple(t.shape[2:]), t.dtype) for n, t in crossing.items()},
                       tuple(firsts[len(blocks) - 1].shape[2:]))
