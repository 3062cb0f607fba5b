"""What the client sends to the server: the cut-layer activations and what the server needs besides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


__all__ = ["Smashed"]


@dataclass
class Smashed:
    """The cut-layer activations and what the server's blocks need besides them.

    ``attention_mask`` travels as ``torch.bool`` (1 byte per token) and
    ``position_ids`` only when the caller gave them; otherwise the server derives
    the same default positions from the shape, as the unsplit model does.
    ``carried`` holds, by name, the other inputs of the server's blocks that the
    client computes, as a family declares them
    (:data:`~hf_fsl_sage.splitting.families.CARRIED_INPUTS`: a router state, a stack
    of earlier blocks' inputs, token ids); it is empty for most families. Every
    tensor has the batch and sequence dimensions first.

    The *activations* are the hidden states and the floating-point carried tensors:
    the server's loss is differentiated with respect to all of them.
    """

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    carried: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that travels, by name (carried ones as ``carried.<name>``)."""
        found = {n: t for n in ("hidden_states", "attention_mask", "position_ids")
                 if (t := getattr(self, n)) is not None}
        return found | {f"carried.{n}": t for n, t in self.carried.items()}

    @property
    def nbytes(self) -> int:
        """Bytes that cross the wire for this message (tensor payloads in the dtype sent)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def activations(self) -> dict[str, torch.Tensor]:
        """The tensors the server's loss is differentiated with respect to, by name: the hidden states first."""
        return {"hidden_states": self.hidden_states} | {n: t for n, t in self.carried.items() if t.is_floating_point()}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Smashed:
        """A ``Smashed`` with ``fn`` applied to every tensor."""
        return Smashed(fn(self.hidden_states), _maybe(self.attention_mask, fn), _maybe(self.position_ids, fn),
                       {n: fn(t) for n, t in self.carried.items()})

    def detach(self) -> Smashed:
        return self.map(torch.Tensor.detach)

    def to(self, device: torch.device | str) -> Smashed:
        return self.map(lambda t: t.to(device))

    def leaves(self) -> Smashed:
        """A detached copy whose activations require grad (what the server differentiates its loss against)."""
        return self.map(lambda t: t.detach().requires_grad_(t.is_floating_point()))

    def gradients(self) -> torch.Tensor | dict[str, torch.Tensor | None]:
        """After a backward pass through :meth:`leaves`: the gradient w.r.t. the hidden states, or, when there are
        carried activations, the gradients by name (see :meth:`activations`)."""
        grads = {n: t.grad for n, t in self.activations().items()}
        return grads["hidden_states"] if len(grads) == 1 else grads

    def backward(self, gradients: torch.Tensor | dict[str, torch.Tensor | None]) -> None:
        """Backpropagate ``gradients`` (as :meth:`gradients` returns them) through the client's graph."""
        grads = gradients if isinstance(gradients, dict) else {"hidden_states": gradients}
        pairs = [(t, grads[n]) for n, t in self.activations().items() if grads.get(n) is not None and t.requires_grad]
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def _maybe(t: torch.Tensor | None, fn) -> torch.Tensor | None:
    return None if t is None else fn(t)
