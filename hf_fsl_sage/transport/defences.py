"""Defences of the clients' text against a curious server: perturbations of what a client's blocks compute.

Both run on the client, in training only, on every local step of an algorithm that sends activations (not FedAvg),
so the client trains on exactly what it would send:

``smashed_clip_norm`` + ``smashed_noise_multiplier`` (Gaussian mechanism on the wire)
    Each token's cut-layer hidden vector (and each vector of the other activations a family's upload carries,
    e.g. a router state) is scaled down to L2 norm at most ``C`` (``smashed_clip_norm``), then
    Gaussian noise of standard deviation ``sigma * C`` per coordinate (``sigma``: ``smashed_noise_multiplier``) is
    added. The clip bounds what one token can contribute, so ``sigma`` sets the noise relative to the largest
    signal; the server receives only the clipped, noised vectors. The gradient flows through the clip; the noise
    is additive.
``embedding_dx_epsilon`` (metric local differential privacy of the tokens, d_chi-privacy)
    Before the client's first block, each token's input embedding ``e`` becomes ``e + z`` with ``z`` drawn with
    density proportional to ``exp(-epsilon * ||z||)``: a uniform direction and a norm drawn from
    ``Gamma(H, 1 / epsilon)`` (``H`` the embedding width, mean norm ``H / epsilon``). Two texts that differ in
    one token at embedding distance ``d`` give output distributions within a factor ``exp(epsilon * d)`` of
    each other, whatever the server computes from them afterwards (post-processing), so it bounds every attack on
    the activations at once, for its price in utility.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ActivationDefence:
    """The defence settings of a run (see the module docstring); all off by default."""

    clip_norm: float | None = None
    noise_multiplier: float = 0.0
    embedding_epsilon: float | None = None

    @property
    def active(self) -> bool:
        return self.clip_norm is not None or self.embedding_epsilon is not None

    def protect(self, hidden: torch.Tensor) -> torch.Tensor:
        """Per-token clipping to ``clip_norm`` and Gaussian noise of std ``noise_multiplier * clip_norm``."""
        if self.clip_norm is None:
            return hidden
        norms = hidden.float().norm(dim=-1, keepdim=True)
        clipped = hidden * (self.clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0).to(hidden.dtype)
        if not self.noise_multiplier:
            return clipped
        return clipped + torch.randn_like(clipped) * (self.noise_multiplier * self.clip_norm)

    def perturb_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """d_chi-privacy noise on each token's input embedding (last dimension)."""
        width = embeddings.shape[-1]
        direction = torch.randn(embeddings.shape, device=embeddings.device, dtype=torch.float32)
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        rate = torch.full(embeddings.shape[:-1], float(self.embedding_epsilon), device=embeddings.device)
        radius = torch.distributions.Gamma(torch.full_like(rate, float(width)), rate).sample()
        return embeddings + (direction * radius.unsqueeze(-1)).to(embeddings.dtype)

    @contextmanager
    def on_embeddings(self, embedding: nn.Module):
        """While active, the output of ``embedding`` (the client's token embedding) carries the d_chi noise."""
        if self.embedding_epsilon is None:
            yield
            return
        handle = embedding.register_forward_hook(lambda module, args, output: self.perturb_embeddings(output))
        try:
            yield
        finally:
            handle.remove()


__all__ = ["ActivationDefence"]
