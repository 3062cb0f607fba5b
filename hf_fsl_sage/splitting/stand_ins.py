"""Weightless stand-ins for modules one side of a split does not hold, and helpers to swap modules in a tree.

A split half is a shallow copy of the model whose missing modules are replaced
by these stand-ins; everything else is shared with the original model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (the client stops after its last block)."""


class NotHeld(nn.Module):
    """Placeholder for a module the other side owns; calling it is a bug."""

    def __init__(self, what: str, owner: str):
        super().__init__()
        self.what, self.owner = what, owner

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.what} is held by the {self.owner}, not on this side of the split")


class PassThrough(nn.Module):
    """Returns its first input unchanged (shape-preserving stand-in)."""

    def forward(self, *args, **kwargs):
        return args[0] if args else next(iter(kwargs.values()))


class SkippedBlock(nn.Module):
    """A client-side block as seen by the server: no weights, same plain attributes, same output structure.

    Plain attributes of the real block (``attention_type``, ``layer_idx``, class attributes and properties such
    as a layer type read from the config) are copied at construction; nothing else is kept, so the server holds
    no reference to client weights. ``outputs`` is the length of the tuple the real block returns (0: a bare
    tensor); the stand-in returns its hidden-state input first and ``None`` for the rest.
    """

    _PLAIN = (str, int, float, bool, PretrainedConfig)

    def __init__(self, block: nn.Module, outputs: int = 0):
        super().__init__()
        if isinstance(block, SkippedBlock):  # a stand-in of a stand-in keeps what the first one knew
            outputs = outputs or block.outputs
        self.outputs = outputs
        for key, value in self._snapshot(block).items():
            setattr(self, key, value)

    @classmethod
    def _snapshot(cls, block: nn.Module) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for klass in reversed(type(block).__mro__):
            if klass in nn.Module.__mro__ or klass is SkippedBlock:
                continue
            for key, value in vars(klass).items():
                if isinstance(value, property):
                    try:
                        value = getattr(block, key)
                    except Exception:  # noqa: BLE001 - a property that needs weights: not copied
                        continue
                found[key] = value
        found.update(vars(block))
        return {k: v for k, v in found.items()
                if not k.startswith("_") and k not in ("training", "outputs") and isinstance(v, cls._PLAIN)}

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
        return (hidden, *[None] * (self.outputs - 1)) if self.outputs else hidden


class _ZeroAddend(nn.Module):
    """Stand-in for an embedding table at the embedding stage: zeros of the shape and dtype a plain
    ``nn.Embedding`` would return (so they can be added or concatenated); a scalar zero for subclasses with
    their own forward, whose output is only ever added."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding_dim, self.dtype = embedding.embedding_dim, embedding.weight.dtype
        self.shaped = type(embedding) is nn.Embedding

    def forward(self, ids: Any = None, *args, **kwargs) -> torch.Tensor:
        if not (self.shaped and isinstance(ids, torch.Tensor)):
            return torch.zeros((), dtype=self.dtype)
        return torch.zeros(*ids.shape, self.embedding_dim, dtype=self.dtype, device=ids.device)


class _ZeroProjection(nn.Module):
    """Stand-in for a projection at the embedding stage: zeros of the output shape."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _server_stand_in(module: nn.Module) -> nn.Module | None:
    """Weightless stand-in for an embedding-stage module on the server, or None if there is none."""
    if isinstance(module, nn.Embedding):
        return _ZeroAddend(module)
    if isinstance(module, nn.Linear):
        return _ZeroProjection(module.out_features)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or type(module).__name__.lower().endswith("norm"):
        return PassThrough()
    return None


def server_stand_ins(path: str, module: nn.Module, token_embedding: nn.Module) -> dict[str, nn.Module]:
    """Stand-ins for the weighted parts of an embedding-stage module, recursing into composite modules
    (e.g. a BERT-style ``embeddings`` block holding token, position and type tables and a norm)."""
    if module is token_embedding:
        return {path: NotHeld("the token embedding", "client")}
    stand_in = _server_stand_in(module)
    if stand_in is not None:
        return {path: stand_in}
    found: dict[str, nn.Module] = {}
    for name, child in module.named_children():
        if has_params(child):
            found.update(server_stand_ins(join_path(path, name), child, token_embedding))
    return found


def has_params(module: nn.Module) -> bool:
    """Whether ``module`` (or any submodule) holds a parameter."""
    return any(True for _ in module.parameters())


def with_replaced(root: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """Shallow copy of ``root`` with the submodules at dotted ``replacements`` paths swapped; all else shared."""
    new = copy.copy(root)
    new._modules = dict(root._modules)
    nested: dict[str, dict[str, nn.Module]] = {}
    for path, module in replacements.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = module
        else:
            new._modules[head] = module
    for head, sub in nested.items():
        new._modules[head] = with_replaced(root._modules[head], sub)
    return new


def deepcopy_module(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(module, memo)`` that also copies tensors a forward pass left on submodules.

    Some families keep runtime state as plain attributes (e.g. RecurrentGemma's recurrent states), which
    still carry their autograd graph and which ``deepcopy`` refuses; the copy gets them detached.
    """
    memo = dict(memo or {})
    for sub in module.modules():
        for value in vars(sub).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf and id(value) not in memo:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(module, memo)


def first_output(output: Any) -> torch.Tensor:
    """The hidden states of a block's output (a tensor, or a tuple that starts with them)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def join_path(*parts: str) -> str:
    """Dotted module path of the non-empty ``parts``."""
    return ".".join(p for p in parts if p)


def path_of(root: nn.Module, module: nn.Module) -> str:
    """Dotted path of ``module`` inside ``root``."""
    return next(n for n, m in root.named_modules() if m is module)


def block_owner_paths(blocks_path: str) -> list[str]:
    """The block list's parent and every module above it, as paths from the base model ("" is the base)."""
    owner = blocks_path.rpartition(".")[0]
    return [".".join(owner.split(".")[:i]) for i in range(owner.count(".") + 2)] if owner else [""]
